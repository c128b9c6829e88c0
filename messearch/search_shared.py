"""Shared thresholds, incremental and compiled: every exit of a configuration uses one threshold t.

A tree is a first position with some thresholds, taken in ascending order (steps). Image i passes exit e for the
first b[i, e] steps (its bin) and survives a prefix of exits from step s[i] = the largest bin of the prefix's
exits. A new exit c therefore takes image i at the steps s[i] <= t < b[i, c]: its sums over all steps are one
difference array (+x at s[i], -x at b[i, c]) and one running sum, so every image enters each (prefix, new
exit) pair once instead of once per threshold. The kernel walks the prefixes depth first, carrying each
prefix's counts per step; every sum is an exact integer (int32 where every count fits: search.prepare).

The last exit c of a configuration after a prefix (Q, e) takes the images with max(a, u) <= t < v (a: Q's
survival step, u, v: the bins of e and c), which is [u <= t < v] minus [u <= t < min(a, v)]. The first term is
the pair (e, c) alone, the same for every Q: its running sums are tabled once per process (`pair_sums`). The
second needs only the images with u < a, those Q takes at a step where e would not: with confidence rising
along the backbone, a few of them instead of most surviving images. A second exit (Q empty) is the table alone.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from . import search_kernel as sk

AHEAD = 8              # images ahead whose rows are prefetched
PAIR_BYTES = 1 << 28   # the pair table's budget per process; a larger space sums its last exits as its prefixes


def threshold_bins(prep, tree_t: np.ndarray) -> np.ndarray:
    """int32 [E, N]: how many of the thresholds tree_t (ascending in value) each image passes at each exit."""
    return np.ascontiguousarray((~prep.fail[:, :, tree_t]).sum(axis=2).T.astype(np.int32))


@nb.njit(**sk.JIT)
def pair_sums(x, b, e_lo, heads, off, ps, diff):
    """ps[off[e] + c - first(e)] [steps, Wp]: per step t, the sum of x[c, i] over the images with
    b[e, i] <= t < b[c, i], for every exit e >= e_lo and every c at a later position (first(e) onwards); diff:
    scratch [steps + 1, Wp]."""
    n_exit, n, wp = x.shape
    steps = ps.shape[1]
    for e in range(e_lo, n_exit):
        first = (e // heads + 1) * heads
        for c in range(first, n_exit):
            diff[:, :] = 0
            for i in range(n):
                u, v = b[e, i], b[c, i]
                if u < v:
                    sk.add_sub_row(diff, u, v, x, c, i)
            blk = off[e] + c - first
            for m in range(wp):
                ps[blk, 0, m] = diff[0, m]
            for t in range(1, steps):
                for m in range(wp):
                    ps[blk, t, m] = ps[blk, t - 1, m] + diff[t, m]


@nb.njit(**sk.JIT)
def shared_tree(x, b, p1, heads, max_exits, model, pairs, state, out, emit_all, pf, stair, elite, obj, lat, ist):
    """Every cascade of the tree (first exit at position p1), depth first; pauses (returns) when the output buffer
    could overflow and resumes from `state`; ist[6] = 1 when done. x [E, N, Wp] rows; b [E, N] bins; pairs: the
    pair table (use, off, ps) of pair_sums."""
    (cur, pe, cnt, sv, lst, nl, diff, run, ex, st, na, hm, am, hl, al, few, few_n, row, take) = state
    n, gt, _, mhd, _, _, lhd, _ = model
    use_pairs, off, ps = pairs
    n_exit, _, wp = x.shape
    col = 2 * gt.shape[0]   # the exit counter: images that left at an exit so far
    steps = cnt.shape[1]
    cap = out[0].shape[0]
    n_dev = lat.shape[0]
    while True:
        j = ist[0]
        c = sk.next_exit(ist, cur, j, (p1 + 1) * heads, n_exit, steps, cap)
        if c == -1:
            return
        if c == -2:
            continue
        diff[:, :] = 0
        # the last exit, and the second (Q is empty: the pair's table alone), come from the pair table
        by_pair = use_pairs and (j == 1 or (j >= 1 and j + 1 == max_exits))
        if by_pair:
            # the exit c after (Q, e): the pair (e, c)'s table minus [u <= t < min(a, v)] over Q's few images
            e = pe[j - 1]
            blk = off[e] + c - (e // heads + 1) * heads
            nf = few_n[0] if j >= 2 else 0
            # the images c takes at some step first (u < m2: a third of them are not), then their rows: an update of
            # nothing cost as much as one of something, and a branch mispredicted (same-run A/B: 7% less)
            k = 0
            for q in range(nf):
                i, u = few[0, q], few[1, q]
                m2 = min(few[2, q], b[c, i])
                take[0, k], take[1, k], take[2, k] = i, u, m2
                k += u < m2
            for q in range(k):
                if q + AHEAD < k:
                    sk.prefetch_row(x, c, take[0, q + AHEAD])
                sk.add_sub_row(diff, take[1, q], take[2, q], x, c, take[0, q])
        else:
            # the images exit c takes at step t: s <= t < b[c]; +x at s, -x at b[c] (rows from `steps` on are never read)
            for q in range(nl[j]):
                if q + AHEAD < nl[j]:
                    sk.prefetch_row(x, c, lst[j, q + AHEAD])
                i = lst[j, q]
                s, bc = sv[j, i], b[c, i]
                if s < bc:
                    sk.add_sub_row(diff, s, bc, x, c, i)
        run[:] = 0
        h = hm[j] + mhd[c]
        hm[j + 1] = h
        for d in range(n_dev):
            hl[j + 1, d] = hl[j, d] + lhd[d, c]
        leaf = j + 1 == max_exits
        for t in range(steps):
            # the configuration's counts in `row` (a view per step would cost two atomic reference counts)
            if by_pair:
                for m in range(wp):
                    run[m] += diff[t, m]
                    row[m] = cnt[j, t, m] + (ps[blk, t, m] - run[m])
            else:
                for m in range(wp):
                    run[m] += diff[t, m]
                    row[m] = cnt[j, t, m] + run[m]
            if not leaf:
                for m in range(wp):
                    cnt[j + 1, t, m] = row[m]
            nat = row[col] - cnt[j, t, col]
            am[j + 1, t], macsum = sk.costs(model, c, h, nat, n - row[col], am[j, t], al[j, t], hl[j + 1], lat,
                                            al[j + 1, t])
            ist[2] += 1
            miou = sk.miou_of(row, gt)
            if sk.keep(miou, macsum, lat, n, emit_all, pf, stair, elite, obj):
                for j2 in range(j + 1):
                    ex[j2] = pe[j2] if j2 < j else c
                    st[j2] = t
                    na[j2] = (cnt[j2 + 1, t, col] if j2 < j else row[col]) - cnt[j2, t, col]
                sk.write(out, ist, ex, st, na, j + 1, row, macsum, lat, miou)
        nxt = (c // heads + 1) * heads
        if j + 1 < max_exits and nxt < n_exit:
            # the prefix grows by c: every image survives it from max(s, b[c]) (steps: never)
            for i in range(n):
                sv[j + 1, i] = max(sv[j, i], b[c, i])
            if use_pairs and j + 2 == max_exits:
                # its children are last exits: keep the images this prefix's Q takes where c would not (u < a)
                m2 = 0
                for i in range(n):
                    if b[c, i] < sv[j, i]:
                        few[0, m2], few[1, m2], few[2, m2] = i, b[c, i], sv[j, i]
                        m2 += 1
                few_n[0] = m2
            else:
                m2 = 0
                for q in range(nl[j]):
                    i = lst[j, q]
                    if sv[j + 1, i] < steps:
                        lst[j + 1, m2] = i
                        m2 += 1
                nl[j + 1] = m2
            pe[j] = c
            cur[j + 1] = nxt
            ist[0] = j + 1


def _pair_blocks(prep, e_lo: int) -> np.ndarray:
    """int64 [E]: how many pair blocks exit e has in the table of first exit e_lo (the exits at later positions)."""
    heads, n_exit = len(prep.heads), prep.n_exits
    first = (np.arange(n_exit) // heads + 1) * heads
    return np.where(np.arange(n_exit) >= e_lo, n_exit - first, 0).astype(np.int64)


def pair_table_bytes(prep, steps: int, e_lo: int = 0) -> int:
    """The bytes of the pair table a process builds for trees of first exit >= e_lo and `steps` thresholds; 0 when
    it builds none (one exit at most, an empty table, or over PAIR_BYTES)."""
    size = int(_pair_blocks(prep, e_lo).sum()) * steps * prep.xt.shape[2] * prep.xt.itemsize
    return size if prep.max_exits >= 2 and size <= PAIR_BYTES else 0


def _pair_table(prep, tree_t: np.ndarray, b: np.ndarray, e_lo: int):
    """(use, off, ps) for the trees of first exit >= e_lo with thresholds tree_t: computed once per process and
    thresholds, reused by later trees (shards take trees in ascending first position). use is False, with empty
    arrays, where pair_table_bytes builds none."""
    key = tree_t.tobytes()
    memo = prep.memo.get("pairs")
    if memo is not None and memo[0] == key and memo[1] <= e_lo:
        return memo[2]
    count = _pair_blocks(prep, e_lo)
    off = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    wp = prep.xt.shape[2]
    if pair_table_bytes(prep, len(tree_t), e_lo):
        ps = np.empty((int(count.sum()), len(tree_t), wp), prep.xt.dtype)
        pair_sums(prep.xt, b, np.int64(e_lo), np.int64(len(prep.heads)), off, ps,
                  np.zeros((len(tree_t) + 1, wp), prep.xt.dtype))
        table = (True, off, ps)
    else:
        table = (False, off, np.zeros((0, 1, wp), prep.xt.dtype))
    prep.memo["pairs"] = (key, e_lo, table)
    return table


def eval_tree_shared(prep, roots, sink) -> None:
    """Evaluate every cascade whose first exit is at position p, with shared threshold index t, (t, p) in roots
    (one position); hands rows to sink.take."""
    (p1,) = {int(p) for _, p in roots}
    order = np.argsort(prep.thresholds, kind="stable")   # threshold indices ascending in value
    tree_t = order[np.isin(order, sorted({int(t) for t, _ in roots}))]
    n, k, steps, wp, dev = prep.n, prep.max_exits, len(tree_t), prep.xt.shape[2], len(prep.devices)
    b = threshold_bins(prep, tree_t)
    pairs = _pair_table(prep, tree_t, b, p1 * len(prep.heads))
    cnt = np.zeros((k + 1, steps, wp), prep.count_dtype)
    cnt[0, :, :prep.width] = prep.base
    lst = np.zeros((k + 1, n), np.int64)
    lst[0] = np.arange(n)
    nl = np.zeros(k + 1, np.int64)
    nl[0] = n
    cur = np.zeros(k + 1, np.int64)
    cur[0] = p1 * len(prep.heads)
    ints = [np.zeros(k, np.int64) for _ in range(3)]
    # diff: a bin is at most `steps`, so rows 0..steps (add_sub_row checks no bounds)
    state = (cur, np.zeros(k + 1, np.int64), cnt, np.zeros((k + 1, n), np.int64), lst, nl,
             np.zeros((steps + 1, wp), prep.xt.dtype), np.zeros(wp, prep.xt.dtype), *ints,
             np.zeros(k + 1, np.int64), np.zeros((k + 1, steps), np.int64), np.zeros((k + 1, dev)),
             np.zeros((k + 1, steps, dev)), np.zeros((3, n), np.int64), np.zeros(1, np.int64),
             np.zeros(wp, prep.count_dtype), np.zeros((3, n), np.int64))
    args = (prep.xt, b, np.int64(p1), np.int64(len(prep.heads)), np.int64(k), sk.model_of(prep), pairs, state)
    sk.run(prep, shared_tree, args, np.zeros(8, np.int64), sink, tree_t)
