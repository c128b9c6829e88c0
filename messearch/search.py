"""The exact, vectorised evaluator of early-exit configurations. What to search is search_spec; the rows of its
blocks and a shard's front are shard_front; the drivers that run it are search_driver.

A cascade (e_1, t_1) .. (e_k, t_k) sends image i to the first exit whose confidence reaches its threshold.
Its confusion counts are the final head's totals plus, for each exit j, the sum over the images that
survive exits 1..j-1 of pass_j(i) * (X[i, e_j] - X[i, final]). For many prefixes at once that sum is one
matrix product  survivors[rows, N] @ D[N, exits x thresholds x counts]  of 0/1 by integer entries: BLAS
does the work, and the result is exact because every partial sum is an integer below 2**24 (float32 runs,
see _runs) or 2**53 (float64). Configurations are generated level by level (a k-exit configuration extends
a (k-1)-exit prefix), so no configuration is ever handled by Python alone.

Incremental thresholds: the images that fail a prefix's last exit form nested sets as its threshold rises,
so with per-exit thresholds the product of threshold t is the product of the previous threshold plus one over
the images that fail at t but not before (one segment): each image enters one product per head instead of T.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import stats

from .cache_format import CacheArrays
from .config import KIND_CASCADE, KIND_REFERENCE, KIND_STATIC
from .errors import MessError
from .search_spec import SearchSpec

if TYPE_CHECKING:  # the cost model imports torchvision; trials only need the table's fields
    from .costs import CostTable

# Elements of a block's counts (rows x columns x W): in cache for shared thresholds' one product per block,
# larger for per-exit thresholds so that each product has enough rows. Columns of one product: ~COLUMN_ELEMS.
BLOCK_ELEMS = {True: 2_000_000, False: 8_000_000}
COLUMN_ELEMS = 8192


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
    bound: np.ndarray = None   # int64 [N]: largest |entry| of each image's xd rows (exact-sum runs, see _runs)
    d_cache: dict = field(default_factory=dict, repr=False)   # the latest tree's D, reused by the next tree

    def tree_d(self, tree_t: np.ndarray) -> np.ndarray:
        """D [N, E, Tt, W]: each exit's xd row where the image leaves there with threshold tree_t[j], else 0."""
        key = tuple(int(t) for t in tree_t)
        if key not in self.d_cache:
            self.d_cache.clear()   # one D alive at a time (per-exit: the same D for every tree)
            self.d_cache[key] = self.xd[:, :, None, :] * (~self.fail[:, :, tree_t])[..., None].astype(self.xd.dtype)
        return self.d_cache[key]

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
    dtype, bound = _exact_dtype(diff)
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
                    xd=xd.astype(dtype), bound=bound, base=base, gt=cache.gt.sum(axis=0).astype(np.int64),
                    costs=costs, devices=sorted(latencies))


def _exact_dtype(diff: np.ndarray):
    """float32 when every entry fits it exactly (|x| < 2**24), else float64; with each image's largest |entry|.

    A 0/1-weighted sum over a run of images is bounded by the sum of their largest |entry|: _runs keeps that
    below 2**24 (float32) so that BLAS products are exact whatever their summation order.
    """
    n = diff.shape[0]
    bound = np.maximum(np.abs(diff).max(axis=(1, 2)), 1) if diff.size else np.ones(n, dtype=np.int64)
    if int(bound.sum()) >= 2 ** 53:
        raise MessError(f"pixel counts too large for exact sums ({int(bound.sum())}); use a smaller split per cache")
    return (np.float32 if n and int(bound.max()) < 2 ** 24 else np.float64), bound.astype(np.int64)


def _runs(prep: Prepared, idx: np.ndarray) -> list:
    """Cut image indices into runs whose products are exact in xd's dtype; [(start, stop), ...] into idx."""
    if prep.xd.dtype == np.float64:
        return [(0, len(idx))]
    cs = np.cumsum(prep.bound[idx])
    if cs[-1] < 2 ** 24:
        return [(0, len(idx))]
    runs, start, base = [], 0, 0
    for i in range(len(idx)):
        if cs[i] - base >= 2 ** 24:
            runs.append((start, i))
            start, base = i, cs[i - 1]
    return runs + [(start, len(idx))]


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
        "miou": stats.miou_from_counts(tp, pred, prep.gt), "pixel_acc": stats.pixel_accuracy(tp, prep.gt),
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
    counts = prep.base[None, :] + prep.xd.sum(axis=0, dtype=np.float64).astype(np.int64)  # exact: integers < 2**53
    exits = np.arange(e)[:, None]
    return block_metrics(prep, KIND_STATIC, exits, np.zeros((e, 1), dtype=np.int64), counts,
                         np.full((e, 1), prep.n, dtype=np.int64))


# ------------------------------------------------------------------------------------------ the hot path

@dataclass
class Rows:
    """Configurations of j exits that later exits extend (R rows)."""

    counts: np.ndarray   # float64 [R, W]: exact counts (last column: images exited)
    exits: np.ndarray    # int64 [R, j]
    tidx: np.ndarray     # int64 [R, j]
    n_at: np.ndarray     # int64 [R, j]: images leaving at each exit
    acc: dict            # cost table -> [R]: sum_j n_j * (backbone_to[p_j] + h_1 + .. + h_j)
    hsum: dict           # cost table -> [R]: h_1 + .. + h_j

    def take(self, idx) -> "Rows":
        return Rows(self.counts[idx], self.exits[idx], self.tidx[idx], self.n_at[idx],
                    {k: v[idx] for k, v in self.acc.items()}, {k: v[idx] for k, v in self.hsum.items()})


@dataclass
class Group:
    """Prefixes whose last exit sits at one position: parent prefix x head variant there x its threshold.

    Rows are ordered (head, parent, threshold) and the thresholds ascend in value, so the images that fail
    the last exit grow in nested sets: consecutive thresholds differ by one segment of images, and the
    extension's sums are carried from one threshold to the next instead of recomputed (incremental sums).
    """

    ps: np.ndarray       # bool [P, N]: images that pass none of the parent prefix's exits
    ex: np.ndarray       # int64 [H]: the last exit's candidate exits; [-1] for the root (no exit yet)
    tcols: np.ndarray    # int64 [Tc]: threshold indices of the last exit, ascending in value
    rows: Rows           # H * P * Tc rows


def _fail(prep: Prepared, e: int, tcols: np.ndarray) -> np.ndarray:
    """bool [N, Tc]: images that do not leave at exit e with each threshold (all of them for the root)."""
    return np.ones((prep.n, len(tcols)), dtype=bool) if e < 0 else prep.fail[:, e][:, tcols]


@dataclass
class Block:
    """Configurations prefix row x new exit x its threshold (M = R * ncol * tc, flattened in that order)."""

    rows: Rows
    col_exits: np.ndarray   # [ncol]
    col_t: np.ndarray       # [tc]
    counts: np.ndarray      # float64 [R, ncol, tc, W] exact
    n_new: np.ndarray       # float64 [R, ncol, tc] images leaving at the new exit
    acc: dict               # table -> [R, ncol, tc] acc of the extended prefix
    hsum: dict              # table -> [R, ncol, 1]
    total: dict             # table -> [R, ncol, tc] sum of per-image costs of the configuration
    survivors: object = None   # bool [R, N] images that pass none of each row's exits, or () -> it (lazy)

    @property
    def size(self) -> int:
        return self.n_new.size

    def s(self) -> np.ndarray:
        """bool [R, N]: images that pass none of each row's exits (built once)."""
        if callable(self.survivors):
            self.survivors = self.survivors()
        return self.survivors


def _extend(prep: Prepared, g: Group, d: np.ndarray, tree_t: np.ndarray, cols: np.ndarray, tsel: np.ndarray,
            chunk_elems: int):
    """Yield Blocks of every prefix in g extended by each (exit in cols, threshold tree_t[tsel]); d is [N, E, Tt, W].

    For one head of the last prefix exit, its thresholds' failing sets are nested: the product over a
    threshold's new segment of images is added to the previous threshold's sums (exact: integers in BLAS,
    runs bounded by _runs, float64 accumulation). With one threshold (shared mode) all heads go in one product.
    """
    n, w, h_all = prep.n, prep.width, len(prep.heads)
    n_h, n_p, tcn = len(g.ex), len(g.ps), len(g.tcols)
    col_t = tree_t[tsel]
    step_pos = max(1, COLUMN_ELEMS // (h_all * len(tsel) * w))
    batches = [np.arange(n_h)] if tcn == 1 else [np.array([i]) for i in range(n_h)]
    for c0 in range(0, len(cols), step_pos * h_all):
        ce = cols[c0:c0 + step_pos * h_all]
        cw = len(ce) * len(tsel) * w
        dv = d[:, ce[0]:ce[-1] + 1]   # a view; only the rows a product needs are gathered
        if len(tsel) < d.shape[2]:
            dv = dv[:, :, tsel]
        passes = ~np.all(prep.fail[:, ce][:, :, col_t], axis=(1, 2))   # images some new exit lets out
        for hb in batches:
            f = np.stack([_fail(prep, int(e), g.tcols) for e in g.ex[hb]])   # [Hb, N, Tc]
            seg = f.copy()
            seg[:, :, 1:] &= ~f[:, :, :-1]
            p_step = max(1, chunk_elems // (len(hb) * tcn * cw))
            for p0 in range(0, n_p, p_step):
                p1 = min(n_p, p0 + p_step)
                ps = g.ps[p0:p1]
                live = ps.any(axis=0) & passes
                run = np.zeros((len(hb) * (p1 - p0), cw))
                out = run.reshape(len(hb), p1 - p0, 1, cw) if tcn == 1 else np.empty((len(hb), p1 - p0, tcn, cw))
                for j in range(tcn):
                    idx = np.flatnonzero(seg[:, :, j].any(axis=0) & live)
                    runs = _runs(prep, idx) if len(idx) else []
                    wide = len(runs) > 2   # many short float32 runs cost more than one float64 product
                    for a, z in ([(0, len(idx))] if wide else runs):
                        ii = idx[a:z]
                        dm = dv[ii].reshape(len(ii), cw)
                        dm = dm.astype(np.float64) if wide else dm
                        sel = (ps[None, :, ii] & seg[:, ii, j][:, None, :]).reshape(-1, len(ii))
                        run += sel.astype(dm.dtype) @ dm
                    if tcn > 1:
                        out[:, :, j] = run.reshape(len(hb), p1 - p0, cw)
                rid = ((hb[:, None] * n_p + np.arange(p0, p1)[None, :])[..., None] * tcn + np.arange(tcn)).reshape(-1)
                rows = g.rows.take(rid)
                counts = out.reshape(len(rid), len(ce), len(tsel), w)
                counts += rows.counts[:, None, None, :]
                yield _block(prep, rows, ce, col_t, counts,
                             lambda ps=ps, f=f: (ps[None, :, None, :] & f.transpose(0, 2, 1)[:, None, :, :]).reshape(-1, n))


def _block(prep: Prepared, rows: Rows, ce, col_t, counts, survivors) -> Block:
    w = prep.width
    n_new = counts[..., w - 1] - rows.counts[:, None, None, w - 1]
    n_final = prep.n - counts[..., w - 1]
    acc, hsum, total = {}, {}, {}
    for key, (bb, hd, tot, fin) in prep.costs.items():
        nn, nf = (n_new.astype(np.int64), n_final.astype(np.int64)) if bb.dtype == np.int64 else (n_new, n_final)
        h = rows.hsum[key][:, None, None] + hd[ce][None, :, None]
        a = rows.acc[key][:, None, None] + nn * (bb[ce][None, :, None] + h)
        acc[key], hsum[key], total[key] = a, h, a + nf * ((tot + h) + fin)
    return Block(rows, np.asarray(ce), np.asarray(col_t), counts, n_new, acc, hsum, total, survivors)


def _child(b: Block, sel: slice) -> tuple:
    """The prefixes of one more exit from block columns `sel` (the head variants of one position), in pieces
    shaped [H, R, tc, ...] that _group concatenates along R."""
    r, tcn = len(b.rows.counts), len(b.col_t)
    ex = b.col_exits[sel]
    k = b.rows.exits.shape[1]

    def grow(old, new):
        return np.concatenate([np.broadcast_to(old[None, :, None, :], (len(ex), r, tcn, k)), new[..., None]], axis=3)
    t = (1, 0, 2)
    return (b.s(), ex, b.col_t, b.counts[:, sel].transpose(1, 0, 2, 3),
            grow(b.rows.exits, np.broadcast_to(ex[:, None, None], (len(ex), r, tcn))),
            grow(b.rows.tidx, np.broadcast_to(b.col_t[None, None, :], (len(ex), r, tcn))),
            grow(b.rows.n_at, b.n_new[:, sel].astype(np.int64).transpose(t)),
            {k2: v[:, sel].transpose(t) for k2, v in b.acc.items()},
            {k2: np.broadcast_to(v[:, sel], (r, len(ex), tcn)).transpose(t) for k2, v in b.hsum.items()})


def _group(parts: list[tuple], width: int) -> Group:
    """Concatenate _child pieces (same position and thresholds) into one Group."""
    cat = np.concatenate
    _, ex, tcols = parts[0][:3]

    def flat(i, tail=()):
        return cat([p[i] for p in parts], axis=1).reshape((-1,) + tail)
    k = parts[0][4].shape[-1]
    rows = Rows(flat(3, (width,)), flat(4, (k,)), flat(5, (k,)), flat(6, (k,)),
                {key: cat([p[7][key] for p in parts], axis=1).reshape(-1) for key in parts[0][7]},
                {key: cat([p[8][key] for p in parts], axis=1).reshape(-1) for key in parts[0][8]})
    return Group(cat([p[0] for p in parts]), ex, tcols, rows)


def eval_tree(prep: Prepared, roots, sink, chunk_elems: int | None = None) -> None:
    """Evaluate every cascade whose first exit is a head at position p with threshold index t, (t, p) in roots.

    Shared thresholds: all roots share one t. Calls sink.block(Block) for every block of configurations.
    """
    n, h, npos, e_all = prep.n, len(prep.heads), len(prep.positions), prep.n_exits
    by_p = defaultdict(set)
    for t, p in roots:
        by_p[int(p)].add(int(t))
    order = np.argsort(prep.thresholds, kind="stable")   # threshold indices ascending in value
    tree_t = order[np.isin(order, sorted(set().union(*by_p.values())))] if prep.shared else order
    d = prep.tree_d(tree_t)
    zero = {k: np.zeros(1, dtype=v[0].dtype) for k, v in prep.costs.items()}
    empty = np.zeros((1, 0), dtype=np.int64)
    root = Group(np.ones((1, n), dtype=bool), np.array([-1]), np.array([0]),
                 Rows(prep.base[None, :].astype(np.float64), empty, empty, empty, zero, zero))
    chunk_elems = chunk_elems or BLOCK_ELEMS[prep.shared]
    groups = defaultdict(list)
    for p in sorted(by_p):
        es = np.arange(p * h, (p + 1) * h)
        for b in _extend(prep, root, d, tree_t, es, np.flatnonzero(np.isin(tree_t, sorted(by_p[p]))), chunk_elems):
            sink.block(b)
            if prep.max_exits > 1:
                groups[p].append(_child(b, slice(0, h)))
    for level in range(2, prep.max_exits + 1):
        nxt = defaultdict(list)
        for p in sorted(groups):
            first = (p + 1) * h
            if first >= e_all:
                continue
            g = _group(groups[p], prep.width)
            for b in _extend(prep, g, d, tree_t, np.arange(first, e_all), np.arange(len(tree_t)), chunk_elems):
                sink.block(b)
                if level < prep.max_exits:
                    q0 = int(b.col_exits[0]) // h
                    for q in range(q0, q0 + len(b.col_exits) // h):
                        nxt[q].append(_child(b, slice((q - q0) * h, (q - q0 + 1) * h)))
        groups = nxt


def evaluate_items(prep: Prepared, items: list[tuple], sink, progress=None) -> None:
    """Run the evaluator over a shard's work items (trees grouped by threshold index, then static rows)."""
    trees = defaultdict(list)   # shared: a tree per threshold; per-exit: per first position, all its first thresholds
    for it in items:
        if it[0] == "tree":
            trees[it[1] if prep.shared else it[2]].append((it[1], it[2]))
        else:
            sink.add(static_rows(prep))
    for key in sorted(trees):
        eval_tree(prep, trees[key], sink)
        if progress is not None:
            progress(sink)
