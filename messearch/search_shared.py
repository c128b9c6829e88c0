"""Shared thresholds, incremental and compiled: every exit of a configuration uses one threshold t.

A tree is a first position with some thresholds, taken in ascending order (steps). Image i passes exit e for the
first b[i, e] steps (its bin) and survives a prefix of exits from step s[i] = the largest bin of the prefix's
exits. A new exit c therefore takes image i at the steps s[i] <= t < b[i, c]: its sums over all steps are one
difference array (+x at s[i], -x at b[i, c]) and one running sum, so every image enters each (prefix, new
exit) pair once instead of once per threshold. The kernel walks the prefixes depth first, carrying each
prefix's counts per step; every sum is an exact int64.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from . import search_kernel as sk


def threshold_bins(prep, tree_t: np.ndarray) -> np.ndarray:
    """int64 [E, N]: how many of the thresholds tree_t (ascending in value) each image passes at each exit."""
    return np.ascontiguousarray((~prep.fail[:, :, tree_t]).sum(axis=2).T.astype(np.int64))


@nb.njit(**sk.JIT)
def shared_tree(x, b, p1, heads, max_exits, model, state, out, emit_all, pf, stair, elite, obj, lat, ist):
    """Every cascade of the tree (first exit at position p1), depth first; pauses (returns) when the output buffer
    could overflow and resumes from `state`; ist[6] = 1 when done. x [E, N, Wp] rows; b [E, N] bins."""
    cur, pe, cnt, sv, lst, nl, diff, run, ex, st, na, hm, am, hl, al = state
    n, gt, mbb, mhd, mk, lbb, lhd, lk = model
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
        # the images exit c takes at step t: s <= t < b[c]; +x at s, -x at b[c] (row `steps` is never read)
        diff[:, :] = 0
        for q in range(nl[j]):
            i = lst[j, q]
            s, bc = sv[j, i], b[c, i]
            if s < bc:
                for m in range(wp):
                    v = x[c, i, m]
                    diff[s, m] += v
                    diff[bc, m] -= v
        run[:] = 0
        h = hm[j] + mhd[c]
        hm[j + 1] = h
        for d in range(n_dev):
            hl[j + 1, d] = hl[j, d] + lhd[d, c]
        for t in range(steps):
            for m in range(wp):
                run[m] += diff[t, m]
                cnt[j + 1, t, m] = cnt[j, t, m] + run[m]
            row = cnt[j + 1, t]
            nat = row[col] - cnt[j, t, col]
            nf = n - row[col]
            a = am[j, t] + nat * (mbb[c] + h)
            am[j + 1, t] = a
            macsum = a + nf * ((mk[0] + h) + mk[1])
            for d in range(n_dev):
                hd = hl[j + 1, d]
                ad = al[j, t, d] + np.float64(nat) * (lbb[d, c] + hd)
                al[j + 1, t, d] = ad
                lat[d] = ad + np.float64(nf) * ((lk[d, 0] + hd) + lk[d, 1])
            miou = sk.miou_of(row, gt)
            ist[2] += 1
            if sk.keep(miou, macsum, lat, n, emit_all, pf, stair, elite, obj):
                for j2 in range(j + 1):
                    ex[j2] = pe[j2] if j2 < j else c
                    st[j2] = t
                    na[j2] = cnt[j2 + 1, t, col] - cnt[j2, t, col]
                sk.write(out, ist, ex, st, na, j + 1, row, macsum, lat, miou)
        nxt = (c // heads + 1) * heads
        if j + 1 < max_exits and nxt < n_exit:
            # the prefix grows by c: images survive it from max(s, b[c]); those that never do leave the list
            m2 = 0
            for q in range(nl[j]):
                i = lst[j, q]
                s = max(sv[j, i], b[c, i])
                if s < steps:
                    sv[j + 1, i] = s
                    lst[j + 1, m2] = i
                    m2 += 1
            nl[j + 1] = m2
            pe[j] = c
            cur[j + 1] = nxt
            ist[0] = j + 1


def eval_tree_shared(prep, roots, sink) -> None:
    """Evaluate every cascade whose first exit is at position p, with shared threshold index t, (t, p) in roots
    (one position); hands rows to sink.take."""
    (p1,) = {int(p) for _, p in roots}
    order = np.argsort(prep.thresholds, kind="stable")   # threshold indices ascending in value
    tree_t = order[np.isin(order, sorted({int(t) for t, _ in roots}))]
    n, k, steps, wp, dev = prep.n, prep.max_exits, len(tree_t), prep.xt.shape[2], len(prep.devices)
    cnt = np.zeros((k + 1, steps, wp), np.int64)
    cnt[0, :, :prep.width] = prep.base
    lst = np.zeros((k + 1, n), np.int64)
    lst[0] = np.arange(n)
    nl = np.zeros(k + 1, np.int64)
    nl[0] = n
    cur = np.zeros(k + 1, np.int64)
    cur[0] = p1 * len(prep.heads)
    ints = [np.zeros(k, np.int64) for _ in range(3)]
    state = (cur, np.zeros(k + 1, np.int64), cnt, np.zeros((k + 1, n), np.int64), lst, nl,
             np.zeros((steps + 1, wp), prep.xt.dtype), np.zeros(wp, prep.xt.dtype), *ints,
             np.zeros(k + 1, np.int64), np.zeros((k + 1, steps), np.int64), np.zeros((k + 1, dev)),
             np.zeros((k + 1, steps, dev)))
    args = (prep.xt, threshold_bins(prep, tree_t), np.int64(p1), np.int64(len(prep.heads)), np.int64(k),
            sk.model_of(prep), state)
    sk.run(prep, shared_tree, args, np.zeros(8, np.int64), sink, tree_t)
