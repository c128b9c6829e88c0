"""What to search (`SearchSpec`): candidate exits, thresholds, exit policy, mode, constraints on the front; and its
work items (`plan_items`), balanced over shards (`assign_shards`)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from .config import count_configs, tree_size
from .errors import MessError


EVALUATORS = ("auto", "kernel", "plain")   # the compiled kernels, search_plain's numpy, or by size


@dataclass
class SearchSpec:
    """What to search: candidate exits, thresholds, exit policy, mode, and optional constraints on the front."""

    positions: list[str]
    heads: list[str]
    thresholds: tuple[float, ...]
    max_exits: int = 3
    thresholds_mode: str = "shared"        # shared | per-exit
    mode: str = "cascade"                  # cascade | single (adds static truncations)
    policy_kind: str = "mean"              # mean | fraction
    pixel_threshold_bin: int | None = None
    max_gmacs: float | None = None
    max_latency_ms: dict[str, float] = field(default_factory=dict)
    min_miou: float | None = None
    max_miou_drop_pp: float | None = None
    # how, not what (the rows are the same): one of EVALUATORS; auto: plain numpy for a small space (search_plain)
    evaluator: str = "auto"
    # SearchSpec.from_space(space, ...) is added next to the Space class.

    @property
    def has_constraints(self) -> bool:
        return any(v is not None for v in (self.max_gmacs, self.min_miou, self.max_miou_drop_pp)) or bool(self.max_latency_ms)

    def validate(self) -> None:
        """Raise MessError naming the first field whose value is not allowed."""
        if self.thresholds_mode not in ("shared", "per-exit"):
            raise MessError(f"thresholds mode {self.thresholds_mode!r} is not allowed; use 'shared' or 'per-exit'")
        if self.mode not in ("cascade", "single"):
            raise MessError(f"search mode {self.mode!r} is not allowed; use 'cascade' or 'single'")
        if self.evaluator not in EVALUATORS:
            raise MessError(f"evaluator {self.evaluator!r} is not allowed; use one of {', '.join(EVALUATORS)}")
        if self.policy_kind not in ("mean", "fraction"):
            raise MessError(f"exit policy kind {self.policy_kind!r} is not allowed; use 'mean' or 'fraction'")
        if not self.positions or not self.heads:
            raise MessError("the search needs at least one candidate position and one head variant")
        if int(self.max_exits) < 1:
            raise MessError(f"max_exits {self.max_exits} must be at least 1 (more than the positions allow is capped)")
        thr = [float(t) for t in self.thresholds]
        if not thr or len(set(thr)) != len(thr) or not all(math.isfinite(t) for t in thr):
            raise MessError(f"thresholds {list(self.thresholds)} must be a non-empty list of distinct finite numbers")
        budgets = {"max_gmacs": self.max_gmacs, "min_miou": self.min_miou, "max_miou_drop_pp": self.max_miou_drop_pp}
        budgets.update({f"max_latency_ms[{d}]": v for d, v in self.max_latency_ms.items()})
        for name, value in budgets.items():
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise MessError(f"{name} {value!r} must be a finite number (or absent)")

    def n_configs(self) -> int:
        """Configurations in the space, the reference row excluded."""
        return count_configs(len(self.positions), len(self.heads), len(self.thresholds), int(self.max_exits),
                             self.thresholds_mode, self.mode, reference=False)


BOUNDARY_SLACK = 0.05   # a shard of whole trees may be this share larger or smaller than its share of the work


def plan_items(spec: SearchSpec) -> list[tuple]:
    """Work items with their size: ("tree", t_root, first_position, n_configs), plus ("static", n) in single mode."""
    p, h, t, k = len(spec.positions), len(spec.heads), len(spec.thresholds), int(spec.max_exits)
    shared = spec.thresholds_mode == "shared"
    items = []
    for t_root in range(t):
        for p1 in range(p):
            items.append(("tree", t_root, p1, tree_size(p - 1 - p1, h, t, k, shared)))
    if spec.mode == "single":
        items.append(("static", p * h))
    return items


def assign_shards(items: list[tuple], n_shards: int, whole_trees: bool = False) -> list[list[tuple]]:
    """Longest-processing-time assignment of items to n_shards (deterministic). Trees of one first position differ
    only in their first threshold, so each shard then takes a contiguous run of those thresholds (same loads):
    a tree carries its sums from one threshold to the next, which pays more the closer they are.

    whole_trees (shared thresholds): a tree's pass over its images serves all the thresholds it holds, so a tree
    split over shards repeats that pass (and its pair table); the items, position-major, are cut into n_shards
    contiguous runs of near-equal size instead, at whole trees where that costs little balance, which splits at
    most n_shards - 1 trees."""
    n_shards = max(1, int(n_shards))
    if whole_trees:
        return _contiguous_runs(items, n_shards)
    shards = [[] for _ in range(n_shards)]
    load = [0] * n_shards
    for item in sorted(items, key=lambda it: (-it[-1], it)):
        i = min(range(n_shards), key=lambda j: (load[j], j))
        shards[i].append(item)
        load[i] += item[-1]
    runs = {}
    for shard in shards:
        for it in shard:
            if it[0] == "tree":
                runs.setdefault(it[2], []).append(it[1])
    runs = {p: iter(sorted(ts)) for p, ts in runs.items()}
    return [[("tree", next(runs[it[2]]), *it[2:]) if it[0] == "tree" else it for it in shard] for shard in shards]


def _contiguous_runs(items: list[tuple], n_shards: int) -> list[list[tuple]]:
    """The items by (first position, threshold), static last, cut into n_shards runs: each run takes items while
    its size stays nearer its share of what is left (and while each later run can still have an item), or ends
    at the end of a whole tree instead where that keeps it within BOUNDARY_SLACK of its share."""
    seq = sorted(items, key=lambda it: (0, it[2], it[1]) if it[0] == "tree" else (1, 0, 0))
    sizes = [it[-1] for it in seq]
    cum = [0, *itertools.accumulate(sizes)]
    ends = [j for j in range(1, len(seq)) if seq[j][0] != "tree" or seq[j][2] != seq[j - 1][2]]   # a tree ends
    left, i, shards = cum[-1], 0, []
    for k in range(n_shards):
        runs_left = n_shards - k
        share, end = left / runs_left, i
        while end < len(seq) and (end == i or (cum[end] - cum[i] + sizes[end] / 2 <= share
                                               and len(seq) - end >= runs_left)):
            end += 1
        if runs_left > 1:   # a tree cut in two repeats its pass over the images and its pair table in both shards
            near = [(abs(cum[b] - cum[i] - share), b) for b in ends if i < b <= len(seq) - (runs_left - 1)
                    and abs(cum[b] - cum[i] - share) <= BOUNDARY_SLACK * share]
            end = min(near)[1] if near else end
        shards.append(seq[i:end])
        left -= cum[end] - cum[i]
        i = end
    return shards
