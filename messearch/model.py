"""The MESS network: a segmented torchvision backbone, every candidate exit head, and the original final head."""

from __future__ import annotations

import torch
from torch import nn

from .backbones import build_torchvision_model, flatten_backbone, run_final_head
from .heads import build_head
from .space import Space


class MESSNetwork(nn.Module):
    """Backbone + candidate exits + final head; one forward runs the backbone once and returns every exit's logits.

    Segment k runs the backbone units up to candidate position k; the last segment (maybe empty) runs the rest.
    Exits are ordered position-major, then in the space's head order: the cache's exit axis.
    """

    def __init__(self, space: Space, exits: list[tuple[str, str]] | None = None):
        super().__init__()
        self.space = space
        self.base = build_torchvision_model(space.model, space.num_classes, aux=False)
        self.units, self.taps = flatten_backbone(self.base)
        names = [u.name for u in self.units]
        self.positions = list(space.positions)
        pos_index = [names.index(p) for p in self.positions]
        self.bounds = [i + 1 for i in pos_index] + [len(self.units)]
        self.exits = exits if exits is not None else [(p, h.name) for p in self.positions for h in space.heads]
        shapes = feature_shapes(space.model, space.num_classes, space.input_size)
        self.heads = nn.ModuleList(
            build_head(space.head(h), shapes[p][0], space.num_classes) for p, h in self.exits)

    @property
    def n_segments(self) -> int:
        return len(self.bounds)

    def segment(self, k: int, x: torch.Tensor, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run segment k on x, storing any feature the final head reads into `taps`."""
        start = 0 if k == 0 else self.bounds[k - 1]
        for i in range(start, self.bounds[k]):
            x = self.units[i].module(x)
            for key, idx in self.taps.items():
                if idx == i:
                    taps[key] = x
        return x

    def forward_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """The backbone once: the feature at every candidate position, and the final head's inputs."""
        taps: dict[str, torch.Tensor] = {}
        feats = []
        for k in range(self.n_segments):
            x = self.segment(k, x, taps)
            if k < len(self.positions):
                feats.append(x)
        return feats, taps

    def final(self, taps: dict[str, torch.Tensor], size) -> torch.Tensor:
        """The original final head's logits at `size`."""
        return run_final_head(self.base, taps, size)

    def exit_logits(self, feats: list[torch.Tensor], size, indices: list[int] | None = None) -> list[torch.Tensor]:
        """Logits of the exits at `indices` (default: all), in that order, at `size`."""
        indices = range(len(self.exits)) if indices is None else indices
        return [self.heads[i](feats[self.positions.index(self.exits[i][0])], size) for i in indices]

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every exit's logits and the final head's logits, all at the input size."""
        size = x.shape[-2:]
        feats, taps = self.forward_features(x)
        return self.exit_logits(feats, size), self.final(taps, size)


def feature_shapes(model_name: str, num_classes: int, input_size) -> dict[str, tuple[int, int, int]]:
    """(channels, height, width) of the feature map after every backbone unit (on the meta device: no real work)."""
    with torch.device("meta"):
        base = build_torchvision_model(model_name, num_classes)
        x = torch.zeros(1, 3, *input_size)
    out = {}
    with torch.no_grad():
        for u in flatten_backbone(base)[0]:
            x = u.module(x)
            out[u.name] = tuple(int(d) for d in x.shape[1:])
    return out
