"""A configuration: its type, kind names, stable id, display string, and how many a space holds.

A configuration is an ordered list of early exits (position, head variant, threshold) in depth order,
followed by the final head; its kind says whether it is the original model (reference), a cascade of
dynamic exits, or a static truncation (one exit every image takes, the final head pruned). The evaluator
stores the kind as a small int (KIND_*), files and the exported model as its name (KIND_NAMES).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

KIND_REFERENCE, KIND_CASCADE, KIND_STATIC = 0, 1, 2
KIND_NAMES = {KIND_REFERENCE: "reference", KIND_CASCADE: "cascade", KIND_STATIC: "static"}
KINDS = tuple(KIND_NAMES.values())


def config_id(kind: str, positions, heads, thresholds) -> str:
    """Stable id: "reference", or "c" + 10 hex of sha1("{kind};" + ";".join("{pos}/{head}@{thr!r}"))."""
    if kind == "reference":
        return "reference"
    text = f"{kind};" + ";".join(f"{p}/{h}@{float(t)!r}" for p, h, t in zip(positions, heads, thresholds))
    return "c" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


def exits_text(positions, heads, thresholds, sep: str = ", ", short: bool = False, none: str = "none") -> str:
    """The exits as `position/head@threshold` joined by `sep` (short: without the `backbone.` prefix)."""
    parts = [f"{p.removeprefix('backbone.') if short else p}/{h}@{float(t):g}"
             for p, h, t in zip(positions, heads, thresholds)]
    return sep.join(parts) or none


@dataclass(frozen=True)
class Config:
    """One configuration: its kind, early exits in depth order (position, head) and their thresholds."""

    kind: str
    positions: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    thresholds: tuple[float, ...] = ()

    @classmethod
    def from_row(cls, row) -> "Config":
        """The configuration of a pareto.parquet row (a dict or pandas Series)."""
        kind = str(row["kind"]) if "kind" in row else ("reference" if bool(row["is_reference"]) else "cascade")
        return cls(kind, tuple(str(p) for p in row["positions"]), tuple(str(h) for h in row["heads"]),
                   tuple(float(t) for t in row["thresholds"]))

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """The configuration of its to_dict() form (the exported model's metadata)."""
        return cls(str(d["kind"]), tuple(d["positions"]), tuple(d["heads"]), tuple(float(t) for t in d["thresholds"]))

    def to_dict(self) -> dict:
        """Plain lists and strings (JSON and weights_only-safe)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def n_exits(self) -> int:
        return len(self.positions)

    @property
    def config_id(self) -> str:
        return config_id(self.kind, self.positions, self.heads, self.thresholds)

    def exits_text(self, sep: str = ", ", short: bool = False, none: str = "none") -> str:
        """The exits as `position/head@threshold` (see config.exits_text)."""
        return exits_text(self.positions, self.heads, self.thresholds, sep, short, none)


# ------------------------------------------------------------------------------------------------- counting

def tree_size(n_later: int, n_heads: int, n_thresholds: int, max_exits: int, shared: bool = True) -> int:
    """Cascades whose first exit is one given position with one given threshold, when `n_later` deeper positions
    can follow: the head of the first exit, then up to max_exits-1 more exits (each its own threshold if not shared)."""
    per_exit = 1 if shared else n_thresholds
    return n_heads * sum(math.comb(n_later, j) * (n_heads * per_exit) ** j for j in range(int(max_exits)))


def count_configs(n_positions: int, n_heads: int, n_thresholds: int, max_exits: int,
                  thresholds_mode: str = "shared", mode: str = "cascade", reference: bool = True) -> int:
    """Configurations the search evaluates: cascades of 1..max_exits exits (a tree per first position and
    threshold, see tree_size), the static truncations in 'single' mode, and (reference=True) the reference."""
    shared = thresholds_mode == "shared"
    total = n_thresholds * sum(tree_size(n_positions - 1 - p, n_heads, n_thresholds, max_exits, shared)
                               for p in range(n_positions))
    if mode == "single":
        total += n_positions * n_heads
    return total + (1 if reference else 0)
