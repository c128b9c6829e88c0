"""The exact, vectorised evaluator of early-exit configurations (the drivers that run it are in search_driver).

A cascade (e_1, t_1) .. (e_k, t_k) sends image i to the first exit whose confidence reaches its threshold.
Its confusion counts are the final head's totals plus, for each exit j, the sum over the images that
survive exits 1..j-1 of pass_j(i) * (X[i, e_j] - X[i, final]). For many prefixes at once that sum is one
matrix product  survivors[rows, N] @ D[N, exits x thresholds x counts]  of 0/1 by integer entries: BLAS
does the work, and the result is exact because every partial sum is an integer far below 2**53 (float64)
or, when the data allow it, below 2**24 (float32). Configurations are generated level by level
(a k-exit configuration extends a (k-1)-exit prefix), so no configuration is ever handled by Python alone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import stats

from .cache_format import CacheArrays
from .config import KIND_CASCADE, KIND_REFERENCE, KIND_STATIC, count_configs
from .errors import MessError
from .pareto import nondominated_mask

if TYPE_CHECKING:  # the cost model imports torchvision; trials only need the table's fields
    from .costs import CostTable

# Rate the size estimate assumes (configurations per second per core), measured on the reference space.
ASSUMED_RATE_PER_CORE = 1_000_000


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
        if self.policy_kind not in ("mean", "fraction"):
            raise MessError(f"exit policy kind {self.policy_kind!r} is not allowed; use 'mean' or 'fraction'")
        if not self.positions or not self.heads:
            raise MessError("the search needs at least one candidate position and one head variant")
        if int(self.max_exits) < 1:
            raise MessError(f"max_exits {self.max_exits} must be at least 1 (more than the positions allow is capped)")
        thr = [float(t) for t in self.thresholds]
        if not thr or len(set(thr)) != len(thr) or not all(math.isfinite(t) for t in thr):
            raise MessError(f"thresholds {list(self.thresholds)} must be a non-empty list of distinct finite numbers")

    def n_configs(self) -> int:
        """Configurations in the space, the reference row excluded."""
        return count_configs(len(self.positions), len(self.heads), len(self.thresholds), int(self.max_exits),
                             self.thresholds_mode, self.mode, reference=False)


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
    xd: np.ndarray           # [N, E, W]: tp, pred of the exit minus the final head's, then a 1 (exit counter)
    base: np.ndarray         # int64 [W]: the final head's totals, counter 0
    gt: np.ndarray           # int64 [C] labelled pixels per class over the split
    costs: dict              # "macs" and "lat:<device>" -> (backbone_to[E], head[E], backbone_total, final)
    devices: list[str]
    chunks: list = field(default_factory=list)   # image runs summed exactly in xd's dtype (see _image_chunks)

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
    if spec.policy_kind == "mean":
        conf = np.asarray(cache.conf_mean, dtype=np.float64)[:, ex]
    else:
        nb = cache.n_above.shape[2] - 1
        b = spec.pixel_threshold_bin
        if b is None or not 0 <= int(b) <= nb:
            raise MessError(f"pixel_threshold_bin {b} must be an integer bin edge 0..{nb} for the 'fraction' policy")
        conf = cache.n_above[:, ex, int(b)].astype(np.float64) / cache.n_pixels.astype(np.float64)[:, None]
    thr = np.asarray([float(t) for t in spec.thresholds], dtype=np.float64)
    fail = conf[:, :, None] < thr[None, None, :]
    x = np.concatenate([cache.tp, cache.pred], axis=2).astype(np.int64)
    diff = x[:, ex, :] - x[:, final:final + 1, :]
    xd = np.concatenate([diff, np.ones((n, len(ex), 1), dtype=np.int64)], axis=2)
    base = np.concatenate([x[:, final, :].sum(axis=0), [0]]).astype(np.int64)
    dtype, chunks = _image_chunks(diff)
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
                    xd=xd.astype(dtype), chunks=chunks, base=base, gt=cache.gt.sum(axis=0).astype(np.int64),
                    costs=costs, devices=sorted(latencies))


def _image_chunks(diff: np.ndarray, max_chunks: int = 4):
    """Cut the images into runs whose sums cannot reach 2**24, so float32 BLAS on each run is exact.

    Every partial sum of a 0/1-weighted run is bounded by the sum over the run of each image's largest |entry|;
    below 2**24 float32 holds it exactly. When that needs more than max_chunks runs, one float64 run (exact
    below 2**53) is cheaper. Returns (dtype, [(start, stop), ...]).
    """
    n = diff.shape[0]
    per_image = np.maximum(np.abs(diff).max(axis=(1, 2)), 1) if diff.size else np.ones(n, dtype=np.int64)
    if int(per_image.sum()) >= 2 ** 53:
        raise MessError(f"pixel counts too large for exact sums ({int(per_image.sum())}); use a smaller split per cache")
    if n == 0 or int(per_image.max()) >= 2 ** 24:
        return np.float64, [(0, n)]
    chunks, start, acc = [], 0, 0
    for i, b in enumerate(per_image.tolist()):
        if acc + b >= 2 ** 24:
            chunks.append((start, i))
            start, acc = i, 0
        acc += b
    chunks.append((start, n))
    if len(chunks) > max_chunks:
        return np.float64, [(0, n)]
    return np.float32, chunks


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
        "exits": _pad(exits, prep.max_exits, -1), "tidx": _pad(tidx, prep.max_exits, -1),
        "n_at": _pad(n_at, prep.max_exits, 0), "n_final": n_final.astype(np.int64),
        "miou": stats.miou_from_counts(tp, pred, prep.gt), "pixel_acc": stats.pixel_accuracy(tp, prep.gt),
    }
    rows["macsum"] = _cost_sum(exits, n_at, n_final, prep.costs["macs"])
    rows["mean_gmacs"] = rows["macsum"] / prep.n / 1e9
    for dev in prep.devices:
        rows[f"lat_{dev}"] = _cost_sum(exits, n_at, n_final, prep.costs[f"lat:{dev}"]) / prep.n
    return rows


def _pad(a: np.ndarray, width: int, value) -> np.ndarray:
    out = np.full((a.shape[0], width), value, dtype=np.int64)
    out[:, :a.shape[1]] = a
    return out


def concat_rows(parts: list[dict]) -> dict:
    """Concatenate row dicts (same keys)."""
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def take_rows(rows: dict, idx) -> dict:
    """The rows at idx."""
    return {key: v[idx] for key, v in rows.items()}


def objectives(rows: dict, devices) -> np.ndarray:
    """[M, d] objective vectors to minimise: -mIoU, mean GMACs, mean latency per device."""
    cols = [-rows["miou"], rows["mean_gmacs"]] + [rows[f"lat_{d}"] for d in devices]
    return np.stack(cols, axis=1)


def reference_rows(prep: Prepared) -> dict:
    """The original model: every image runs to the final head, no early exit."""
    counts = prep.base[None, :]
    empty = np.zeros((1, 0), dtype=np.int64)
    return block_metrics(prep, KIND_REFERENCE, empty, empty, counts, empty)


def static_rows(prep: Prepared) -> dict:
    """Static truncations (mode 'single'): one exit every image takes, the rest of the network pruned."""
    e = prep.n_exits
    counts = prep.base[None, :] + prep.xd.sum(axis=0, dtype=np.float64).astype(np.int64)  # exact: integers < 2**53
    exits = np.arange(e)[:, None]
    return block_metrics(prep, KIND_STATIC, exits, np.zeros((e, 1), dtype=np.int64), counts,
                         np.full((e, 1), prep.n, dtype=np.int64))


# ------------------------------------------------------------------------------------------ the hot path

@dataclass
class Group:
    """Prefixes (configurations of j exits) that later exits extend; R rows."""

    s: np.ndarray        # bool [R, N]: images that pass none of the prefix's exits
    counts: np.ndarray   # float64 [R, W]: exact counts of the prefix configuration (last column: images exited)
    exits: np.ndarray    # int64 [R, j]
    tidx: np.ndarray     # int64 [R, j]
    n_at: np.ndarray     # int64 [R, j]: images leaving at each exit
    acc: dict            # cost table -> [R]: sum_j n_j * (backbone_to[p_j] + h_1 + .. + h_j)
    hsum: dict           # cost table -> [R]: h_1 + .. + h_j


def _concat_groups(parts: list[Group]) -> Group:
    cat = np.concatenate
    return Group(cat([g.s for g in parts]), cat([g.counts for g in parts]), cat([g.exits for g in parts]),
                 cat([g.tidx for g in parts]), cat([g.n_at for g in parts]),
                 {k: cat([g.acc[k] for g in parts]) for k in parts[0].acc},
                 {k: cat([g.hsum[k] for g in parts]) for k in parts[0].hsum})


@dataclass
class Block:
    """Configurations prefix row x new exit x its threshold (M = R * ncol * tc, flattened in that order)."""

    rows: Group
    col_exits: np.ndarray   # [ncol]
    col_t: np.ndarray       # [tc]
    counts: np.ndarray      # float64 [R, ncol, tc, W] exact
    n_new: np.ndarray       # float64 [R, ncol, tc] images leaving at the new exit
    acc: dict               # table -> [R, ncol, tc] acc of the extended prefix
    hsum: dict              # table -> [R, ncol, 1]
    total: dict             # table -> [R, ncol, tc] sum of per-image costs of the configuration

    @property
    def size(self) -> int:
        return self.n_new.size


def _extend(prep: Prepared, g: Group, dsub: np.ndarray, col_exits, col_t, chunk_elems: int):
    """Yield Blocks of every prefix in g extended by each (column exit, threshold); dsub is D[:, cols, tcols, :]."""
    n, w = prep.n, prep.width
    ncol, tcn = len(col_exits), len(col_t)
    # only images that some prefix lets through and some new exit lets out can change a count
    live = g.s.any(axis=0) & ~np.all(prep.fail[:, col_exits][:, :, col_t], axis=(1, 2))
    runs = []
    for a, z in prep.chunks:
        ia = a + np.flatnonzero(live[a:z])
        if len(ia) >= 0.75 * (z - a):   # gathering costs more than it saves
            ia = slice(a, z)
        elif len(ia) == 0:
            continue
        runs.append((ia, dsub[ia].reshape(-1, ncol * tcn * w)))
    step = max(1, chunk_elems // max(1, ncol * tcn * w))
    for r0 in range(0, len(g.counts), step):
        r1 = min(len(g.counts), r0 + step)
        counts = np.broadcast_to(g.counts[r0:r1, None, :], (r1 - r0, 1, w)).repeat(ncol * tcn, axis=1)
        for ia, dmat in runs:   # each run's product is exact in its dtype; the float64 sum is exact below 2**53
            counts += (g.s[r0:r1, ia].astype(dmat.dtype) @ dmat).reshape(r1 - r0, ncol * tcn, w)
        counts = counts.reshape(r1 - r0, ncol, tcn, w)
        n_new = counts[..., w - 1] - g.counts[r0:r1, None, None, w - 1]
        n_final = n - counts[..., w - 1]
        acc, hsum, total = {}, {}, {}
        for key, (bb, hd, tot, fin) in prep.costs.items():
            nn, nf = (n_new.astype(np.int64), n_final.astype(np.int64)) if bb.dtype == np.int64 else (n_new, n_final)
            h = g.hsum[key][r0:r1, None, None] + hd[col_exits][None, :, None]
            a = g.acc[key][r0:r1, None, None] + nn * (bb[col_exits][None, :, None] + h)
            acc[key], hsum[key], total[key] = a, h, a + nf * ((tot + h) + fin)
        rows = Group(g.s[r0:r1], g.counts[r0:r1], g.exits[r0:r1], g.tidx[r0:r1], g.n_at[r0:r1],
                     {k: v[r0:r1] for k, v in g.acc.items()}, {k: v[r0:r1] for k, v in g.hsum.items()})
        yield Block(rows, np.asarray(col_exits), np.asarray(col_t), counts, n_new, acc, hsum, total)


def _next_group(prep: Prepared, b: Block, sel: slice, tcols: np.ndarray) -> Group:
    """The prefixes of one more exit: block columns `sel` (the head variants of one position), all thresholds."""
    r, tcn = len(b.rows.counts), len(b.col_t)
    ex = b.col_exits[sel]
    k = b.rows.exits.shape[1]
    s = b.rows.s[:, None, None, :] & prep.fail[:, ex][:, :, b.col_t].transpose(1, 2, 0)[None]
    h = len(ex)

    def grow(old, new):
        return np.concatenate([np.broadcast_to(old[:, None, None, :], (r, h, tcn, k)), new[..., None]], axis=3).reshape(-1, k + 1)
    return Group(s.reshape(-1, prep.n), b.counts[:, sel].reshape(-1, prep.width),
                 grow(b.rows.exits, np.broadcast_to(ex[None, :, None], (r, h, tcn))),
                 grow(b.rows.tidx, np.broadcast_to(b.col_t[None, None, :], (r, h, tcn))),
                 grow(b.rows.n_at, b.n_new[:, sel].astype(np.int64)),
                 {k2: v[:, sel].reshape(-1) for k2, v in b.acc.items()},
                 {k2: np.broadcast_to(v[:, sel], (r, h, tcn)).reshape(-1) for k2, v in b.hsum.items()})


def eval_tree(prep: Prepared, t_root: int, first_positions, sink, chunk_elems: int = 2_000_000) -> None:
    """Evaluate every cascade whose first exit sits at one of `first_positions` with threshold index t_root.

    Calls sink.block(Block) for every block of configurations (all of one exit count).
    """
    n, h, npos, e_all = prep.n, len(prep.heads), len(prep.positions), prep.n_exits
    tcols = np.array([t_root] if prep.shared else range(len(prep.thresholds)), dtype=np.int64)
    tc = len(tcols)
    d = prep.xd[:, :, None, :] * (~prep.fail[:, :, tcols])[..., None].astype(prep.xd.dtype)   # [N, E, Tc, W]
    zero = {k: np.zeros(1, dtype=v[0].dtype) for k, v in prep.costs.items()}
    empty = np.zeros((1, 0), dtype=np.int64)
    root = Group(np.ones((1, n), dtype=bool), prep.base[None, :].astype(np.float64), empty, empty, empty, zero, zero)
    root_t = np.flatnonzero(tcols == t_root)
    groups = {}
    for p in sorted(set(int(x) for x in first_positions)):
        es = np.arange(p * h, (p + 1) * h)
        for b in _extend(prep, root, d[:, es][:, :, root_t], es, tcols[root_t], chunk_elems):
            sink.block(b)
            if prep.max_exits > 1:
                groups[p] = _next_group(prep, b, slice(0, h), tcols)
    for level in range(2, prep.max_exits + 1):
        nxt = defaultdict(list)
        for p in sorted(groups):
            first = (p + 1) * h
            if first >= e_all:
                continue
            for b in _extend(prep, groups[p], d[:, first:], np.arange(first, e_all), tcols, chunk_elems):
                sink.block(b)
                if level < prep.max_exits:
                    for q in range(p + 1, npos):
                        nxt[q].append(_next_group(prep, b, slice((q - p - 1) * h, (q - p) * h), tcols))
        groups = {q: _concat_groups(parts) for q, parts in nxt.items()}


def block_rows(prep: Prepared, b: Block, idx: np.ndarray, miou: np.ndarray | None = None) -> dict:
    """Materialise the configurations at flat indices idx of a block as rows (the form block_metrics returns)."""
    r, c, t = np.unravel_index(idx, b.n_new.shape)
    k = b.rows.exits.shape[1] + 1
    counts = b.counts.reshape(-1, prep.width)[idx]
    tp = counts[:, :prep.n_classes].astype(np.int64)
    rows = {
        "kind": np.full(len(idx), KIND_CASCADE, dtype=np.int8), "n_exits": np.full(len(idx), k, dtype=np.int8),
        "exits": _pad(np.concatenate([b.rows.exits[r], b.col_exits[c][:, None]], axis=1), prep.max_exits, -1),
        "tidx": _pad(np.concatenate([b.rows.tidx[r], b.col_t[t][:, None]], axis=1), prep.max_exits, -1),
        "n_at": _pad(np.concatenate([b.rows.n_at[r], b.n_new.reshape(-1)[idx, None].astype(np.int64)], axis=1),
                     prep.max_exits, 0),
        "n_final": (prep.n - counts[:, -1]).astype(np.int64),
        "miou": miou if miou is not None else stats.miou_from_counts(tp, counts[:, prep.n_classes:2 * prep.n_classes].astype(np.int64), prep.gt),
        "pixel_acc": stats.pixel_accuracy(tp, prep.gt),
        "macsum": b.total["macs"].reshape(-1)[idx],
    }
    rows["mean_gmacs"] = rows["macsum"] / prep.n / 1e9
    for dev in prep.devices:
        rows[f"lat_{dev}"] = b.total[f"lat:{dev}"].reshape(-1)[idx] / prep.n
    return rows


def block_objectives(prep: Prepared, b: Block, chunk: int = 2048) -> np.ndarray:
    """[M, d] objectives to minimise of a whole block; mIoU through stats.miou_from_counts in cache-sized chunks."""
    counts = b.counts.reshape(-1, prep.width)
    c = prep.n_classes
    miou = np.empty(len(counts))
    for s in range(0, len(counts), chunk):
        part = counts[s:s + chunk].astype(np.int64)
        miou[s:s + chunk] = stats.miou_from_counts(part[:, :c], part[:, c:2 * c], prep.gt)
    cols = [-miou, b.total["macs"].reshape(-1) / prep.n / 1e9]
    cols += [b.total[f"lat:{dev}"].reshape(-1) / prep.n for dev in prep.devices]
    return np.stack(cols, axis=1)


class FrontSink:
    """Keeps the non-dominated rows (ties kept) of everything it is given, refiltering as it grows."""

    def __init__(self, prep: Prepared, keep_all: bool = False, limit: int = 100_000):
        self.prep, self.keep_all, self.limit = prep, keep_all, limit
        self.parts, self.size, self.n_evaluated, self.all_parts = [], 0, 0, []
        self.front = np.empty((0, 2 + len(prep.devices)))

    def block(self, b: Block) -> None:
        obj = block_objectives(self.prep, b)
        self.n_evaluated += len(obj)
        if self.keep_all:
            self.all_parts.append(block_rows(self.prep, b, np.arange(len(obj)), -obj[:, 0]))
        cand = np.flatnonzero(~self._dominated_by_front(obj))
        cand = cand[nondominated_mask(obj[cand])]
        self._keep(block_rows(self.prep, b, cand, -obj[cand, 0]))

    def add(self, rows: dict) -> None:
        """Add materialised rows (static truncations, small sets)."""
        self.n_evaluated += len(rows["miou"])
        if self.keep_all:
            self.all_parts.append(rows)
        self._keep(take_rows(rows, nondominated_mask(objectives(rows, self.prep.devices))))

    def _keep(self, rows: dict) -> None:
        self.parts.append(rows)
        self.size += len(rows["miou"])
        if self.size > self.limit or len(self.parts) > 8:
            self.rows()

    def _dominated_by_front(self, obj: np.ndarray) -> np.ndarray:
        """Two objectives: rows that the front kept so far strictly dominates (a binary search per row)."""
        f = self.front
        if len(f) == 0 or obj.shape[1] != 2:
            return np.zeros(len(obj), dtype=bool)
        # f is the (-miou, gmacs) front sorted by gmacs with -miou decreasing; best -miou at gmacs <= g
        le = np.searchsorted(f[:, 1], obj[:, 1], side="right") - 1
        lt = np.searchsorted(f[:, 1], obj[:, 1], side="left") - 1
        best_le = np.where(le >= 0, f[np.maximum(le, 0), 0], np.inf)
        best_lt = np.where(lt >= 0, f[np.maximum(lt, 0), 0], np.inf)
        return (best_le < obj[:, 0]) | (best_lt <= obj[:, 0])

    def rows(self) -> dict:
        """The non-dominated rows so far (ties kept)."""
        if not self.parts:
            return {}
        rows = concat_rows(self.parts)
        rows = take_rows(rows, nondominated_mask(objectives(rows, self.prep.devices)))
        self.parts, self.size = [rows], len(rows["miou"])
        obj = objectives(rows, self.prep.devices)
        if obj.shape[1] == 2:
            self.front = obj[np.lexsort((obj[:, 0], obj[:, 1]))]
        return rows


def evaluate_items(prep: Prepared, items: list[tuple], sink, progress=None) -> None:
    """Run the evaluator over a shard's work items (trees grouped by threshold index, then static rows)."""
    by_t = defaultdict(list)
    for it in items:
        if it[0] == "tree":
            by_t[it[1]].append(it[2])
        else:
            sink.add(static_rows(prep))
    for t_root in sorted(by_t):
        eval_tree(prep, t_root, by_t[t_root], sink)
        if progress is not None:
            progress(sink)


