"""The deployable model of one front row: only the backbone units, exit heads and final head it uses, with
dynamic early exits (a confident image stops; the deeper segments never run for it), saved and loaded safely.

Export file (`torch.save`, loadable with weights_only=True): {format, the ExportMeta fields (export_meta.py),
versions, state_dict (the pruned modules only)}. With `torchscript=True` the file is instead a TorchScript
archive (`torch.jit.load` alone runs it) carrying the same metadata as the extra file `messearch.json`.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn
import torch.nn.functional as F
from torchvision.models.segmentation import LRASPP

from . import __version__, stats
from .checkpoint import load_checkpoint
from .config import KINDS, Config
from .costs import mac_table, unit_macs
from .data import class_names as data_class_names
from .errors import MessError
from .export_meta import ExportMeta
from .files import atomic_path, atomic_write_bytes, load_weights_only, sha256_file
from .front import read_front
from .model import MESSNetwork
from .provenance import check_built_policy, policy_to_build
from .space import PolicySpec, Space, space_from_text

FORMAT = "messearch/mess-export-v1"
EXTRA_FILE = "messearch.json"


# ----------------------------------------------------------------------------------------- scriptable parts

class ExportHead(nn.Module):
    """An exit head's modules (the same ops as heads.ExitHead) with a TorchScript-typed forward."""

    def __init__(self, body: nn.Module, classifier: nn.Module):
        super().__init__()
        self.body = body
        self.classifier = classifier

    def forward(self, x: torch.Tensor, size: List[int]) -> torch.Tensor:
        out = self.classifier(self.body(x))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


class NoHead(nn.Module):
    """Placeholder of a stage without an exit (never called)."""

    def forward(self, x: torch.Tensor, size: List[int]) -> torch.Tensor:
        return x


class FinalOut(nn.Module):
    """The original head of DeepLabV3 / FCN: classifier on the backbone's 'out' feature, then upsampling (as
    backbones.run_final_head)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, taps: Dict[str, torch.Tensor], size: List[int]) -> torch.Tensor:
        return F.interpolate(self.classifier(taps["out"]), size=size, mode="bilinear", align_corners=False)


class FinalDict(FinalOut):
    """The original head of LR-ASPP, which reads several tapped features."""

    def forward(self, taps: Dict[str, torch.Tensor], size: List[int]) -> torch.Tensor:
        return F.interpolate(self.classifier(taps), size=size, mode="bilinear", align_corners=False)


class NoFinal(nn.Module):
    """Placeholder of a pruned final head (static configurations; never called)."""

    def forward(self, taps: Dict[str, torch.Tensor], size: List[int]) -> torch.Tensor:
        return torch.zeros(0)


class Stage(nn.Module):
    """Consecutive backbone units, optionally followed by an exit head; records what the MAC counter needs."""

    def __init__(self, units: list[nn.Module], head: nn.Module, exit_id: int, threshold: float, seg_macs: int,
                 head_macs: int, tap: str):
        super().__init__()
        self.units = nn.Sequential(*units)
        self.head = head
        self.has_exit = exit_id >= 0
        self.exit_id = int(exit_id)
        self.threshold = float(threshold)
        self.seg_macs = int(seg_macs)
        self.head_macs = int(head_macs)
        self.tap = tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(x)


class DynamicExitModel(nn.Module):
    """A pruned MESS configuration with dynamic exits: `model(x) -> (logits [B,C,H,W], exit_index [B], macs [B])`.

    Stages run in order on the images still in the batch; after each exit the images whose confidence reaches
    the threshold are written out (in input order) and removed. exit_index k (= n_exits) is the final head.
    """

    __jit_ignored_attributes__ = ["meta"]

    def __init__(self, stages: list[Stage], final: nn.Module, final_macs: int, n_exits: int, num_classes: int,
                 static: bool, policy_kind: str, pixel_bin: int, n_bins: int, meta: ExportMeta):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.final = final
        self.has_final = not isinstance(final, NoFinal)
        self.final_macs = int(final_macs)
        self.n_exits = int(n_exits)
        self.num_classes = int(num_classes)
        self.static = bool(static)
        self.policy_kind = policy_kind
        self.pixel_bin = int(pixel_bin)
        self.n_bins = int(n_bins)
        self.meta = meta  # not part of the TorchScript program

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """Image-level confidence, float64 [B]; the same functions (and so the same bits) as stats.image_confidence."""
        top1 = stats.top1_confidence(logits)
        if self.policy_kind == "mean":
            return stats.mean_confidence(top1)
        above = stats.count_above(top1, self.n_bins)[:, self.pixel_bin]
        return above.double() / (top1.shape[1] * top1.shape[2])

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        size = [int(x.shape[2]), int(x.shape[3])]
        dev = x.device
        out = torch.zeros([b, self.num_classes, size[0], size[1]], dtype=x.dtype, device=dev)
        exit_out = torch.full([b], self.n_exits, dtype=torch.long, device=dev)
        macs_out = torch.zeros([b], dtype=torch.long, device=dev)
        idx = torch.arange(b, device=dev)          # input position of each image still running
        macs = torch.zeros([b], dtype=torch.long, device=dev)
        taps: Dict[str, torch.Tensor] = {}
        h = x
        for stage in self.stages:
            if h.shape[0] > 0:
                h = stage(h)
                macs = macs + stage.seg_macs
                if stage.tap != "":
                    taps[stage.tap] = h
                if stage.has_exit:
                    logits = stage.head(h, size)
                    macs = macs + stage.head_macs
                    if self.static:
                        leave = torch.ones([h.shape[0]], dtype=torch.bool, device=dev)
                    else:
                        leave = self.confidence(logits) >= stage.threshold   # float64 compare, as the search
                    n_leave = int(leave.sum())
                    if n_leave > 0:
                        gone = leave.nonzero().squeeze(1)
                        dest = idx.index_select(0, gone)
                        out.index_copy_(0, dest, logits.index_select(0, gone).to(out.dtype))
                        exit_out.index_fill_(0, dest, stage.exit_id)
                        macs_out.index_copy_(0, dest, macs.index_select(0, gone))
                        # compact the batch: the images that left are not computed any further
                        stay = (~leave).nonzero().squeeze(1)
                        h = h.index_select(0, stay)
                        idx = idx.index_select(0, stay)
                        macs = macs.index_select(0, stay)
                        for key in list(taps.keys()):
                            taps[key] = taps[key].index_select(0, stay)
        if self.has_final and h.shape[0] > 0:
            logits = self.final(taps, size)
            out.index_copy_(0, idx, logits.to(out.dtype))
            macs_out.index_copy_(0, idx, macs + self.final_macs)
        return out, exit_out, macs_out


# --------------------------------------------------------------------------------------------- building

def _policy_dict(policy) -> dict:
    return {"kind": policy.kind, "pixel_threshold_bin": policy.pixel_threshold_bin, "n_bins": int(policy.n_bins)}


def check_config(space: Space, config: Config, exits: list[tuple[str, str]]) -> None:
    """Raise MessError if the configuration does not fit the network (unknown exit, wrong order, bad kind)."""
    if config.kind not in KINDS:
        raise MessError(f"configuration kind {config.kind!r} is not allowed; allowed: {', '.join(KINDS)}")
    k = config.n_exits
    if len(config.heads) != k or len(config.thresholds) != k:
        raise MessError(f"configuration has {k} positions, {len(config.heads)} heads and {len(config.thresholds)} "
                        "thresholds; they must be equal in number")
    if (config.kind == "reference") != (k == 0) or (config.kind == "static" and k != 1):
        raise MessError(f"a {config.kind} configuration cannot have {k} exits (reference: 0, static: 1, cascade: >= 1)")
    for p, h in zip(config.positions, config.heads):
        if (p, h) not in exits:
            raise MessError(f"exit {p}/{h} is not in the checkpoint (it has {len(exits)} candidate exits, "
                            f"e.g. {['/'.join(e) for e in exits[:4]]})")
    depth = [list(space.positions).index(p) for p in config.positions]
    if depth != sorted(set(depth)):
        raise MessError(f"exit positions {list(config.positions)} must be distinct and in depth order")


def export_config(net, space: Space, config: Config, provenance: dict | None = None, policy=None,
                  class_names=None) -> DynamicExitModel:
    """The pruned dynamic-exit model of `config` (copies of the modules it uses; `net` is left untouched).

    `policy` (a PolicySpec, default the space's) is the exit policy the search assumed; `class_names` default to
    those of the space's data set.
    """

    check_config(space, config, [tuple(e) for e in net.exits])
    policy = policy or space.policy
    names = [u.name for u in net.units]
    keep_final = config.kind != "static"
    exit_units = [names.index(p) for p in config.positions]
    last = len(names) - 1 if keep_final else exit_units[-1]
    taps = {idx: key for key, idx in net.taps.items()} if keep_final else {}
    cuts = sorted(set(exit_units) | set(taps) | {last})
    size = tuple(space.input_size)
    umacs, final_macs, table = _mac_pieces(space)
    stages, start, seg_list, head_list = [], 0, [], []
    for c in cuts:
        units = [copy.deepcopy(net.units[i].module) for i in range(start, c + 1)]
        seg = int(sum(umacs[start:c + 1]))
        head, exit_id, thr, hm = NoHead(), -1, 0.0, 0
        if c in exit_units:
            j = exit_units.index(c)
            p, hname = config.positions[j], config.heads[j]
            src = net.heads[[tuple(e) for e in net.exits].index((p, hname))]
            head = ExportHead(copy.deepcopy(src.body), copy.deepcopy(src.classifier))
            exit_id, thr = j, float(config.thresholds[j])
            hm = int(table.head[list(space.positions).index(p), space.head_names.index(hname)])
            head_list.append(hm)
        stages.append(Stage(units, head, exit_id, thr, seg, hm, taps.get(c, "")))
        seg_list.append(seg)
        start = c + 1
    if keep_final:
        cls = FinalDict if isinstance(net.base, LRASPP) else FinalOut
        final = cls(copy.deepcopy(net.base.classifier))
    else:
        final, final_macs = NoFinal(), 0
    costs = {"input_size": list(size), "segments": seg_list, "heads": head_list, "final": int(final_macs),
             "reference": int(table.reference), "backbone_total": int(table.backbone_total)}
    meta = ExportMeta(space_text=space.text, space_source=space.source, model=space.model, config=config,
                      policy=_policy_dict(policy), costs=costs, provenance=dict(provenance or {}),
                      num_classes=space.num_classes, ignore_index=space.ignore_index, input_size=list(size),
                      class_names=list(class_names) if class_names else data_class_names(space.data, space.num_classes))
    model = DynamicExitModel(stages, final, final_macs, config.n_exits, space.num_classes, config.kind == "static",
                             policy.kind, -1 if policy.pixel_threshold_bin is None else policy.pixel_threshold_bin,
                             policy.n_bins, meta)
    return model.eval()


@functools.lru_cache(maxsize=16)
def _mac_pieces(space: Space):
    """MACs of every backbone unit, of the final head, and the space's MAC table, at its input size (counted once)."""
    _, umacs, final_macs = unit_macs(space.model, space.num_classes, tuple(space.input_size))
    return umacs, final_macs, mac_table(space, tuple(space.input_size))


# ------------------------------------------------------------------------------------------ save and load

def save_exported(model: DynamicExitModel, path, torchscript: bool = False) -> str:
    """Write the model atomically: the messearch format, or (torchscript=True) a TorchScript archive."""
    if torchscript:
        scripted = script_model(model)
        with atomic_path(path) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files={EXTRA_FILE: json.dumps(_json_meta(model))})
        return str(path)
    payload = {"format": FORMAT, **model.meta.to_dict(),
               "versions": {"messearch": __version__, "torch": str(torch.__version__)},
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    return str(path)


def _json_meta(model: DynamicExitModel) -> dict:
    return {"format": FORMAT + "+torchscript", **model.meta.to_dict()}


def script_model(model: DynamicExitModel) -> torch.jit.ScriptModule:
    """torch.jit.script of the dynamic model (the deprecation warning of TorchScript is silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(model)


def is_torchscript_file(path) -> bool:
    """True when `path` is a TorchScript archive (it has a code/ folder), not a torch.save file."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_exported(path, map_location="cpu"):
    """The exported model at `path`: a DynamicExitModel (eval mode), or for a TorchScript export the
    ScriptModule with its metadata as `.meta`. A file that is not an export gives a MessError."""
    if is_torchscript_file(path):
        extra = {EXTRA_FILE: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                m = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
            meta = json.loads(extra[EXTRA_FILE] or "{}")
        except Exception as e:
            raise MessError(f"{path}: not a loadable TorchScript export ({type(e).__name__}: {e})") from None
        if not str(meta.get("format", "")).startswith(FORMAT):
            raise MessError(f"{path}: a TorchScript file but not a messearch export (no {EXTRA_FILE} of format {FORMAT!r})")
        m.meta = ExportMeta.from_dict(meta)
        return m.eval()
    payload = load_weights_only(path, "messearch exported model", map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        what = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise MessError(f"{path}: not a messearch exported model (format {what!r}; expected {FORMAT!r}; "
                        "make one with `messearch export`)")
    space = space_from_text(payload["space_text"], payload.get("space_source") or f"{path}:space")
    config = Config.from_dict(payload["config"])
    pol = payload["policy"]
    nb, pb = int(pol["n_bins"]), pol["pixel_threshold_bin"]
    policy = PolicySpec(kind=pol["kind"], pixel_threshold=None if pb is None else pb / nb, n_bins=nb)
    with torch.device("meta"):  # build the skeleton without allocating or initialising weights
        net = MESSNetwork(space, exits=list(zip(config.positions, config.heads)))
        model = export_config(net, space, config, payload["provenance"], policy, payload.get("class_names"))
    try:
        model.load_state_dict(payload["state_dict"], strict=True, assign=True)
    except RuntimeError as e:
        raise MessError(f"{path}: weights do not match the exported configuration ({e})") from None
    return model.eval()


# --------------------------------------------------------------------------------------- from a front row

def build_export(checkpoint, front_path, config_id: str) -> DynamicExitModel:
    """The pruned model of row `config_id` of the front at `front_path`, checked to come from `checkpoint`."""
    df, meta = read_front(front_path)
    if not _exists(checkpoint):
        raise MessError(f"{checkpoint}: checkpoint not found")
    sha = sha256_file(checkpoint)
    want = meta.get("checkpoint_sha256")
    if not want:
        raise MessError(f"{front_path}: the front records no checkpoint_sha256; cannot check it was made from {checkpoint}")
    if want != sha:
        raise MessError(f"{front_path} was made from another checkpoint (sha256 {want[:12]}...) than {checkpoint} "
                        f"(sha256 {sha[:12]}...); export with the checkpoint the front was searched on")
    rows = df[df["config_id"] == config_id]
    if rows.empty:
        ids = list(df["config_id"])
        raise MessError(f"config id {config_id!r} is not in {front_path} ({len(ids)} rows; e.g. {', '.join(ids[:5])})")
    row = rows.iloc[0]
    config = Config.from_row(row)
    net, space, info = load_checkpoint(checkpoint)
    policy = policy_to_build(meta, space.policy, front_path)   # the policy the search read, checked
    provenance = {"config_id": config_id, "checkpoint": str(checkpoint), "checkpoint_sha256": sha,
                  "front": str(front_path), "cache_sha256": meta.get("cache_sha256", ""), "predicted": predicted(row)}
    names = data_class_names(info.get("data") or space.data, space.num_classes)   # the data it was trained on
    model = export_config(net, space, config, provenance, policy, names)
    check_built_policy(model.meta.policy, policy, front_path)
    return model


def predicted(row) -> dict:
    """What a front row predicts for its exported model (recorded in the export's provenance), in plain values."""
    return {k: _plain(row[k]) for k in row.index if k in ("miou", "pixel_acc", "mean_gmacs", "exit_rates", "speedup",
                                                          "miou_delta_pp") or k.startswith("latency_ms_")}


def export_model(checkpoint, front_path, config_id: str, out, torchscript: bool = False) -> str:
    """Export row `config_id` of the front at `front_path`, made from `checkpoint`, to `out`; returns the path."""
    return save_exported(build_export(checkpoint, front_path, config_id), out, torchscript)


def _exists(path) -> bool:
    return Path(path).is_file()


def _plain(v):
    """A JSON/pickle-safe Python value of a pandas cell (numpy scalars and arrays become floats and lists)."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, list):
        return [float(x) for x in v]
    return float(v)
