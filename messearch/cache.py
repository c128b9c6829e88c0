"""The cache of exact per-exit sufficient statistics over a split, and its in-memory form for the search."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class CacheArrays:
    """The whole cache as contiguous arrays (the form the search wants).

    Exit index e runs over the candidate exits in space order (position-major, then head variant order),
    and the final head is the last index E-1. Counts are int64; nothing the search sums is rounded.
    """

    image_ids: list[str]            # N
    positions: list[str]            # P candidate positions, in depth order
    heads: list[str]                # H head variant names, in space order
    tp: np.ndarray                  # int64 [N, E, C], E = P*H + 1
    pred: np.ndarray                # int64 [N, E, C]
    gt: np.ndarray                  # int64 [N, C]
    conf_mean: np.ndarray           # float64 [N, E] mean top-1 probability
    n_above: np.ndarray             # int64 [N, E, n_bins+1] pixels with top-1 >= k/n_bins
    n_pixels: np.ndarray            # int64 [N] pixels per image (the confidence denominator)
    meta: dict = field(default_factory=dict)  # checkpoint hash, space text, n_bins, ...

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def n_exits(self) -> int:
        """Number of candidate exits, final head excluded."""
        return len(self.positions) * len(self.heads)

    def exit_index(self, position: str, head: str) -> int:
        """Index of candidate exit (position, head) along the exit axis."""
        return self.positions.index(position) * len(self.heads) + self.heads.index(head)
