"""Shared thresholds, incremental: every exit of a configuration uses one threshold t. Thresholds are taken in
ascending order, so image i passes exit e for the first b[i, e] of them (its bin) and survives a prefix of
exits from step s[i] = the largest bin of the prefix's exits. The images that survive a prefix form nested
sets as t rises, and so do the images that pass a new exit as t falls: the new exit's sums at threshold t
are those at the previous threshold plus the images that start surviving at t (s[i] = t) minus the survivors
that stop passing the new exit at t (b[i, e] = t). Over all thresholds every image enters each prefix's
sums once and leaves each new exit's sums once, instead of once per threshold.

Every product is a 0/1 mask by integer rows over the few images of one threshold step, exact in float32 when
their bounds sum below 2**24 and in float64 otherwise; the sums are carried in float64 (integers < 2**53).
Trees are rooted at a first position with the thresholds of its work items.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from . import search_blocks as sb
from .search_blocks import Rows, block_of, child_rows, exact_runs, group_of


def threshold_bins(prep, tree_t: np.ndarray) -> np.ndarray:
    """int16 [N, E]: how many of the thresholds tree_t (ascending in value) each image passes at each exit."""
    return (~prep.fail[:, :, tree_t]).sum(axis=2).astype(np.int16)


class _Segments:
    """The images of each bin, for K bin vectors at once: images of v[k] == ti are seg[k] at step ti."""

    def __init__(self, v: np.ndarray, n_steps: int):
        k, n = v.shape
        self.n = n
        self.order = np.argsort(v, axis=1, kind="stable")
        flat = (np.arange(k)[:, None] * (n_steps + 1) + v).reshape(-1)
        self.count = np.bincount(flat, minlength=k * (n_steps + 1)).reshape(k, n_steps + 1)
        self.start = np.cumsum(self.count, axis=1) - self.count

    def at(self, ti: int) -> np.ndarray:
        """int64 [K, m]: the images of bin ti of each vector, padded with image n (a zero row)."""
        length = self.count[:, ti]
        m = int(length.max()) if len(length) else 0
        j = np.arange(m)
        pos = np.minimum(self.start[:, ti, None] + j, self.n - 1)
        return np.where(j < length[:, None], np.take_along_axis(self.order, pos, axis=1), self.n)


@dataclass
class _Tree:
    """A tree's thresholds (ascending in value) and the arrays padded with image N (a zero row)."""

    t: np.ndarray          # threshold indices, ascending in value
    b_pad: np.ndarray      # int16 [N + 1, E]: bins (threshold_bins), 0 for the padding image
    xd_pad: np.ndarray     # [N + 1, E, W]: prep.xd and a zero row
    bound_pad: np.ndarray  # int64 [N + 1]: prep.bound and 0
    d: list                # per step, [N + 1, E, W]: xd_pad where the image passes the exit at that step, else 0

    def d_at(self, ti: int) -> np.ndarray:
        if self.d[ti] is None:
            self.d[ti] = self.xd_pad * (self.b_pad > ti)[:, :, None]
        return self.d[ti]

    @property
    def steps(self) -> int:
        return len(self.t)


def _bmm(tree: _Tree, mask: np.ndarray, idx: np.ndarray, mat: np.ndarray) -> np.ndarray:
    """Batched mask [K, R, m] (bool) @ mat [K, m, X] (integer rows of images idx [K, m]), exact, float64 out.

    float32 when every batch's images bound their partial sums below 2**24 (see search_blocks.exact_runs)."""
    if mat.dtype == np.float32 and int(tree.bound_pad[idx].sum(axis=1).max(initial=0)) < 2 ** 24:
        return np.matmul(mask.astype(np.float32, order="C"), mat)
    return np.matmul(mask.astype(np.float64, order="C"), mat.astype(np.float64))


def _accumulate(prep, out: np.ndarray, mask: np.ndarray, idx: np.ndarray, mat: np.ndarray) -> None:
    """out += mask [R, len(idx)] (bool) @ mat [len(idx), K] (integer rows of images idx), exactly: float32 products
    over runs of images whose bounds sum below 2**24 (float64 when xd is), summed in float64."""
    for a, z in exact_runs(prep, idx):
        out += mask[:, a:z].astype(mat.dtype) @ mat[a:z]


def _extend(prep, tree, s_par: np.ndarray, ex: np.ndarray, rows_t: list, cols: np.ndarray, chunk_elems: int):
    """Yield (threshold step, Block): every prefix row (head ex[h] after parent p, row h * P + p; parents' bins
    s_par [P, N]; Rows per threshold step) extended by each exit in cols (a contiguous range), step by step.

    The new exits' sums are carried from step to step: the images whose row bin max(s_par[p], b[ex[h]]) is ti
    start surviving (one product over them by their passing rows), and the survivors of bin ti at a new exit
    stop passing it (one product per column over its bin-ti images, batched over the columns). At a step where
    the survivors who can still leave are fewer than those changes (low thresholds), the sums are made afresh.
    """
    n, w = prep.n, prep.width
    b, xd = tree.b_pad, tree.xd_pad
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    ncol, h = c1 - c0, len(ex)
    root = ex[0] < 0
    bh = np.zeros((n + 1, 1), dtype=np.int16) if root else b[:, ex]          # [N + 1, H]
    reach = b[:n, c0:c1].max(axis=1)   # an image can leave at some new exit while the step is below reach
    leave = _Segments(b[:n, c0:c1].T, tree.steps)
    col_ix = np.arange(c0, c1)[:, None]
    step = max(1, chunk_elems // (h * ncol * w))
    for p0 in range(0, len(s_par), step):
        sp = np.concatenate([s_par[p0:p0 + step], np.zeros((min(step, len(s_par) - p0), 1), np.int16)], axis=1)
        pc = len(sp)
        s_rows = np.maximum(bh.T[:, None, :], sp[None]).reshape(h * pc, n + 1)
        rid = (np.arange(h)[:, None] * len(s_par) + np.arange(p0, p0 + pc)[None, :]).reshape(-1)
        run = np.zeros((h, pc, ncol * w))   # the new exits' sums at the current step, carried
        for ti in range(tree.steps):
            d = tree.d_at(ti)                                                 # [N + 1, E, W]: passing rows
            live = reach > ti
            enter = np.flatnonzero(np.any(s_rows[:, :n] == ti, axis=0) & live)
            idx = leave.at(ti) if ti else np.zeros((ncol, 0), dtype=np.int64)   # [ncol, m]
            surv = np.flatnonzero(np.any(s_rows[:, :n] <= ti, axis=0) & live)
            flat = run.reshape(h * pc, -1)
            if len(surv) <= len(enter) + idx.shape[1]:
                # fewer survivors than changes: this step's sums afresh (the dense product), carried from here on
                flat[:] = 0.0
                if len(surv):
                    _accumulate(prep, flat, s_rows[:, surv] <= ti, surv, d[surv, c0:c1].reshape(len(surv), -1))
                idx = idx[:, :0]
            elif len(enter):
                _accumulate(prep, flat, s_rows[:, enter] == ti, enter, d[enter, c0:c1].reshape(len(enter), -1))
            if idx.shape[1]:
                mask = (s_rows[:, idx] < ti).transpose(1, 0, 2)               # [ncol, R, m]
                lost = _bmm(tree, mask, idx, xd[idx, col_ix])                # [ncol, R, W]
                run.reshape(h * pc, ncol, w)[:] -= lost.transpose(1, 0, 2)
            rows = rows_t[ti].take(rid)
            counts = (run.reshape(h * pc, ncol, w) + rows.counts[:, None, :])[:, :, None, :]
            yield ti, block_of(prep, rows, cols, tree.t[ti:ti + 1], counts, s_rows[:, :n])


def eval_tree_shared(prep, roots, sink, chunk_elems: int | None = None) -> None:
    """Evaluate every cascade whose first exit is at position p, with shared threshold index t, (t, p) in roots
    (one position). Calls sink.block(Block) for every block of configurations (one threshold each)."""
    n, h, e_all = prep.n, len(prep.heads), prep.n_exits
    (p1,) = {int(p) for _, p in roots}
    order = np.argsort(prep.thresholds, kind="stable")   # threshold indices ascending in value
    tree_t = order[np.isin(order, sorted({int(t) for t, _ in roots}))]
    zrow = np.zeros((1,) + prep.xd.shape[1:], dtype=prep.xd.dtype)
    key = ("shared", tuple(int(t) for t in tree_t))
    if key not in prep.d_cache:   # one tree's arrays alive at a time; the next tree with these thresholds reuses them
        prep.d_cache.clear()
        prep.d_cache[key] = _Tree(tree_t, np.concatenate([threshold_bins(prep, tree_t), np.zeros((1, e_all), np.int16)]),
                                  np.concatenate([prep.xd, zrow]), np.concatenate([prep.bound, [0]]), [None] * len(tree_t))
    tree = prep.d_cache[key]
    chunk_elems = chunk_elems or sb.BLOCK_ELEMS[True]
    zero = {k: np.zeros(1, dtype=v[0].dtype) for k, v in prep.costs.items()}
    empty = np.zeros((1, 0), dtype=np.int64)
    root = Rows(prep.base[None, :].astype(np.float64), empty, empty, empty, zero, zero)
    # position of the prefixes' last exit -> (their parents' bins, their last exits, their Rows per step)
    groups = {p1: (np.zeros((1, n), dtype=np.int16), np.array([-1]), [root] * tree.steps)}
    for level in range(1, prep.max_exits + 1):
        nxt = defaultdict(lambda: defaultdict(list))
        for q, (s_par, ex, rows_t) in sorted(groups.items()):
            cols = np.arange(q * h, (q + 1) * h) if level == 1 else np.arange((q + 1) * h, e_all)
            if len(cols) == 0:
                continue
            for ti, blk in _extend(prep, tree, s_par, ex, rows_t, cols, chunk_elems):
                sink.block(blk)
                if level < prep.max_exits:
                    q0 = int(cols[0]) // h
                    for qq in range(q0, q0 + len(cols) // h):
                        nxt[qq][ti].append(child_rows(blk, slice((qq - q0) * h, (qq - q0 + 1) * h)))
        groups = {}
        for qq, per_t in nxt.items():
            gs = [group_of(per_t[ti], prep.width) for ti in range(tree.steps)]
            groups[qq] = (gs[0].ps, gs[0].ex, [g.rows for g in gs])
