"""The evaluator's units of work: prefix rows (`Rows`), groups of prefixes sharing a last position (`Group`),
blocks of configurations (`Block`) with their costs, and the image runs whose float32 products are exact.
Both threshold kernels (search_per_exit, search_shared) build and consume these."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Elements of a block's counts (rows x columns x W): in cache for shared thresholds' products,
# larger for per-exit thresholds so that each product has enough rows. Columns of one product: ~COLUMN_ELEMS.
BLOCK_ELEMS = {True: 2_000_000, False: 8_000_000}
COLUMN_ELEMS = 8192


def exact_runs(prep, idx: np.ndarray) -> list:
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



def block_of(prep, rows: Rows, ce, col_t, counts, survivors) -> Block:
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



def child_rows(b: Block, sel: slice) -> tuple:
    """The prefixes of one more exit from block columns `sel` (the head variants of one position), in pieces
    shaped [H, R, tc, ...] that group_of concatenates along R."""
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


def group_of(parts: list[tuple], width: int) -> Group:
    """Concatenate child_rows pieces (same position and thresholds) into one Group."""
    cat = np.concatenate
    _, ex, tcols = parts[0][:3]

    def flat(i, tail=()):
        return cat([p[i] for p in parts], axis=1).reshape((-1,) + tail)
    k = parts[0][4].shape[-1]
    rows = Rows(flat(3, (width,)), flat(4, (k,)), flat(5, (k,)), flat(6, (k,)),
                {key: cat([p[7][key] for p in parts], axis=1).reshape(-1) for key in parts[0][7]},
                {key: cat([p[8][key] for p in parts], axis=1).reshape(-1) for key in parts[0][8]})
    return Group(cat([p[0] for p in parts]), ex, tcols, rows)

