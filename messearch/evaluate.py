"""Measured evaluation of a model (an exported configuration, or the original model of a checkpoint): exact
confusion counts, mIoU, pixel accuracy, exit rates, counted MACs and per-image latency.

Metrics go through messearch.stats with each image's own logits, so at equal numerics (batch 1 here and in
the cache) the integers equal the cache's and the floats equal the front's, bit for bit.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from . import stats
from .checkpoint import FORMAT as CKPT_FORMAT
from .checkpoint import load_checkpoint
from .config import Config
from .data import build_dataset, dataset_class_names
from .devices import parse_device
from .errors import MessError
from .export import export_config, is_torchscript_file, load_exported
from .files import load_weights_only, sha256_file
from .onnx_export import OnnxCascadeModule

FRONT_KEYS = ("miou", "pixel_acc", "exit_rates", "mean_gmacs", "latency_ms_median", "latency_ms_p90")


def load_model(path):
    """An exported model file, an ONNX export folder (run by ONNX Runtime), or a MESS checkpoint (mess.pt) as its
    reference model (backbone + final head)."""
    if Path(path).is_dir():
        return OnnxCascadeModule(path)
    if not Path(path).is_file():
        raise MessError(f"{path}: model file not found")
    if not is_torchscript_file(path):
        payload = load_weights_only(path, "exported model or MESS checkpoint")
        if isinstance(payload, dict) and payload.get("format") == CKPT_FORMAT:
            net, space, extra = load_checkpoint(path)
            prov = {"config_id": "reference", "checkpoint": str(path), "checkpoint_sha256": sha256_file(path)}
            names = dataset_class_names(extra.get("data", ""), space.num_classes)
            return export_config(net, space, Config("reference"), prov, class_names=names)
    return load_exported(path)


def _meta(model) -> dict:
    meta = getattr(model, "meta", None)
    if not isinstance(meta, dict) or "input_size" not in meta:
        raise MessError("the model carries no messearch metadata (input size, classes); pass an exported model")
    return meta


def evaluate(model_or_path, data_spec: str, split: str = "val", device: str = "cpu", batch_size: int = 1,
             warmup: int = 3, progress: bool = True, compare_batch1: bool = False, limit: int | None = None,
             threads: int | None = None, repeat: int = 1) -> dict:
    """Run the model on a data set; returns a dict with the front's keys (miou, pixel_acc, exit_rates, mean_gmacs,
    latency_ms_median, latency_ms_p90), n_images, the confusion sums tp/pred/gt, per-image exits and MACs.

    compare_batch1: at batch_size > 1 also run each image alone and report how many pixels (argmax) and exits differ.
    threads: torch intra-op threads while evaluating (CPU rounding depends on it: use the cache's to compare exactly).
    repeat: time every batch this many times (metrics from the first run; latency per image is the median).
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _evaluate(model_or_path, data_spec, split, device, batch_size, warmup, progress, compare_batch1,
                         limit, max(1, int(repeat)))
    finally:
        torch.set_num_threads(before)


def _evaluate(model_or_path, data_spec, split, device, batch_size, warmup, progress, compare_batch1, limit, repeat):
    model = load_model(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    meta = _meta(model)
    if batch_size < 1:
        raise MessError(f"batch size {batch_size} must be >= 1")
    dev = parse_device(device)
    model = model.to(dev).eval()
    ds = build_dataset(data_spec, split, tuple(meta["input_size"]), train=False, ignore_index=meta["ignore_index"],
                       num_classes=meta["num_classes"])
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise MessError(f"data {data_spec!r} split {split!r} has no images")
    k = len(meta["config"]["positions"])
    c, ignore, n_bins = meta["num_classes"], meta["ignore_index"], meta["policy"]["n_bins"]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    tp = np.zeros(c, dtype=np.int64)
    pred = np.zeros(c, dtype=np.int64)
    gt = np.zeros(c, dtype=np.int64)
    exits, macs, lat = [], [], []
    diff = {"n_pixels_differ": 0, "n_exits_differ": 0, "n_logits_differ": 0, "max_abs_logit_diff": 0.0}
    bar = _bar(n, progress)
    with torch.inference_mode():
        if warmup > 0:
            x0 = torch.stack([ds[i][0] for i in range(min(batch_size, n))]).to(dev)
            for _ in range(warmup):
                model(x0)
            sync()
        for start in range(0, n, batch_size):
            items = [ds[i] for i in range(start, min(n, start + batch_size))]
            x = torch.stack([it[0] for it in items]).to(dev)
            mask = torch.stack([it[1] for it in items]).to(dev)
            times = []
            for _ in range(repeat):
                sync()
                t0 = time.perf_counter()
                out = model(x)
                sync()
                times.append((time.perf_counter() - t0) * 1000.0)
                if len(times) == 1:
                    logits, ex, mc = out
            lat += [float(np.median(times)) / len(items)] * len(items)
            s = stats.exit_statistics(logits, mask, c, ignore, n_bins)
            tp += s["tp"].sum(0).cpu().numpy()
            pred += s["pred"].sum(0).cpu().numpy()
            gt += s["gt"].sum(0).cpu().numpy()
            exits += ex.cpu().tolist()
            macs += mc.cpu().tolist()
            if compare_batch1 and len(items) > 1:
                _compare(model, x, logits, ex, diff)
            bar.update(len(items))
    bar.close()
    counts = np.bincount(np.asarray(exits, dtype=np.int64), minlength=k + 1)
    macsum = np.int64(sum(macs))
    lat_arr = np.asarray(lat)
    result = {
        "miou": float(stats.miou_from_counts(tp, pred, gt)),
        "pixel_acc": float(stats.pixel_accuracy(tp, gt)),
        "exit_rates": [int(v) / n for v in counts],
        "mean_gmacs": float(macsum / n / 1e9),
        "latency_ms_median": float(np.median(lat_arr)),
        "latency_ms_p90": float(np.percentile(lat_arr, 90)),
        "latency_ms_mean": float(lat_arr.mean()),
        "n_images": n,
        "exit_counts": [int(v) for v in counts],
        "macs_sum": int(macsum),
        "tp": tp.tolist(), "pred": pred.tolist(), "gt": gt.tolist(),
        "exits": exits, "macs": macs,
        "config_id": meta.get("provenance", {}).get("config_id", ""),
        "kind": meta["config"]["kind"],
        "device": str(dev), "batch_size": batch_size, "data": data_spec, "split": split,
        "torch_threads": torch.get_num_threads(),
    }
    if compare_batch1 and batch_size > 1:
        result.update(diff)
    return result


def _compare(model, x, logits, ex, diff: dict) -> None:
    """Run each image of a batch alone; count pixels whose argmax differs, images whose exit differs."""
    for i in range(x.shape[0]):
        li, ei, _ = model(x[i:i + 1])
        diff["n_pixels_differ"] += int((li.argmax(1) != logits[i:i + 1].argmax(1)).sum())
        diff["n_exits_differ"] += int(ei[0] != ex[i])
        diff["n_logits_differ"] += int((li != logits[i:i + 1]).sum())
        diff["max_abs_logit_diff"] = max(diff["max_abs_logit_diff"], float((li - logits[i:i + 1]).abs().max()))


def _bar(n: int, progress: bool):
    from tqdm import tqdm
    return tqdm(total=n, desc="evaluate", unit="img", disable=not progress, leave=False)


def format_result(r: dict) -> str:
    """A short human-readable summary of an evaluation."""
    rates = ", ".join(f"{v:.3f}" for v in r["exit_rates"])
    lines = [
        f"{r.get('config_id') or 'model'} ({r['kind']}) on {r['data']} [{r['split']}], {r['n_images']} images, "
        f"{r['device']}, batch {r['batch_size']}",
        f"  mIoU {r['miou'] * 100:.2f}%   pixel acc {r['pixel_acc'] * 100:.2f}%",
        f"  exit rates (final last): {rates}",
        f"  mean GMACs (counted): {r['mean_gmacs']:.4f}",
        f"  latency per image: median {r['latency_ms_median']:.2f} ms, p90 {r['latency_ms_p90']:.2f} ms",
    ]
    if "n_pixels_differ" in r:
        lines.append(f"  vs batch 1: {r['n_pixels_differ']} pixels and {r['n_exits_differ']} exits differ "
                     f"(max |logit diff| {r['max_abs_logit_diff']:.3g})")
    return "\n".join(lines)


def json_result(r: dict) -> dict:
    """The JSON summary: the front's keys first, then the counts; per-image lists left out."""
    return {k: v for k, v in r.items() if k not in ("exits", "macs")}
