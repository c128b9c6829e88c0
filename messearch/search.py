"""The exact evaluator of early-exit configurations. What to search is search_spec; the rows of a shard's front
are shard_front; the drivers that run it are search_driver.

A cascade (e_1, t_1) .. (e_k, t_k) sends image i to the first exit whose confidence reaches its threshold.
Its confusion counts are the final head's totals plus, for each exit j, the sum over the images that
survive exits 1..j-1 of pass_j(i) * (X[i, e_j] - X[i, final]): exact int64 sums. Configurations are generated
depth first (a k-exit configuration extends a (k-1)-exit prefix) by compiled kernels (numba), which carry the
sums from one threshold to the next: as a threshold rises, the images that pass an exit form nested sets, so
every image enters each (prefix, new exit) pair's sums once, not once per threshold (search_shared: the one
threshold of all exits; search_per_exit: each exit's own). What both kernels share (a configuration's metrics
from its counts, the Pareto pre-filter, the output rows) is search_kernel. A small space skips the kernels' compile:
search_plain sums the same rows in numpy (SearchSpec.evaluator).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from . import metrics

from .cache_format import CacheArrays
from .config import KIND_CASCADE, KIND_REFERENCE, KIND_STATIC
from .cost_table import CostTable
from .errors import MessError
from .search_per_exit import eval_tree
from .search_plain import plain_blocks, use_plain
from .search_shared import eval_tree_shared
from .search_spec import SearchSpec


@dataclass
class Prepared:
    """The cache reduced to what the evaluator reads, for one spec and cost tables."""

    n: int
    n_classes: int
    positions: list[str]
    heads: list[str]
    thresholds: np.ndarray   # float64 [T]
    shared: bool
    max_exits: int
    fail: np.ndarray         # bool [N, E, T]: confidence < threshold
    xd: np.ndarray           # int64 [N, E, W]: tp, pred of the exit minus the final head's, then a 1 (exit counter)
    xt: np.ndarray           # [E, N, Wp]: xd exit-major and zero-padded, int32 where exact, the rows the kernels read
    count_dtype: type        # a configuration's counts in the shared kernel: int32 where every count fits, else int64
    base: np.ndarray         # int64 [W]: the final head's totals, counter 0
    gt: np.ndarray           # int64 [C] labelled pixels per class over the split
    costs: dict              # "macs" and "lat:<device>" -> (backbone_to[E], head[E], backbone_total, final)
    devices: list[str]
    plain: bool = False      # evaluate with search_plain (numpy), not the compiled kernels
    memo: dict = field(default_factory=dict, repr=False, compare=False)   # tables a kernel reuses across trees

    @property
    def n_exits(self) -> int:
        return len(self.positions) * len(self.heads)

    @property
    def width(self) -> int:
        return self.xd.shape[2]


def _cost_arrays(costs: CostTable, spec: SearchSpec, integer: bool, what: str):
    """Per candidate exit (position-major) the backbone cost to its position and its head cost."""
    for kind, names, mine in (("positions", costs.positions, spec.positions), ("heads", costs.heads, spec.heads)):
        missing = [x for x in mine if x not in list(names)]
        if missing:
            raise MessError(f"{what} cost table has no {kind} {missing}; it has {list(names)}")
    pi = [list(costs.positions).index(p) for p in spec.positions]
    hi = [list(costs.heads).index(h) for h in spec.heads]
    dtype = np.int64 if integer else np.float64
    bb = np.asarray(costs.backbone_to, dtype=dtype)[pi]
    hd = np.asarray(costs.head, dtype=dtype)[np.ix_(pi, hi)]
    conv = int if integer else float
    return (np.repeat(bb, len(hi)), hd.reshape(-1), conv(costs.backbone_total), conv(costs.final))


def exit_confidence(cache: CacheArrays, spec: SearchSpec, pixel_bin: int | None = None) -> np.ndarray:
    """float64 [N, E]: the image confidence of every candidate exit of the spec under its policy (the fraction
    policy at bin edge `pixel_bin` when given, else the spec's)."""
    ex = np.array([cache.exit_index(p, h) for p in spec.positions for h in spec.heads], dtype=np.int64)
    if spec.policy_kind == "mean":
        return np.asarray(cache.conf_mean, dtype=np.float64)[:, ex]
    nb = cache.n_above.shape[2] - 1
    b = spec.pixel_threshold_bin if pixel_bin is None else pixel_bin
    if b is None or not 0 <= int(b) <= nb:
        raise MessError(f"pixel_threshold_bin {b} must be an integer bin edge 0..{nb} for the 'fraction' policy")
    return cache.n_above[:, ex, int(b)].astype(np.float64) / cache.n_pixels.astype(np.float64)[:, None]


def prepare(cache: CacheArrays, spec: SearchSpec, macs: CostTable, latencies: dict | None = None) -> Prepared:
    """Check the cache against the spec and build the evaluator's arrays (float64 confidence, int64 counts)."""
    spec.validate()
    latencies = dict(latencies or {})
    for kind, mine, theirs in (("positions", spec.positions, cache.positions), ("heads", spec.heads, cache.heads)):
        missing = [x for x in mine if x not in list(theirs)]
        if missing:
            raise MessError(f"the cache has no candidate {kind} {missing} (it has {list(theirs)}): "
                            "was it made from another space or checkpoint?")
    ex = np.array([cache.exit_index(p, h) for p in spec.positions for h in spec.heads], dtype=np.int64)
    final = cache.tp.shape[1] - 1
    n, c = cache.gt.shape
    conf = exit_confidence(cache, spec)
    thr = np.asarray([float(t) for t in spec.thresholds], dtype=np.float64)
    fail = conf[:, :, None] < thr[None, None, :]
    x = np.concatenate([cache.tp, cache.pred], axis=2).astype(np.int64)
    diff = x[:, ex, :] - x[:, final:final + 1, :]
    xd = np.concatenate([diff, np.ones((n, len(ex), 1), dtype=np.int64)], axis=2)
    base = np.concatenate([x[:, final, :].sum(axis=0), [0]]).astype(np.int64)
    wide = _check_exact(diff)
    # a configuration's counts are base plus some images' rows: within max|base| + the rows' bound
    narrow = not wide and int(np.abs(base).max(initial=0)) + int(np.abs(diff).max(axis=(1, 2)).sum(initial=0)) + n < 2 ** 31
    if macs.unit != "macs":
        raise MessError(f"the MAC cost table has unit {macs.unit!r}; expected 'macs'")
    costs = {"macs": _cost_arrays(macs, spec, True, "the MAC")}
    for dev, table in sorted(latencies.items()):
        costs[f"lat:{dev}"] = _cost_arrays(table, spec, False, f"device {dev!r} latency")
    unknown = sorted(set(spec.max_latency_ms) - set(latencies))
    if unknown:
        raise MessError(f"latency constraints name devices {unknown} without a profile; profiled: {sorted(latencies)}")
    return Prepared(n=n, n_classes=c, positions=list(spec.positions), heads=list(spec.heads), thresholds=thr,
                    shared=spec.thresholds_mode == "shared", max_exits=min(int(spec.max_exits), len(spec.positions)), fail=fail,
                    xd=xd, xt=_kernel_rows(xd, wide), count_dtype=np.int32 if narrow else np.int64, base=base, gt=cache.gt.sum(axis=0).astype(np.int64),
                    costs=costs, devices=sorted(latencies), plain=use_plain(spec, n))


def _check_exact(diff: np.ndarray) -> bool:
    """MessError unless every sum of counts is an integer below 2**53 (exact in float64, as the metrics need);
    whether a sum of some images' rows can pass int32 (the kernels then add in int64)."""
    bound = int(np.maximum(np.abs(diff).max(axis=(1, 2)), 1).sum()) if diff.size else 1   # >= 1: the exit counter
    if bound >= 2 ** 53:
        raise MessError(f"pixel counts too large for exact sums ({bound}); use a smaller split per cache")
    return bound >= 2 ** 31


def _kernel_rows(xd: np.ndarray, wide: bool) -> np.ndarray:
    """[E, N, Wp]: xd exit-major, zero-padded to a multiple of 16 columns, int32 unless `wide`."""
    n, e, w = xd.shape
    out = np.zeros((e, n, -(-w // 16) * 16), np.int64 if wide else np.int32)
    out[:, :, :w] = xd.transpose(1, 0, 2)
    return out


# ----------------------------------------------------------------------------------------- metrics of blocks

def _cost_sum(exits: np.ndarray, n_at: np.ndarray, n_final: np.ndarray, table) -> np.ndarray:
    """Sum over images of their cost: sum_j n_j*(backbone_to[p_j] + h_1+..+h_j) + n_F*((total + h_1+..+h_k) + final).

    Heads and terms are added left to right in this order; brute-force evaluations must follow it for latency floats.
    """
    bb, hd, total, final = table
    acc = np.zeros(len(n_final), dtype=bb.dtype)
    h = np.zeros(len(n_final), dtype=bb.dtype)
    for j in range(exits.shape[1]):
        h = h + hd[exits[:, j]]
        acc = acc + n_at[:, j] * (bb[exits[:, j]] + h)
    return acc + n_final * ((total + h) + final)


def block_metrics(prep: Prepared, kind: int, exits, tidx, counts, n_at) -> dict:
    """Metrics of M configurations of one kind and exit number from their exact counts; a dict of arrays ("rows")."""
    m, k = exits.shape
    c = prep.n_classes
    tp, pred = counts[:, :c], counts[:, c:2 * c]
    n_final = prep.n - n_at.sum(axis=1)
    rows = {
        "kind": np.full(m, kind, dtype=np.int8), "n_exits": np.full(m, k, dtype=np.int8),
        "exits": pad_columns(exits, prep.max_exits, -1), "tidx": pad_columns(tidx, prep.max_exits, -1),
        "n_at": pad_columns(n_at, prep.max_exits, 0), "n_final": n_final.astype(np.int64),
        "miou": metrics.miou_from_counts(tp, pred, prep.gt), "pixel_acc": metrics.pixel_accuracy(tp, prep.gt),
    }
    rows["macsum"] = _cost_sum(exits, n_at, n_final, prep.costs["macs"])
    rows["mean_gmacs"] = rows["macsum"] / prep.n / 1e9
    for dev in prep.devices:
        rows[f"lat_{dev}"] = _cost_sum(exits, n_at, n_final, prep.costs[f"lat:{dev}"]) / prep.n
    return rows


def pad_columns(a: np.ndarray, width: int, value) -> np.ndarray:
    """[M, k] int64 padded with `value` to [M, width] (rows of different exit counts share one array)."""
    out = np.full((a.shape[0], width), value, dtype=np.int64)
    out[:, :a.shape[1]] = a
    return out


def reference_rows(prep: Prepared) -> dict:
    """The original model: every image runs to the final head, no early exit."""
    counts = prep.base[None, :]
    empty = np.zeros((1, 0), dtype=np.int64)
    return block_metrics(prep, KIND_REFERENCE, empty, empty, counts, empty)


def static_rows(prep: Prepared) -> dict:
    """Static truncations (mode 'single'): one exit every image takes, the rest of the network pruned."""
    e = prep.n_exits
    counts = prep.base[None, :] + prep.xd.sum(axis=0)
    exits = np.arange(e)[:, None]
    return block_metrics(prep, KIND_STATIC, exits, np.zeros((e, 1), dtype=np.int64), counts,
                         np.full((e, 1), prep.n, dtype=np.int64))


def evaluate_items(prep: Prepared, items: list[tuple], sink, progress=None) -> None:
    """Run the evaluator over a shard's work items (a tree per first position with its items' thresholds, then
    static rows): the compiled kernels, or search_plain's numpy for a small space."""
    trees = defaultdict(list)
    for it in items:
        if it[0] == "tree":
            trees[it[2]].append((it[1], it[2]))
        else:
            sink.add(static_rows(prep))
    for key in sorted(trees):
        if prep.plain:   # every row to the sink, which keeps the front
            for exits, tidx, counts, n_at in plain_blocks(prep, trees[key]):
                sink.add(block_metrics(prep, KIND_CASCADE, exits, tidx, counts, n_at))
        else:
            (eval_tree_shared if prep.shared else eval_tree)(prep, trees[key], sink)
        if progress is not None:
            progress(sink)
