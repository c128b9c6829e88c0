"""The plain evaluator: a small space's cascades in numpy, without the compiled kernels. The kernels' first compile
on a machine takes about 8 s and each process's load of them about 0.5 s; numpy takes about 1.6 us per
configuration plus 12 ns per configuration and image (the quickstart's 17,880 configurations over 128 images in
0.06 s). Up to PLAIN_MAX_WORK (about 0.5 s) a search is quicker plain. Its rows are the kernels' exactly: the same
per-image count rows summed exactly, metrics through search.block_metrics (the tests compare them row for row)."""

from __future__ import annotations

import itertools

import numpy as np

PLAIN_MAX_WORK = 40_000_000   # "auto" evaluates plain up to this work (plain_work), about 0.5 s
ROW_IMAGES = 130              # a configuration's row (metrics, the front's filter) costs about 130 images
BLOCK_CELLS = 1 << 22         # configurations x (images + row width) of one numpy block: this x 8 B in float64


def plain_work(spec, n_images: int) -> int:
    """The plain evaluator's work for a space over n_images: configurations x (images + ROW_IMAGES)."""
    return spec.n_configs() * (int(n_images) + ROW_IMAGES)


def use_plain(spec, n_images: int) -> bool:
    """Whether a search of `spec` over n_images runs the plain evaluator: asked for, or "auto" and it is small."""
    return spec.evaluator == "plain" or (spec.evaluator == "auto" and plain_work(spec, n_images) <= PLAIN_MAX_WORK)


def plain_bytes(prep) -> int:
    """Peak bytes of the plain evaluator beyond the prepared cache, at most: its float64 copy of the count rows
    and one block's arrays (0/1 rows in float64, sums, masks: about three times BLOCK_CELLS x 8 B)."""
    return prep.n * prep.n_exits * prep.width * 8 + 3 * 8 * BLOCK_CELLS


def _cascades(prep, roots, k: int, rows: int):
    """The (exits, threshold indices) [M, k] of every k-exit cascade whose first exit is at position p with first
    threshold index t, (t, p) in roots (one position), in arrays of about `rows` (built as they are used)."""
    h, n_thr = len(prep.heads), len(prep.thresholds)
    (p1,) = {int(p) for _, p in roots}
    heads = np.stack(np.meshgrid(*[np.arange(h)] * k, indexing="ij"), axis=-1).reshape(-1, k)
    if prep.shared or k == 1:
        firsts, rest = [[int(t)] * k for t, _ in roots], [()]
    else:
        firsts = [[int(t)] for t, _ in roots]
        rest = list(itertools.product(range(n_thr), repeat=k - 1))
    tidx = np.array([f + list(r) for f in firsts for r in rest], np.int64).reshape(-1, k)
    parts, size, per = [], 0, max(1, rows // len(heads))   # threshold rows per part
    for later in itertools.combinations(range(p1 + 1, len(prep.positions)), k - 1):
        exits = np.array((p1, *later), np.int64) * h + heads
        for s in range(0, len(tidx), per):
            ti = tidx[s:s + per]
            parts.append((np.tile(exits, (len(ti), 1)), np.repeat(ti, len(exits), axis=0)))
            size += len(exits) * len(ti)
            if size >= rows:
                yield np.concatenate([e for e, _ in parts]), np.concatenate([t for _, t in parts])
                parts, size = [], 0
    if parts:
        yield np.concatenate([e for e, _ in parts]), np.concatenate([t for _, t in parts])


def _block_counts(prep, exits: np.ndarray, tidx: np.ndarray):
    """Counts [M, W] (int64) and images leaving at each exit [M, k] of M cascades: each image takes the first exit
    whose confidence reaches its threshold, else the final head (whose totals are prep.base).

    The sums over images are float64 products of 0/1 rows with the count rows, grouped by exit: exact, because
    search.prepare has checked that every sum of count rows stays below 2**53."""
    m, k = exits.shape
    rows = prep.memo.get("plain_rows")
    if rows is None:
        rows = prep.memo["plain_rows"] = np.ascontiguousarray(prep.xd.transpose(1, 0, 2), np.float64)   # [E, N, W]
    sums = np.zeros((m, prep.width))
    n_at = np.zeros((m, k), np.int64)
    alive = np.ones((m, prep.n), bool)
    for j in range(k):
        take = alive & ~prep.fail[:, exits[:, j], tidx[:, j]].T
        alive &= ~take
        n_at[:, j] = take.sum(axis=1)
        for e in np.unique(exits[:, j]):
            at = np.flatnonzero(exits[:, j] == e)
            sums[at] += take[at].astype(np.float64) @ rows[e]
    return prep.base + sums.astype(np.int64), n_at


def plain_blocks(prep, roots):
    """Every cascade whose first exit is at position p with first threshold index t, (t, p) in roots (one
    position), in blocks: (exits, threshold indices, counts, images leaving at each exit), for search.block_metrics."""
    per_block = max(1, BLOCK_CELLS // (prep.n + prep.width))
    for k in range(1, prep.max_exits + 1):
        for exits, tidx in _cascades(prep, roots, k, per_block):
            for s in range(0, len(exits), per_block):
                ex, ti = exits[s:s + per_block], tidx[s:s + per_block]
                yield (ex, ti, *_block_counts(prep, ex, ti))
