"""Per-exit thresholds, incremental: the images that fail a prefix's last exit form nested sets as its
threshold rises, so the product of threshold t is the product of the previous threshold plus one over the
images that fail at t but not before (one segment): each image enters one product per head instead of T.
Trees are rooted at a first position with all its first thresholds."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from . import search_blocks as sb
from .search_blocks import Group, Rows, block_of, child_rows, exact_runs, group_of


def _fail(prep, e: int, tcols: np.ndarray) -> np.ndarray:
    """bool [N, Tc]: images that do not leave at exit e with each threshold (all of them for the root)."""
    return np.ones((prep.n, len(tcols)), dtype=bool) if e < 0 else prep.fail[:, e][:, tcols]



def _extend(prep, g: Group, d: np.ndarray, tree_t: np.ndarray, cols: np.ndarray, tsel: np.ndarray,
            chunk_elems: int):
    """Yield Blocks of every prefix in g extended by each (exit in cols, threshold tree_t[tsel]); d is [N, E, Tt, W].

    For one head of the last prefix exit, its thresholds' failing sets are nested: the product over a
    threshold's new segment of images is added to the previous threshold's sums (exact: integers in BLAS,
    runs bounded by exact_runs, float64 accumulation). With one threshold (shared mode) all heads go in one product.
    """
    n, w, h_all = prep.n, prep.width, len(prep.heads)
    n_h, n_p, tcn = len(g.ex), len(g.ps), len(g.tcols)
    col_t = tree_t[tsel]
    step_pos = max(1, sb.COLUMN_ELEMS // (h_all * len(tsel) * w))
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
                    runs = exact_runs(prep, idx) if len(idx) else []
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
                yield block_of(prep, rows, ce, col_t, counts,
                             lambda ps=ps, f=f: (ps[None, :, None, :] & f.transpose(0, 2, 1)[:, None, :, :]).reshape(-1, n))



def eval_tree(prep, roots, sink, chunk_elems: int | None = None) -> None:
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
    chunk_elems = chunk_elems or sb.BLOCK_ELEMS[False]
    groups = defaultdict(list)
    for p in sorted(by_p):
        es = np.arange(p * h, (p + 1) * h)
        for b in _extend(prep, root, d, tree_t, es, np.flatnonzero(np.isin(tree_t, sorted(by_p[p]))), chunk_elems):
            sink.block(b)
            if prep.max_exits > 1:
                groups[p].append(child_rows(b, slice(0, h)))
    for level in range(2, prep.max_exits + 1):
        nxt = defaultdict(list)
        for p in sorted(groups):
            first = (p + 1) * h
            if first >= e_all:
                continue
            g = group_of(groups[p], prep.width)
            for b in _extend(prep, g, d, tree_t, np.arange(first, e_all), np.arange(len(tree_t)), chunk_elems):
                sink.block(b)
                if level < prep.max_exits:
                    q0 = int(b.col_exits[0]) // h
                    for q in range(q0, q0 + len(b.col_exits) // h):
                        nxt[q].append(child_rows(b, slice((q - q0) * h, (q - q0 + 1) * h)))
        groups = nxt

