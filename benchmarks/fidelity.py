"""Fidelity of exported front rows: predicted (front) against measured (exported model, batch 1) figures.

Picks rows of a front at random (seeded), exports each, evaluates it on the cached split at batch 1, and prints
one JSON line per row (predicted vs measured mIoU, pixel accuracy, exit rates, GMACs, latency; wall-clock saving
against the original model vs the predicted MACs saving), then one summary line.

    python benchmarks/fidelity.py --run DIR [--rows 6] [--seed 0] [--data SPEC] [--split val] [--threads 1]
    python benchmarks/fidelity.py --build DIR [--train] [--images 32]    # make a quickstart-size run first
    python benchmarks/fidelity.py --run DIR --pool all    # rows of every configuration (written by --build)

A run DIR holds mess.pt and pareto.parquet. `--build` makes one: the quickstart space (128x128, 8 positions,
3 heads), weights from a short `messearch train` with --train (else random weights with sharpened classifiers),
the cache (messearch.cache.build_cache when present, else the same statistics computed here at batch 1), and the
front of a search in 'single' mode (cascade and static rows). Latency is predicted from the front's
latency_ms_<device> column when the front has one, else from a per-piece CPU profile measured here (each backbone
segment, head and the final head at batch 1, median of repeats), with the cost rule of DESIGN.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from messearch import stats
from messearch.cache_format import CacheArrays
from messearch.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from messearch.costs import CostTable, mac_table
from messearch.data import build_dataset
from messearch.evaluate import evaluate, load_model
from messearch.config import Config
from messearch.export import build_export
from messearch.files import sha256_file
from messearch.weights import build_mess_network
from messearch.front import read_front, write_front
from messearch.space import load_space

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- building a run

def _cache(ckpt: Path, data: str, split: str, out: Path) -> CacheArrays:
    try:
        from messearch.cache import build_cache
        from messearch.cache_format import load_cache
    except ImportError:
        build_cache = None
    if build_cache is not None:
        build_cache(str(ckpt), data, split, str(out), batch_size=1)
        return load_cache(str(out))
    return direct_cache(ckpt, data, split)


def direct_cache(ckpt, data: str, split: str) -> CacheArrays:
    """Every exit's exact statistics per image at batch 1 (the cache's rule), computed in this process."""
    net, space, _ = load_checkpoint(ckpt)
    ds = build_dataset(data, split, space.input_size, ignore_index=space.ignore_index, num_classes=space.num_classes)
    per = {k: [] for k in ("tp", "pred", "gt", "conf_mean", "n_above")}
    with torch.inference_mode():
        for i in range(len(ds)):
            x, m = ds[i]
            ex, fin = net(x[None])
            s = [stats.exit_statistics(l, m[None], space.num_classes, space.ignore_index, space.policy.n_bins)
                 for l in ex + [fin]]
            for k in ("tp", "pred", "n_above"):
                per[k].append(torch.stack([e[k][0] for e in s]).numpy())
            per["conf_mean"].append(np.array([float(e["conf_mean"][0]) for e in s]))
            per["gt"].append(s[0]["gt"][0].numpy())
    h, w = space.input_size
    return CacheArrays(list(ds.image_ids), list(space.positions), space.head_names, np.stack(per["tp"]),
                       np.stack(per["pred"]), np.stack(per["gt"]), np.stack(per["conf_mean"]), np.stack(per["n_above"]),
                       np.full(len(ds), h * w, dtype=np.int64), {"torch_threads": torch.get_num_threads()})


def build_run(out: Path, images: int, train: bool) -> None:
    """A quickstart-size run in `out`: mess.pt, pareto.parquet (and cache/ when messearch.cache builds one)."""
    from messearch.search_spec import SearchSpec
    from messearch.search_driver import evaluate_configs, search_local

    out.mkdir(parents=True, exist_ok=True)
    space = load_space(ROOT / "messearch" / "spaces" / "quickstart.yaml")
    data = f"synthetic:0:{images}"
    ckpt = out / "mess.pt"
    if train:
        from messearch.train import train as train_run
        train_run(space, "synthetic", out, progress=False)
    else:
        torch.manual_seed(0)
        net = build_mess_network(space).eval()
        with torch.no_grad():  # sharpen the classifiers so that confidences spread between exits
            for head in net.heads:
                head.classifier.weight.mul_(8.0)
            net.base.classifier[-1].weight.mul_(8.0)
        save_checkpoint(ckpt, net, data)
    cache = _cache(ckpt, data, "val", out / "cache")
    spec = SearchSpec(positions=list(space.positions), heads=space.head_names, thresholds=space.thresholds,
                      max_exits=space.max_exits, mode="single", policy_kind=space.policy.kind,
                      pixel_threshold_bin=space.policy.pixel_threshold_bin)
    meta = {"checkpoint_sha256": sha256_file(ckpt), "space_text": space.text, "space_source": space.source,
            "mode": "single", "data": data, "split": "val"}
    write_front(search_local(cache, spec, mac_table(space)), out / "pareto.parquet", meta)
    # every configuration with its predicted figures, in the front's format (for --pool all)
    write_front(evaluate_configs(cache, spec, mac_table(space)), out / "all_configs.parquet", meta)


# ------------------------------------------------------------------------------------------ latency profile

def _images(ckpt, data: str, split: str, n: int | None = None) -> list[torch.Tensor]:
    net, space, _ = load_checkpoint(ckpt)
    ds = build_dataset(data, split, space.input_size, ignore_index=space.ignore_index, num_classes=space.num_classes)
    return [ds[i][0][None] for i in range(len(ds) if n is None else min(n, len(ds)))]


def profile_pieces(ckpt, xs: list[torch.Tensor], reps: int = 3) -> CostTable:
    """Per-piece CPU latency (ms) at batch 1, timed along real passes over `xs`: each segment between candidate
    positions, each candidate head, the final head (median over images and repeats)."""
    net, space, _ = load_checkpoint(ckpt)
    size = list(space.input_size)
    n_pos = len(space.positions)
    seg = [[] for _ in range(net.n_segments)]
    head = [[[] for _ in space.heads] for _ in space.positions]
    final = []
    clock = time.perf_counter
    with torch.inference_mode():
        net(xs[0])
        for _ in range(reps):
            for x in xs:
                taps: dict = {}
                h = x
                for k in range(net.n_segments):
                    t0 = clock()
                    h = net.segment(k, h, taps)
                    seg[k].append(clock() - t0)
                    if k < n_pos:
                        for j, (p, hn) in enumerate(net.exits):
                            if p == space.positions[k]:
                                t0 = clock()
                                net.heads[j](h, size)
                                head[k][space.head_names.index(hn)].append(clock() - t0)
                t0 = clock()
                net.final(taps, size)
                final.append(clock() - t0)
    ms = lambda v: float(np.median(v)) * 1000.0  # noqa: E731
    cum = np.cumsum([ms(v) for v in seg])
    return CostTable(list(space.positions), space.head_names, cum[:n_pos], float(cum[-1]),
                     np.array([[ms(v) for v in row] for row in head]), ms(final), unit="ms")


def paired_latency(model, ref, xs: list[torch.Tensor], reps: int) -> tuple[float, float]:
    """Mean per-image latency (ms) of `model` and `ref`, timed alternately image by image (so that load from other
    processes hits both alike); each image's figure is the median of `reps` runs."""
    clock = time.perf_counter
    a, b = [], []
    with torch.inference_mode():
        model(xs[0]), ref(xs[0])
        for x in xs:
            ta, tb = [], []
            for _ in range(reps):
                t0 = clock()
                model(x)
                ta.append(clock() - t0)
                t0 = clock()
                ref(x)
                tb.append(clock() - t0)
            a.append(np.median(ta))
            b.append(np.median(tb))
    return float(np.mean(a)) * 1000.0, float(np.mean(b)) * 1000.0


def predicted_latency(table: CostTable, cfg: Config, rates: list[float]) -> float:
    """Mean latency per image of a configuration from per-piece latencies and its exit rates (DESIGN.md cost rule)."""
    if cfg.kind == "reference":
        return table.reference
    pi = [table.positions.index(p) for p in cfg.positions]
    hi = [table.heads.index(h) for h in cfg.heads]
    total, heads = 0.0, 0.0
    for j, (p, h) in enumerate(zip(pi, hi)):
        heads += table.head[p, h]
        total += rates[j] * (table.backbone_to[p] + heads)
    if cfg.kind != "static":
        total += rates[-1] * (table.backbone_total + heads + table.final)
    return float(total)


def _cache_threads(cache_dir: Path) -> int | None:
    """Torch threads of the cache's actors (CPU rounding depends on them), when its manifest records one count."""
    try:
        workers = json.loads((cache_dir / "manifest.json").read_text()).get("workers") or []
    except (OSError, ValueError):
        return None
    counts = {w.get("threads") for w in workers if isinstance(w, dict) and w.get("threads")}
    return counts.pop() if len(counts) == 1 else None


# --------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--run", help="run folder with mess.pt and pareto.parquet")
    g.add_argument("--build", help="build a quickstart-size run in this folder first")
    ap.add_argument("--train", action="store_true", help="--build: train the quickstart model (else random weights)")
    ap.add_argument("--images", type=int, default=32, help="--build: synthetic validation images")
    ap.add_argument("--rows", type=int, default=6)
    ap.add_argument("--pool", choices=("front", "all"), default="front",
                    help="pick rows of the front, or of every configuration (all_configs.parquet, written by --build)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", help="data spec (default: the front's or the checkpoint's)")
    ap.add_argument("--split", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: the cache actors' count from cache/manifest.json, else 1)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per image (median)")
    args = ap.parse_args(argv)

    run = Path(args.run or args.build)
    if args.build:
        torch.set_num_threads(args.threads or 1)
        build_run(run, args.images, args.train)
    ckpt = run / "mess.pt"
    front = run / ("all_configs.parquet" if args.pool == "all" else "pareto.parquet")
    args.threads = args.threads or _cache_threads(run / "cache") or 1
    df, meta = read_front(front)
    data = args.data or meta.get("data") or read_checkpoint(ckpt)["data"]
    split = args.split or meta.get("split") or "val"
    lat_cols = [c for c in df.columns if c.startswith("latency_ms_cpu")]
    torch.set_num_threads(args.threads)
    xs = _images(ckpt, data, split)
    table = None if lat_cols else profile_pieces(ckpt, xs)
    ref_model = load_model(str(ckpt))   # the original model: backbone + final head
    ref = evaluate(ref_model, data, split, warmup=1, progress=False, threads=args.threads)
    pred_ref_lat = float(df[df["is_reference"]].iloc[0][lat_cols[0]]) if lat_cols else table.reference
    ref_row = df[df["is_reference"]].iloc[0] if df["is_reference"].any() else None
    pool = [cid for cid in df["config_id"] if cid != "reference"]
    rng = random.Random(args.seed)
    picks = rng.sample(pool, min(args.rows, len(pool)))
    if ref_row is not None:
        picks.append("reference")
    summary = {"rows": 0, "exact": 0, "latency_within_15pct": 0, "latency_within_15pct_vs_reference": 0,
               "saving_ratio_ge_0.8": 0, "saving_rows": 0}
    for cid in picks:
        row = df[df["config_id"] == cid].iloc[0]
        model = build_export(ckpt, front, cid)
        cfg = model.meta.config
        r = evaluate(model, data, split, warmup=0, progress=False, threads=args.threads)
        lat, lat_ref = paired_latency(model, ref_model, xs, args.repeat)
        pred_rates = [float(v) for v in row["exit_rates"]]
        pred_lat = float(row[lat_cols[0]]) if lat_cols else predicted_latency(table, cfg, pred_rates)
        exact = {k: getattr(r, k) == (pred_rates if k == "exit_rates" else float(row[k]))
                 for k in ("miou", "pixel_acc", "exit_rates", "mean_gmacs")}
        pred_saving = 1.0 - float(row["mean_gmacs"]) / ref.mean_gmacs
        wall_saving = 1.0 - lat / lat_ref
        rec = {
            "config_id": cid, "kind": cfg.kind, "n_exits": cfg.n_exits,
            "exits": [f"{p}/{h}@{t:g}" for p, h, t in zip(cfg.positions, cfg.heads, cfg.thresholds)],
            "predicted": {"miou": float(row["miou"]), "pixel_acc": float(row["pixel_acc"]), "exit_rates": pred_rates,
                          "mean_gmacs": float(row["mean_gmacs"]), "latency_ms": round(pred_lat, 3)},
            "measured": {"miou": r.miou, "pixel_acc": r.pixel_acc, "exit_rates": r.exit_rates,
                         "mean_gmacs": r.mean_gmacs, "latency_ms": round(lat, 3),
                         "latency_ms_median_1pass": round(r.latency_ms_median, 3),
                         "latency_ms_p90_1pass": round(r.latency_ms_p90, 3), "reference_latency_ms": round(lat_ref, 3)},
            "exact": exact,
            "latency_rel_err": round(lat / pred_lat - 1.0, 4),
            # the same with both sides relative to the reference model (cancels a uniform slow-down of the machine)
            "latency_rel_err_vs_reference": round((lat / lat_ref) / (pred_lat / pred_ref_lat) - 1.0, 4),
            "predicted_macs_saving": round(pred_saving, 4), "wallclock_saving": round(wall_saving, 4),
            "saving_ratio": round(wall_saving / pred_saving, 3) if pred_saving > 0.05 else None,
        }
        print(json.dumps(rec), flush=True)
        summary["rows"] += 1
        summary["exact"] += all(exact.values())
        summary["latency_within_15pct"] += abs(rec["latency_rel_err"]) <= 0.15
        summary["latency_within_15pct_vs_reference"] += abs(rec["latency_rel_err_vs_reference"]) <= 0.15
        if rec["saving_ratio"] is not None:
            summary["saving_rows"] += 1
            summary["saving_ratio_ge_0.8"] += rec["saving_ratio"] >= 0.8
    summary.update({"summary": True, "pool": args.pool, "images": ref.n_images, "data": data, "split": split,
                    "threads": args.threads, "repeat": args.repeat,
                    "latency_source": lat_cols[0] if lat_cols else "per-piece profile (this benchmark)",
                    "predicted_reference_latency_ms": round(pred_ref_lat, 3), "reference_gmacs": ref.mean_gmacs,
                    "loadavg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
