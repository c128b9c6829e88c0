"""Per-exit thresholds, incremental and compiled: every exit of a configuration has its own threshold.

With thresholds in ascending order (steps), image i passes exit c for the first b[i, c] steps (its bin). A
prefix (exits and their thresholds) keeps the list of images that pass none of its exits. A new exit c at
step t takes the survivors with b > t: one histogram of the survivors' rows by bin and one running sum from the
top step down give all its thresholds, so each survivor enters each (prefix, new exit) pair once instead of
once per threshold. The kernel walks the prefixes depth first; every sum is an exact int64.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from . import search_kernel as sk
from .search_shared import threshold_bins


@nb.njit(**sk.JIT)
def per_exit_tree(x, b, p1, heads, max_exits, first, model, state, out, emit_all, pf, stair, elite, obj, lat,
                  ist):
    """Every cascade of the tree (first exit at position p1 with a first step where first[t]), depth first; pauses
    (returns) when the output buffer could overflow and resumes from `state`; ist[6] = 1 when done."""
    (nextc, curc, tnext, leaf, leaf_t, pe, pt, pn, cnt, ext, lst, nl, hist, run, leaf_row, order, off, ex, st, na,
     hm, am, amt, hl, al, alt, lat2, al_leaf) = state
    n, gt, _, mhd, _, _, lhd, _ = model
    n_exit, _, wp = x.shape
    col = 2 * gt.shape[0]   # the exit counter: images that left at an exit so far
    steps = ext.shape[1]
    cap = out[0].shape[0]
    n_dev = lat.shape[0]
    while True:
        j = ist[0]
        if leaf[j] < n_exit:
            # the last exit c3 after every (c, t2): c's thresholds' survivors are nested (b <= t2 grows with t2), so
            # one histogram by c3's bin takes each image once, at its bin of c, for all of them
            c, c3 = curc[j], leaf[j]
            if leaf_t[j] == steps:
                leaf[j], leaf_t[j] = c3 + 1, 0
                continue
            if leaf_t[j] == 0:
                hist[:, :] = 0
            h = hm[j + 1] + mhd[c3]
            for d in range(n_dev):
                lat2[d] = hl[j + 1, d] + lhd[d, c3]
            for t2 in range(leaf_t[j], steps):
                if ist[1] + steps > cap:
                    leaf_t[j] = t2   # paused: the histogram of the images up to bin t2 - 1 stays in `hist`
                    return
                for q in range(off[t2], off[t2 + 1]):
                    i = order[q]
                    b3 = b[c3, i]
                    if b3 > 0:
                        for m in range(wp):
                            hist[b3, m] += x[c3, i, m]
                if j == 0 and not first[t2]:
                    continue
                run[:] = 0
                for t in range(steps - 1, -1, -1):
                    for m in range(wp):
                        run[m] += hist[t + 1, m]
                        leaf_row[m] = ext[j, t2, m] + run[m]
                    nat = leaf_row[col] - ext[j, t2, col]
                    _, macsum = sk.costs(model, c3, h, nat, n - leaf_row[col], amt[j, t2], alt[j, t2], lat2, lat,
                                         al_leaf)
                    miou = sk.miou_of(leaf_row, gt)
                    ist[2] += 1
                    if sk.keep(miou, macsum, lat, n, emit_all, pf, stair, elite, obj):
                        for j2 in range(j):
                            ex[j2], st[j2], na[j2] = pe[j2], pt[j2], pn[j2]
                        ex[j], st[j], na[j] = c, t2, ext[j, t2, col] - cnt[j, col]
                        ex[j + 1], st[j + 1], na[j + 1] = c3, t, nat
                        sk.write(out, ist, ex, st, na, j + 2, leaf_row, macsum, lat, miou)
            leaf_t[j] = steps
            continue
        if tnext[j] < steps:
            # descend into (curc[j], t): its survivors fail c at step t (b <= t)
            t = tnext[j]
            tnext[j] = t + 1
            if j == 0 and not first[t]:
                continue
            c = curc[j]
            m2 = 0
            for q in range(nl[j]):
                i = lst[j, q]
                if b[c, i] <= t:
                    lst[j + 1, m2] = i
                    m2 += 1
            nl[j + 1] = m2
            for m in range(wp):
                cnt[j + 1, m] = ext[j, t, m]
            pe[j], pt[j], pn[j] = c, t, ext[j, t, col] - cnt[j, col]
            am[j + 1] = amt[j, t]
            for d in range(n_dev):
                al[j + 1, d] = alt[j, t, d]
            nextc[j + 1] = (c // heads + 1) * heads
            tnext[j + 1] = steps
            ist[0] = j + 1
            continue
        c = sk.next_exit(ist, nextc, j, (p1 + 1) * heads, n_exit, steps, cap)
        if c == -1:
            return
        if c == -2:
            continue
        # exit c at step t takes the survivors whose bin is above t: a histogram by bin, summed from the top
        hist[:, :] = 0
        for q in range(nl[j]):
            i = lst[j, q]
            bc = b[c, i]
            if bc > 0:
                for m in range(wp):
                    hist[bc, m] += x[c, i, m]
        run[:] = 0
        for t in range(steps - 1, -1, -1):
            for m in range(wp):
                run[m] += hist[t + 1, m]
                ext[j, t, m] = cnt[j, m] + run[m]
        h = hm[j] + mhd[c]
        hm[j + 1] = h
        for d in range(n_dev):
            hl[j + 1, d] = hl[j, d] + lhd[d, c]
        for t in range(steps):
            if j == 0 and not first[t]:
                continue
            row = ext[j, t]
            nat = row[col] - cnt[j, col]
            amt[j, t], macsum = sk.costs(model, c, h, nat, n - row[col], am[j], al[j], hl[j + 1], lat, alt[j, t])
            miou = sk.miou_of(row, gt)
            ist[2] += 1
            if sk.keep(miou, macsum, lat, n, emit_all, pf, stair, elite, obj):
                for j2 in range(j):
                    ex[j2], st[j2], na[j2] = pe[j2], pt[j2], pn[j2]
                ex[j], st[j], na[j] = c, t, nat
                sk.write(out, ist, ex, st, na, j + 1, row, macsum, lat, miou)
        if j + 1 < max_exits and (c // heads + 1) * heads < n_exit:
            curc[j] = c
            if j + 2 < max_exits:
                tnext[j] = 0
            else:
                # the prefixes (c, t2) are the last ones: order the survivors by their bin of c (counting sort)
                off[:] = 0
                for q in range(nl[j]):
                    off[b[c, lst[j, q]] + 1] += 1
                for t in range(steps + 1):
                    off[t + 1] += off[t]
                for q in range(nl[j]):
                    i = lst[j, q]
                    bc = b[c, i]
                    order[off[bc]] = i
                    off[bc] += 1
                for t in range(steps + 1, 0, -1):
                    off[t] = off[t - 1]
                off[0] = 0
                leaf[j] = (c // heads + 1) * heads


def eval_tree(prep, roots, sink) -> None:
    """Evaluate every cascade whose first exit is a head at position p with threshold index t, (t, p) in roots
    (one position); hands rows to sink.take."""
    (p1,) = {int(p) for _, p in roots}
    tree_t = np.argsort(prep.thresholds, kind="stable")   # threshold indices ascending in value
    first = np.isin(tree_t, sorted({int(t) for t, _ in roots}))
    n, k, steps, wp, dev = prep.n, prep.max_exits, len(tree_t), prep.xt.shape[2], len(prep.devices)
    cnt = np.zeros((k + 1, wp), np.int64)
    cnt[0, :prep.width] = prep.base
    lst = np.zeros((k + 1, n), np.int64)
    lst[0] = np.arange(n)
    nl = np.zeros(k + 1, np.int64)
    nl[0] = n
    nextc = np.zeros(k + 1, np.int64)
    nextc[0] = p1 * len(prep.heads)
    tnext = np.full(k + 1, steps, np.int64)
    leaf = np.full(k + 1, prep.n_exits, np.int64)
    z = [np.zeros(k + 1, np.int64) for _ in range(4)]
    ints = [np.zeros(k, np.int64) for _ in range(3)]
    state = (nextc, z[0], tnext, leaf, np.zeros(k + 1, np.int64), z[1], z[2], z[3], cnt,
             np.zeros((k + 1, steps, wp), np.int64), lst, nl,
             np.zeros((steps + 1, wp), prep.xt.dtype), np.zeros(wp, prep.xt.dtype), np.zeros(wp, np.int64),
             np.zeros(n, np.int64), np.zeros(steps + 2, np.int64), *ints,
             np.zeros(k + 1, np.int64), np.zeros(k + 1, np.int64), np.zeros((k + 1, steps), np.int64),
             np.zeros((k + 1, dev)), np.zeros((k + 1, dev)), np.zeros((k + 1, steps, dev)), np.zeros(dev),
             np.zeros(dev))
    args = (prep.xt, threshold_bins(prep, tree_t), np.int64(p1), np.int64(len(prep.heads)), np.int64(k), first,
            sk.model_of(prep), state)
    sk.run(prep, per_exit_tree, args, np.zeros(8, np.int64), sink, tree_t)
