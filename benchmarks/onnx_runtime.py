"""ONNX Runtime cascade against the exported PyTorch model: fidelity and CPU latency, one JSON line.

    python benchmarks/onnx_runtime.py --run results/quickstart [--config-id ID] [--threads 1] [--repeat 5]

A run DIR holds mess.pt and pareto.parquet (`messearch quickstart` or `pipeline` writes one); the row is the one
the pipeline exported (DIR/model.pt), else --config-id. Fidelity: every image of the split alone through the
PyTorch model and the ONNX cascade (exits, pixels, logits, confidences, threshold margins), and the mIoU of each
through messearch.evaluate. Latency at batch 1, same thread count for both: per image the median of `repeat`
runs, the TorchScript model and the ONNX cascade interleaved image by image so that load changes hit both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from messearch.data import build_dataset  # noqa: E402
from messearch.evaluate import evaluate  # noqa: E402
from messearch.export import build_export, load_exported, save_exported  # noqa: E402
from messearch.onnx_export import compare_with_onnx, export_onnx  # noqa: E402
from messearch.runtime import Cascade  # noqa: E402
from messearch.space import space_from_text  # noqa: E402


def _time(fn, x, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run folder with mess.pt and pareto.parquet")
    ap.add_argument("--config-id", help="front row to export (default: the one in RUN/model.pt)")
    ap.add_argument("--data", help="data spec (default: the checkpoint's space's data)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per image and model")
    a = ap.parse_args()
    run = Path(a.run)
    config_id = a.config_id or load_exported(run / "model.pt").meta.provenance["config_id"]
    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    model = build_export(run / "mess.pt", run / "pareto.parquet", config_id)
    meta = model.meta
    data = a.data or space_from_text(meta.space_text, meta.space_source).data
    with tempfile.TemporaryDirectory() as tmp:
        ts_path = save_exported(model, Path(tmp) / "model.ts", torchscript=True)
        t0 = time.perf_counter()
        folder = export_onnx(model, Path(tmp) / "onnx")
        export_s = time.perf_counter() - t0
        cascade = Cascade(folder, threads=a.threads)
        ds = build_dataset(data, a.split, tuple(meta.input_size), ignore_index=meta.ignore_index,
                           num_classes=meta.num_classes)
        images = [ds[i][0] for i in range(len(ds))]
        fid = compare_with_onnx(model, cascade, images)
        r_torch = evaluate(model, data, a.split, warmup=1, progress=False, threads=a.threads)
        r_onnx = evaluate(str(folder), data, a.split, warmup=1, progress=False, threads=a.threads)
        ts = load_exported(ts_path)
        lat_ts, lat_onnx = [], []
        with torch.inference_mode():
            for x in images[:2]:   # warm-up of both
                ts(x[None])
                cascade(x[None].numpy())
            for x in images:
                lat_ts.append(_time(ts, x[None], a.repeat))
                lat_onnx.append(_time(cascade, x[None].numpy(), a.repeat))
    ts_med, onnx_med = statistics.median(lat_ts), statistics.median(lat_onnx)
    print(json.dumps({
        "benchmark": "onnx_runtime", "run": str(run), "config_id": config_id, "kind": meta.config.kind,
        "exits": [f"{p}/{h}@{t:g}" for p, h, t in zip(meta.config.positions, meta.config.heads, meta.config.thresholds)],
        "data": data, "split": a.split, "n_images": fid["n_images"], "threads": a.threads, "repeat": a.repeat,
        "n_exits_differ": fid["n_exits_differ"], "n_pixels_differ": fid["n_pixels_differ"],
        "max_abs_logit_diff": fid["max_abs_logit_diff"], "max_confidence_diff": fid["max_confidence_diff"],
        "min_threshold_margin": fid["min_threshold_margin"], "decisions_robust": fid["decisions_robust"],
        "miou_torch": r_torch.miou, "miou_onnx": r_onnx.miou, "miou_equal": r_torch.miou == r_onnx.miou,
        "exit_rates_torch": r_torch.exit_rates, "exit_rates_onnx": r_onnx.exit_rates,
        "mean_gmacs": r_onnx.mean_gmacs, "onnx_export_s": round(export_s, 2),
        "latency_ms_median_torchscript": round(ts_med, 3), "latency_ms_median_onnx": round(onnx_med, 3),
        "onnx_over_torchscript": round(onnx_med / ts_med, 3),
        "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "torch": str(torch.__version__), "onnxruntime": __import__("onnxruntime").__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
