"""The MESS exit-head family: channel reduction, 3x3 conv-BN-ReLU layers, receptive-field enhancement,
a 1x1 classifier and bilinear upsampling to the input size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RFE_KINDS = ("none", "dilated", "aspp")


@dataclass(frozen=True)
class HeadSpec:
    """One head variant of a search space."""

    name: str
    reduction: int = 4          # the 1x1 conv divides the position's channels by this (1: no reduction conv)
    layers: int = 1             # number of 3x3 conv-BN-ReLU layers
    width: int | None = None    # channels of the head's convs; default: channels // reduction
    rfe: str = "none"           # receptive-field enhancement: none, dilated (3x3 layers dilated), aspp
    rates: tuple[int, ...] = (2, 4)  # dilation rates of 'dilated' layers (cycled) or of the ASPP branches

    def channels(self, in_channels: int) -> int:
        """Channels inside the head for a position with `in_channels` channels."""
        return self.width if self.width is not None else max(1, in_channels // self.reduction)


def _cbr(cin: int, cout: int, k: int, dilation: int = 1) -> list[nn.Module]:
    pad = dilation * (k // 2)
    return [nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class LightASPP(nn.Module):
    """A 1x1 branch and one dilated 3x3 branch per rate, concatenated and projected back to `channels`."""

    def __init__(self, channels: int, rates: tuple[int, ...]):
        super().__init__()
        branches = [nn.Sequential(*_cbr(channels, channels, 1))]
        branches += [nn.Sequential(*_cbr(channels, channels, 3, r)) for r in rates]
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(*_cbr(channels * len(branches), channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class ExitHead(nn.Module):
    """An exit head built from a HeadSpec for a position with `in_channels` channels."""

    def __init__(self, spec: HeadSpec, in_channels: int, num_classes: int):
        super().__init__()
        width = spec.channels(in_channels)
        body: list[nn.Module] = []
        if spec.reduction != 1 or width != in_channels:
            body += _cbr(in_channels, width, 1)
        for i in range(spec.layers):
            dilation = spec.rates[i % len(spec.rates)] if spec.rfe == "dilated" else 1
            body += _cbr(width, width, 3, dilation)
        if spec.rfe == "aspp":
            body.append(LightASPP(width, spec.rates))
        self.body = nn.Sequential(*body)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        """Logits at `size` (the input's height and width)."""
        out = self.classifier(self.body(x))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


def build_head(spec: HeadSpec, in_channels: int, num_classes: int) -> ExitHead:
    """The head of variant `spec` at a position with `in_channels` channels."""
    return ExitHead(spec, in_channels, num_classes)
