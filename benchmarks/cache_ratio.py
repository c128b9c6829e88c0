"""The cache pass against the plain pass of the original model, on the same images and device, in one run.

Cache pass: messearch.cache.cache_batch, the very function every cache actor runs (backbone once, every candidate
head and the final head, the fused exact statistics, copied to host memory). Plain pass: the original torchvision
model (backbone + final head) and its argmax. Data loading is outside both (images are preloaded on the device).
Also reported: the network alone (backbone + every head, no statistics), the unfused statistics (stats.exit_statistics per exit) when --unfused, the MACs ratio (the
compute the heads alone add: a floor for the measured ratio), and the cache's size on disk per image and exit
(a zstd Parquet shard of these rows, as build_cache writes it). Prints one JSON line.

    python benchmarks/cache_ratio.py                                   # quickstart space, CPU, batch 8
    python benchmarks/cache_ratio.py --space messearch/spaces/deeplabv3_resnet50.yaml --device cuda --images 64
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from messearch.cache import cache_batch, shard_table
from messearch.costs import mac_table
from messearch.devices import device_name
from messearch.data import build_dataset
from messearch.weights import build_mess_network
from messearch.space import load_space


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fns: dict, batches, device, repeats) -> dict:
    """Best total seconds of each fn over every batch; passes interleaved (fn1, fn2, ... per repeat) so that
    load from other processes hits every variant alike. One warm-up batch each first."""
    for fn in fns.values():
        fn(*batches[0])
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for b in batches:
                fn(*b)
            _sync(device)
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def measure(net, batches, device, n_bins: int, repeats: int, unfused: bool = False) -> dict:
    """Best seconds over `batches` of the plain pass, the cache pass and the network alone, and their ratios."""
    @torch.inference_mode()
    def plain(images, masks):
        return net.base(images)["out"].argmax(dim=1)

    @torch.inference_mode()
    def heads_only(images, masks):   # the cache pass without its statistics: what the network itself costs
        feats, taps = net.forward_features(images)
        return net.exit_logits(feats, images.shape[-2:]), net.final(taps, images.shape[-2:])

    fns = {"plain": plain, "cache": lambda images, masks: cache_batch(net, images, masks, n_bins), "network": heads_only}
    if unfused:
        fns["unfused"] = lambda images, masks: cache_batch(net, images, masks, n_bins, fused=False)
    t = _timed(fns, batches, device, repeats)
    out = {"plain_s": round(t["plain"], 4), "cache_s": round(t["cache"], 4), "ratio": round(t["cache"] / t["plain"], 3),
           "network_only_s": round(t["network"], 4), "network_only_ratio": round(t["network"] / t["plain"], 3)}
    if unfused:
        out.update(unfused_s=round(t["unfused"], 4), unfused_ratio=round(t["unfused"] / t["plain"], 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--space", default="messearch/spaces/quickstart.yaml")
    ap.add_argument("--checkpoint", default=None, help="a mess.pt (default: random weights; timing only)")
    ap.add_argument("--data", default=None, help="data spec (default: synthetic scenes at the space's input size)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--unfused", action="store_true", help="also time the per-exit (unfused) statistics")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if a.checkpoint:
        from messearch.checkpoint import load_checkpoint

        net, space, _ = load_checkpoint(a.checkpoint)
    else:
        torch.manual_seed(0)
        space = load_space(a.space)
        net = build_mess_network(space).eval()
    net = net.to(device)
    n_bins = space.policy.n_bins
    ds = build_dataset(a.data or f"synthetic:seed=0,val={a.images}", "val", space.input_size, ignore_index=space.ignore_index,
                       num_classes=space.num_classes)
    n = min(a.images, len(ds))
    batches = []
    for lo in range(0, n, a.batch_size):
        items = [ds[i] for i in range(lo, min(lo + a.batch_size, n))]
        batches.append((torch.stack([x for x, _ in items]).to(device), torch.stack([m for _, m in items]).to(device)))

    out = {"benchmark": "cache_ratio", "space": space.name, "model": space.model, "device": str(device),
           "device_name": device_name(device),
           "threads": torch.get_num_threads(), "images": n, "batch_size": a.batch_size, "input_size": list(space.input_size),
           "candidate_exits": len(net.exits), "classes": space.num_classes, "n_bins": n_bins,
           **measure(net, batches, device, n_bins, a.repeats, a.unfused)}
    cache = lambda images, masks: cache_batch(net, images, masks, n_bins)  # noqa: E731
    macs = mac_table(space)
    out["macs_ratio"] = round(float(macs.backbone_total + macs.head.sum() + macs.final) / float(macs.reference), 3)
    # On-disk size: this run's rows as one zstd Parquet shard, exactly as build_cache writes them.
    rows = [cache(*b) for b in batches]
    table = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    table.update(index=np.arange(n), image_id=[str(i) for i in ds.image_ids[:n]])
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "shard.parquet")
        pq.write_table(shard_table(table), path, compression="zstd")
        size = os.path.getsize(path)
    e = len(net.exits) + 1
    out.update(shard_bytes=size, bytes_per_image_exit=round(size / (n * e), 1),
               raw_bytes_per_image_exit=8 * (2 * space.num_classes + 1 + n_bins + 1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
