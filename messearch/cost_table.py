"""`CostTable`: the per-image cost of a MESS network's parts (MACs from `costs`, or latencies from `profile`).
No torch here: the search's trials receive cost tables and must not import the cost model to read them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CostTable:
    """Per-image cost of the parts of a MESS network: MACs (ints) or profiled latency (ms)."""

    positions: list[str]
    heads: list[str]
    backbone_to: np.ndarray      # [P] from the input to the output of position p, cumulative
    backbone_total: float        # the whole backbone
    head: np.ndarray             # [P, H] each candidate head
    final: float                 # the original final head
    unit: str = "macs"

    def segment(self, k: int) -> float:
        """Cost of segment k alone (the last segment runs from the last position to the backbone's end)."""
        prev = self.backbone_to[k - 1] if k > 0 else 0
        end = self.backbone_to[k] if k < len(self.positions) else self.backbone_total
        return end - prev

    @property
    def reference(self) -> float:
        """The original model as deployed: the whole backbone plus the final head."""
        return self.backbone_total + self.final
