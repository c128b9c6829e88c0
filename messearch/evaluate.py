"""Measured evaluation of a model (an exported configuration, or the original model of a checkpoint): exact
confusion counts, mIoU, pixel accuracy, exit rates, counted MACs and per-image latency.

Metrics go through messearch.stats with each image's own logits, so at equal numerics (batch 1 here and in
the cache) the integers equal the cache's and the floats equal the front's, bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import stats
from .checkpoint import FORMAT as CKPT_FORMAT
from .checkpoint import load_checkpoint
from .config import Config
from .data import build_dataset, class_names
from .devices import device_name, exact_numerics, parse_device
from .errors import MessError
from .export import export_config, is_torchscript_file, load_exported
from .export_meta import ExportMeta
from .files import load_weights_only, sha256_file
from .onnx_export import OnnxCascadeModule



@dataclass
class EvaluationResult:
    """What `evaluate` measured: the front's figures, the exact confusion sums, and per image its exit and MACs."""

    miou: float
    pixel_acc: float
    exit_rates: list[float]          # share of images leaving at each exit, the final head last
    mean_gmacs: float
    latency_ms_median: float         # per image
    latency_ms_p90: float
    latency_ms_mean: float
    n_images: int
    exit_counts: list[int]
    macs_sum: int
    tp: list[int]                    # per class, summed over the split
    pred: list[int]
    gt: list[int]
    exits: list[int]                 # per image: the exit it left at (n_exits = the final head)
    macs: list[int]                  # per image: MACs counted by the model
    config_id: str
    kind: str                        # the configuration's kind (reference, cascade, static), as in pareto.parquet
    device: str
    batch_size: int
    data: str
    split: str
    torch_threads: int
    batch1: dict | None = None       # with compare_batch1 at batch > 1: pixels, exits and logits that differ
    device_name: str = ""            # the GPU's or CPU's model name
    timer: str = ""                  # cuda_events (GPU) or wall_clock (CPU)

    def to_json(self) -> dict:
        """The JSON summary: the front's keys first, then the counts; per-image lists left out."""
        d = {k: v for k, v in asdict(self).items() if k not in ("exits", "macs", "batch1")}
        d.update(self.batch1 or {})
        return d

    def format_summary(self) -> str:
        """A short human-readable summary of the evaluation."""
        rates = ", ".join(f"{v:.3f}" for v in self.exit_rates)
        lines = [
            f"{self.config_id or 'model'} ({self.kind}) on {self.data} [{self.split}], {self.n_images} images, "
            f"{self.device} ({self.device_name}), batch {self.batch_size}",
            f"  mIoU {self.miou * 100:.2f}%   pixel acc {self.pixel_acc * 100:.2f}%",
            f"  exit rates (final last): {rates}",
            f"  mean GMACs (counted): {self.mean_gmacs:.4f}",
            f"  latency per image: median {self.latency_ms_median:.2f} ms, p90 {self.latency_ms_p90:.2f} ms",
        ]
        if self.batch1:
            b = self.batch1
            lines.append(f"  vs batch 1: {b['n_pixels_differ']} pixels and {b['n_exits_differ']} exits differ "
                         f"(max |logit diff| at equal exits {b['max_abs_logit_diff']:.3g})")
        return "\n".join(lines)


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
            net, space, info = load_checkpoint(path)
            prov = {"config_id": "reference", "checkpoint": str(path), "checkpoint_sha256": sha256_file(path)}
            names = class_names(info.get("data") or space.data, space.num_classes)
            return export_config(net, space, Config("reference"), prov, class_names=names)
    return load_exported(path)


def _meta(model) -> ExportMeta:
    meta = getattr(model, "meta", None)
    if not isinstance(meta, ExportMeta):
        raise MessError("the model carries no messearch metadata (input size, classes); pass an exported model")
    return meta


def _whole_at_least(value, lo: int) -> bool:
    """Whether value is an integer (not a bool) of at least lo."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= lo


def evaluate(model_or_path, data_spec: str, split: str = "val", device: str = "cpu", batch_size: int = 1,
             warmup: int = 3, progress: bool = True, compare_batch1: bool = False, limit: int | None = None,
             threads: int | None = None, repeat: int = 1) -> EvaluationResult:
    """Run the model on a data set; returns an EvaluationResult (the front's figures, n_images, the confusion sums
    tp/pred/gt, per-image exits and MACs).

    compare_batch1: at batch_size > 1 also run each image alone and report how many pixels (argmax) and exits differ.
    threads: torch intra-op threads while evaluating (CPU rounding depends on it: use the cache's to compare exactly).
    repeat: time every batch this many times (metrics from the first run; latency per image is the median).
    """
    for name, value, lo in (("--threads", threads, 1), ("--warmup", warmup, 0), ("repeat", repeat, 1),
                            ("limit", limit, 1), ("--batch-size", batch_size, 1)):
        if value is not None and not _whole_at_least(value, lo):
            raise MessError(f"{name} {value!r}: allowed an integer >= {lo}")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _evaluate(model_or_path, data_spec, split, device, batch_size, warmup, progress, compare_batch1,
                         limit, int(repeat))
    finally:
        if threads:
            torch.set_num_threads(before)


def evaluate_side_by_side(models: list, data_spec: str, split: str = "val", device: str = "cpu", threads: int = 1,
                          **kwargs) -> list[EvaluationResult]:
    """evaluate() of several models, each in its own Python thread when the CPU has `threads` cores for each (torch
    releases the GIL), else one after another; the figures equal evaluate()'s one by one (same kernels, same thread
    count), the latencies are measured side by side."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    if parse_device(device).type != "cpu" or len(models) * int(threads) > (os.cpu_count() or 1):
        return [evaluate(m, data_spec, split, device=device, threads=threads, **kwargs) for m in models]
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))   # once, before the threads start: a thread's set would race the others'
    try:
        with ThreadPoolExecutor(len(models)) as pool:
            jobs = [pool.submit(evaluate, m, data_spec, split, device=device, threads=None, **kwargs) for m in models]
            return [j.result() for j in jobs]
    finally:
        torch.set_num_threads(before)


def _evaluate(model_or_path, data_spec, split, device, batch_size, warmup, progress, compare_batch1, limit, repeat):
    model = load_model(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    meta = _meta(model)
    dev = parse_device(device)
    exact_numerics(dev)   # the cache's kernels: what makes the measured figures equal the front's
    model = model.to(dev).eval()
    ds = build_dataset(data_spec, split, tuple(meta.input_size), train=False, ignore_index=meta.ignore_index,
                       num_classes=meta.num_classes)
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise MessError(f"data {data_spec!r} split {split!r} has no images")
    k = meta.config.n_exits
    c, ignore, n_bins = meta.num_classes, meta.ignore_index, meta.policy["n_bins"]

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
                _timed_forward(model, x0, dev)
        for start in range(0, n, batch_size):
            items = [ds[i] for i in range(start, min(n, start + batch_size))]
            x = torch.stack([it[0] for it in items]).to(dev)
            mask = torch.stack([it[1] for it in items]).to(dev)
            times = []
            for _ in range(repeat):
                out, ms = _timed_forward(model, x, dev)
                times.append(ms)
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
    return EvaluationResult(
        miou=float(stats.miou_from_counts(tp, pred, gt)), pixel_acc=float(stats.pixel_accuracy(tp, gt)),
        exit_rates=[int(v) / n for v in counts], mean_gmacs=float(macsum / n / 1e9),
        latency_ms_median=float(np.median(lat_arr)), latency_ms_p90=float(np.percentile(lat_arr, 90)),
        latency_ms_mean=float(lat_arr.mean()), n_images=n, exit_counts=[int(v) for v in counts], macs_sum=int(macsum),
        tp=tp.tolist(), pred=pred.tolist(), gt=gt.tolist(), exits=exits, macs=macs,
        config_id=meta.provenance.get("config_id", ""), kind=meta.config.kind, device=str(dev),
        batch_size=batch_size, data=data_spec, split=split, torch_threads=torch.get_num_threads(),
        batch1=diff if compare_batch1 and batch_size > 1 else None, device_name=device_name(dev),
        timer="cuda_events" if dev.type == "cuda" else "wall_clock")


def _timed_forward(model, x: torch.Tensor, dev: torch.device):
    """The model's outputs on x and the milliseconds the call took: on a GPU by CUDA events (the device's clock,
    from before the first kernel of the call to after its last), on a CPU by the wall clock."""
    if dev.type != "cuda":
        t0 = time.perf_counter()
        out = model(x)
        return out, (time.perf_counter() - t0) * 1000.0
    with torch.cuda.device(dev):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()   # nothing queued before this call is timed
        start.record()
        out = model(x)
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end)


def _compare(model, x, logits, ex, diff: dict) -> None:
    """Run each image of a batch alone; count pixels whose argmax differs, images whose exit differs, and the largest
    logit difference among images that left at the same exit (another exit's logits come from another head)."""
    for i in range(x.shape[0]):
        li, ei, _ = model(x[i:i + 1])
        diff["n_pixels_differ"] += int((li.argmax(1) != logits[i:i + 1].argmax(1)).sum())
        diff["n_exits_differ"] += int(ei[0] != ex[i])
        diff["n_logits_differ"] += int((li != logits[i:i + 1]).sum())
        if ei[0] == ex[i]:
            diff["max_abs_logit_diff"] = max(diff["max_abs_logit_diff"], float((li - logits[i:i + 1]).abs().max()))


def _bar(n: int, progress: bool):
    return tqdm(total=n, desc="evaluate", unit="img", disable=not progress, leave=False)
