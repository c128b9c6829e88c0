"""Pareto dominance: the non-dominated rows of objective vectors (every column minimised), ties deterministic."""

from __future__ import annotations

import numpy as np


def nondominated_mask(obj: np.ndarray) -> np.ndarray:
    """Rows of obj [M, d] (every column minimised) that no other row dominates; rows with equal vectors all stay."""
    obj = np.asarray(obj, dtype=np.float64)
    m, d = obj.shape
    keep = np.zeros(m, dtype=bool)
    if m == 0:
        return keep
    order = np.lexsort(obj.T[::-1])  # lexicographic: a dominator always sorts before what it dominates
    s = obj[order]
    new_group = np.ones(m, dtype=bool)
    new_group[1:] = np.any(s[1:] != s[:-1], axis=1)
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(m), 0))
    if d == 2:
        # kept iff every earlier row (lexicographically smaller and not equal) has a larger second objective
        prefix_min = np.empty(m)
        prefix_min[0] = np.inf
        prefix_min[1:] = np.minimum.accumulate(s[:-1, 1])
        keep_sorted = s[:, 1] < prefix_min[group_start]
    else:
        keep_sorted = _nondominated_sorted_general(s, new_group)
    keep[order] = keep_sorted
    return keep


def _nondominated_sorted_general(s: np.ndarray, new_group: np.ndarray, chunk: int = 512) -> np.ndarray:
    """d > 2: compare lexicographically sorted rows in chunks against the front found so far and within the chunk."""
    m = s.shape[0]
    keep = np.zeros(m, dtype=bool)
    front = np.empty((0, s.shape[1]))
    for start in range(0, m, chunk):
        x = s[start:start + chunk]
        dom = np.zeros(len(x), dtype=bool)
        if len(front):
            le = np.all(front[None, :, :] <= x[:, None, :], axis=2)
            lt = np.any(front[None, :, :] < x[:, None, :], axis=2)
            dom |= np.any(le & lt, axis=1)
        le = np.all(x[None, :, :] <= x[:, None, :], axis=2)   # [i, j]: row j <= row i everywhere
        lt = np.any(x[None, :, :] < x[:, None, :], axis=2)
        dom |= np.any(le & lt, axis=1)
        keep[start:start + len(x)] = ~dom
        front = np.concatenate([front, x[~dom]])
    return keep


def pareto_select(obj: np.ndarray, n_exits: np.ndarray, ids_of) -> np.ndarray:
    """Indices of the non-dominated rows of obj, one per equal objective vector: the smallest (n_exits, config_id).

    `ids_of(indices) -> list[str]` gives config ids; it is only called for rows that tie.
    """
    idx = np.flatnonzero(nondominated_mask(obj))
    if len(idx) <= 1:
        return idx
    sub = np.asarray(obj, dtype=np.float64)[idx]
    _, inverse, counts = np.unique(sub, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    single = counts[inverse] == 1
    winners = list(idx[single])
    tied = np.flatnonzero(~single)
    if len(tied):
        ids = ids_of(idx[tied])
        best: dict[int, tuple] = {}
        for pos, cid in zip(tied, ids):
            key = (int(n_exits[idx[pos]]), cid)
            g = int(inverse[pos])
            if g not in best or key < best[g][0]:
                best[g] = (key, idx[pos])
        winners.extend(v[1] for v in best.values())
    return np.sort(np.asarray(winners, dtype=np.int64))
