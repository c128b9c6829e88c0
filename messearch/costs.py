"""Exact cost model: MACs and parameters of every backbone segment, candidate head and the final head.

MACs are counted with PyTorch's own FlopCounterMode (FLOPs / 2, the convention of torchvision's published
GFLOPS), on the meta device, so even ResNet-101 at full resolution costs no real computation.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .backbones import build_torchvision_model, flatten_backbone, run_final_head
from .cost_table import CostTable  # noqa: F401  (defined without torch: search trials unpickle it)
from .heads import build_head
from .model import feature_shapes
from .space import Space


def count_macs(fn, *args) -> int:
    """MACs of one call, counted by FlopCounterMode (FLOPs / 2)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops() // 2


def _meta_model(model_name: str, num_classes: int, aux: bool = False):
    with torch.device("meta"):
        return build_torchvision_model(model_name, num_classes, aux=aux).eval()


def model_macs(model_name: str, num_classes: int, input_size, aux: bool = False) -> int:
    """MACs of the unmodified torchvision model's forward (with its auxiliary classifier when `aux`)."""
    model = _meta_model(model_name, num_classes, aux)
    return count_macs(model, torch.zeros(1, 3, *input_size, device="meta"))


def unit_macs(model_name: str, num_classes: int, input_size) -> tuple[list[str], list[int], int]:
    """MACs of every backbone unit in order, and of the final head, at `input_size`."""
    model = _meta_model(model_name, num_classes)
    units, taps = flatten_backbone(model)
    x = torch.zeros(1, 3, *input_size, device="meta")
    names, macs, tapped = [], [], {}
    for i, u in enumerate(units):
        names.append(u.name)
        macs.append(count_macs(u.module, x))
        with torch.no_grad():
            x = u.module(x)
        for key, idx in taps.items():
            if idx == i:
                tapped[key] = x
    final = count_macs(run_final_head, model, tapped, tuple(input_size))
    return names, macs, final


def head_macs(space: Space, input_size=None) -> np.ndarray:
    """MACs of every candidate head [P, H] at `input_size` (default: the space's)."""
    size = tuple(input_size or space.input_size)
    shapes = feature_shapes(space.model, space.num_classes, size)
    out = np.zeros((len(space.positions), len(space.heads)), dtype=np.int64)
    for p, pos in enumerate(space.positions):
        for h, spec in enumerate(space.heads):
            out[p, h] = _head_macs(spec, shapes[pos], space.num_classes, size)
    return out


@functools.lru_cache(maxsize=4096)
def _head_macs(spec, feature_shape, num_classes, size) -> int:
    # Many positions share a feature shape (every block of a ResNet stage): count each (head, shape) once.
    with torch.device("meta"):
        head = build_head(spec, feature_shape[0], num_classes).eval()
    return count_macs(head, torch.zeros(1, *feature_shape, device="meta"), size)


def mac_table(space: Space, input_size=None) -> CostTable:
    """The exact MACs cost table of a space's network at `input_size` (default: the space's)."""
    size = tuple(input_size or space.input_size)
    names, macs, final = unit_macs(space.model, space.num_classes, size)
    cumulative = np.cumsum(np.asarray(macs, dtype=np.int64))
    backbone_to = np.array([cumulative[names.index(p)] for p in space.positions], dtype=np.int64)
    return CostTable(positions=list(space.positions), heads=space.head_names, backbone_to=backbone_to,
                     backbone_total=int(cumulative[-1]), head=head_macs(space, size), final=int(final), unit="macs")


def param_counts(net) -> dict:
    """Parameters of the backbone, the final head and each candidate head of a built MESSNetwork."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "backbone": count(net.base.backbone),
        "final_head": count(net.base.classifier),
        "heads": {f"{p}/{h}": count(m) for (p, h), m in zip(net.exits, net.heads)},
    }

