"""ONNX export of an exported configuration: one graph per stage and `cascade.json`, run by messearch.runtime.

Stage j < n_exits: the backbone units from the previous exit to exit j, then exit j's head; outputs its logits,
the image confidence the policy reads, the running feature and any feature the final head taps. The last stage
runs the rest of the backbone and the original final head. A static configuration has one stage and no final.
The confidence is computed in the graph with the same ops as messearch.stats (float32 softmax and max, a float64
sum that is exact, one division), so equal logits give the PyTorch model's confidence bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import List

import torch
from torch import nn

from . import stats
from .errors import MessError
from .export_meta import ExportMeta
from .files import atomic_write_bytes, atomic_write_text, sha256_file
from .runtime import CASCADE_FILE, FORMAT, Cascade

OPSET = 17


class _OnnxStage(nn.Module):
    """Export-only wrapper: some Stage modules of a DynamicExitModel, then their exit head or the final head."""

    def __init__(self, stages: list, head, final, size: List[int], taps_in: list[str], taps_out: list[str],
                 policy: tuple[str, int, int]):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.final = final
        self.size = [int(v) for v in size]
        self.taps_in = taps_in      # features the final head reads that earlier stages computed
        self.taps_out = taps_out    # features the final head reads that this (exit) stage computes
        self.policy_kind, self.pixel_bin, self.n_bins = policy

    def forward(self, x: torch.Tensor, *taps_in: torch.Tensor):
        taps = dict(zip(self.taps_in, taps_in))
        h = x
        for stage in self.stages:
            h = stage(h)
            if stage.tap != "":
                taps[stage.tap] = h
        if self.final is not None:
            return self.final(taps, self.size)
        logits = self.head(h, self.size)
        conf = _confidence(logits, self.policy_kind, self.pixel_bin, self.n_bins)
        return (logits, conf, h, *[taps[k] for k in self.taps_out])


def _confidence(logits: torch.Tensor, kind: str, pixel_bin: int, n_bins: int) -> torch.Tensor:
    """stats.image_confidence written with ops the ONNX exporter maps one to one (float64 [B])."""
    top1 = stats.top1_confidence(logits)
    n = top1.shape[1] * top1.shape[2]
    if kind == "mean":
        return top1.double().sum(dim=(1, 2)) / n
    edge = stats.bin_edges(n_bins)[pixel_bin]   # the same float32 edge count_above compares with
    return (top1 >= edge).long().sum(dim=(1, 2)).double() / n


def _groups(model) -> list[tuple[list, int | None]]:
    """The DynamicExitModel's stages grouped into graphs: one per exit (ending with its stage), then the final's."""
    groups, current = [], []
    for stage in model.stages:
        current.append(stage)
        if stage.has_exit:
            groups.append((current, stage.exit_id))
            current = []
    if model.has_final:
        groups.append((current, None))
    return groups


def export_onnx(model, out_dir, opset: int = OPSET) -> Path:
    """Write `model` (a DynamicExitModel) to `out_dir` as stage<k>.onnx files and cascade.json; returns the folder.

    The set is written beside `out_dir` first and replaces the folder's previous set only when complete, so an
    interrupted export leaves the previous cascade whole; cascade.json records each graph's sha256, which
    messearch.runtime checks, so a folder of mixed exports is refused, never run."""
    if not hasattr(model, "stages") or not isinstance(getattr(model, "meta", None), ExportMeta):
        raise MessError("ONNX export needs a messearch exported model (export_config or load_exported of a .pt "
                        "file), not a TorchScript archive")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MessError(f"--onnx {out}: is a file; give a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_set(model, tmp, opset)
        _replace_set(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace_set(new: Path, out: Path) -> None:
    """Move the complete set in `new` over `out`'s stage graphs and cascade.json (other files are left alone). Only
    renames happen here; cascade.json goes first and comes back last, so no moment shows a loadable mixed set."""
    out.mkdir(parents=True, exist_ok=True)
    (out / CASCADE_FILE).unlink(missing_ok=True)
    names = {p.name for p in new.glob("stage*.onnx")}
    for old in out.glob("stage*.onnx"):
        if old.name not in names:   # a stage of a longer earlier cascade
            old.unlink()
    for name in sorted(names):
        os.replace(new / name, out / name)
    os.replace(new / CASCADE_FILE, out / CASCADE_FILE)


def _write_set(model, out: Path, opset: int) -> None:
    meta = model.meta
    size = [int(v) for v in meta.input_size]
    policy = (model.policy_kind, model.pixel_bin, model.n_bins)
    model = model.cpu().eval()
    x = torch.zeros(2, 3, *size)    # batch 2, so that no batch size is folded into the graph as a constant
    carried: dict[str, torch.Tensor] = {}   # tap name -> example value, for the final stage's inputs
    entries = []
    for k, (stages, exit_id) in enumerate(_groups(model)):
        first = "image" if k == 0 else "features"
        if exit_id is None:
            names = list(carried)
            wrapper = _OnnxStage(stages, None, model.final, size, names, [], policy)
            args, inputs, outputs = (x, *carried.values()), [first] + [f"tap_{t}" for t in names], ["logits"]
        else:
            new = [s.tap for s in stages if s.tap != ""]
            wrapper = _OnnxStage(stages, stages[-1].head, None, size, [], new, policy)
            args, inputs = (x,), [first]
            outputs = ["logits", "confidence", "features_out"] + [f"tap_{t}" for t in new]
        wrapper.eval()   # a new Module starts in training mode: batch norm would use (and update) batch statistics
        path = out / f"stage{k}.onnx"
        _onnx_export(wrapper, args, path, inputs, outputs, opset)
        entry = {"file": path.name, "sha256": sha256_file(path), "inputs": inputs, "outputs": outputs, "exit": exit_id,
                 "segment_macs": int(sum(s.seg_macs for s in stages))}
        if exit_id is None:
            entry["final_macs"] = int(model.final_macs)
        else:
            entry.update(exit_name="/".join(meta.exits[exit_id]), threshold=float(stages[-1].threshold),
                         head_macs=int(stages[-1].head_macs))
            with torch.no_grad():
                res = wrapper(x)
            x = res[2]
            carried.update(zip(new, res[3:]))
        entries.append(entry)
    cascade = {"format": FORMAT, "stages": entries, "n_exits": model.n_exits, "static": bool(model.static),
               "opset": opset, **meta.to_dict()}
    atomic_write_text(out / CASCADE_FILE, json.dumps(cascade, indent=1))


def _onnx_export(module, args, path: Path, inputs, outputs, opset: int) -> None:
    """torch.onnx.export with the TorchScript-based exporter (no onnxscript needed), batch axis dynamic; the graph
    is checked with onnx.checker before it is written."""
    import io as _io

    try:
        import onnx
    except ImportError:
        raise MessError("ONNX export needs the onnx package: pip install 'messearch[onnx]'") from None
    axes = {name: {0: "batch"} for name in list(inputs) + list(outputs)}
    buf = _io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(onnx.load_from_string(buf.getvalue()), full_check=True)
    atomic_write_bytes(path, buf.getvalue())


def compare_with_onnx(model, cascade, images) -> dict:
    """Run the PyTorch model and the ONNX cascade (a runtime.Cascade) on each image alone; count images that take
    another exit and pixels of another class, the largest |logit| difference, the largest confidence difference at
    an exit both reached, and the smallest distance of a PyTorch confidence to its exit's threshold (when that is
    larger than the confidence difference, no image can have its exit decision flipped by float rounding)."""
    seen: list[float] = []
    hooks = [s.head.register_forward_hook(lambda m, i, o: seen.extend(model.confidence(o).tolist()))
             for s in model.stages if s.has_exit]
    thresholds = [s.threshold for s in model.stages if s.has_exit]
    r = {"n_images": 0, "n_exits_differ": 0, "n_pixels_differ": 0, "max_abs_logit_diff": 0.0,
         "max_confidence_diff": 0.0, "min_threshold_margin": float("inf")}
    try:
        with torch.inference_mode():
            for x in images:
                seen.clear()
                logits, ex, _ = model(x[None])
                got = cascade.run(x[None].numpy())
                lo = torch.from_numpy(got["logits"])
                r["n_images"] += 1
                r["n_exits_differ"] += int(int(ex[0]) != int(got["exits"][0]))
                r["n_pixels_differ"] += int((lo.argmax(1) != logits.argmax(1)).sum())
                r["max_abs_logit_diff"] = max(r["max_abs_logit_diff"], float((lo - logits).abs().max()))
                for j, c in enumerate(seen):
                    if not model.static:
                        r["min_threshold_margin"] = min(r["min_threshold_margin"], abs(c - thresholds[j]))
                    other = float(got["confidence"][0, j])
                    if other == other:  # NaN: the cascade did not reach exit j
                        r["max_confidence_diff"] = max(r["max_confidence_diff"], abs(c - other))
    finally:
        for h in hooks:
            h.remove()
    r["decisions_robust"] = r["min_threshold_margin"] > r["max_confidence_diff"]
    return r


# ------------------------------------------------------------------------------------------- evaluation

class OnnxCascadeModule:
    """The ONNX cascade seen as an exported model by messearch.evaluate: torch tensors in, torch tensors out,
    `.meta` (an ExportMeta) from cascade.json; inference itself runs in ONNX Runtime (CPU) through messearch.runtime."""

    def __init__(self, folder, threads: int | None = None):
        self.cascade = Cascade(folder, threads=threads or torch.get_num_threads())
        self.meta = ExportMeta.from_dict(self.cascade.meta)

    def to(self, device):
        if torch.device(device).type != "cpu":
            raise MessError(f"the ONNX cascade runs on ONNX Runtime's CPU provider here, not on {device}")
        return self

    def eval(self):
        return self

    def __call__(self, x: torch.Tensor):
        logits, exits, macs = self.cascade(x.detach().cpu().numpy())
        return torch.from_numpy(logits), torch.from_numpy(exits), torch.from_numpy(macs)
