"""A shard's front: the non-dominated rows (ties kept) of every block the evaluator yields, and the helpers
on the evaluator's rows (dicts of equal-length arrays, the form search.block_metrics returns)."""

from __future__ import annotations

import numpy as np

from .pareto import nondominated_mask
from . import stats
from .config import KIND_CASCADE
from .search import Block, Prepared, pad_columns

KEEP_ALL_ROWS = 500_000   # rows handed to the --keep-all writer at a time


def block_rows(prep: Prepared, b: Block, idx: np.ndarray, miou: np.ndarray | None = None) -> dict:
    """Materialise the configurations at flat indices idx of a block as rows (the form block_metrics returns)."""
    r, c, t = np.unravel_index(idx, b.n_new.shape)
    k = b.rows.exits.shape[1] + 1
    counts = b.counts.reshape(-1, prep.width)[idx]
    tp = counts[:, :prep.n_classes].astype(np.int64)
    rows = {
        "kind": np.full(len(idx), KIND_CASCADE, dtype=np.int8), "n_exits": np.full(len(idx), k, dtype=np.int8),
        "exits": pad_columns(np.concatenate([b.rows.exits[r], b.col_exits[c][:, None]], axis=1), prep.max_exits, -1),
        "tidx": pad_columns(np.concatenate([b.rows.tidx[r], b.col_t[t][:, None]], axis=1), prep.max_exits, -1),
        "n_at": pad_columns(np.concatenate([b.rows.n_at[r], b.n_new.reshape(-1)[idx, None].astype(np.int64)], axis=1),
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


def block_objectives(prep: Prepared, b: Block, chunk: int = 4096) -> np.ndarray:
    """[M, d] objectives to minimise of a whole block; mIoU through stats.miou_from_counts in cache-sized chunks
    (on the float64 counts themselves: exact integers below 2**53)."""
    counts = b.counts.reshape(-1, prep.width)
    c = prep.n_classes
    miou = np.empty(len(counts))
    for s in range(0, len(counts), chunk):
        part = counts[s:s + chunk]
        miou[s:s + chunk] = stats.miou_from_counts(part[:, :c], part[:, c:2 * c], prep.gt)
    cols = [-miou, b.total["macs"].reshape(-1) / prep.n / 1e9]
    cols += [b.total[f"lat:{dev}"].reshape(-1) / prep.n for dev in prep.devices]
    return np.stack(cols, axis=1)


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


class FrontSink:
    """Keeps the non-dominated rows (ties kept) of everything it is given, refiltering as it grows.

    Memory stays bounded: each block is reduced to its candidates as it arrives. With a `writer` (--keep-all)
    every row is also handed to writer(rows) in chunks of about flush_rows (KEEP_ALL_ROWS) rows.
    """

    def __init__(self, prep: Prepared, writer=None, limit: int = 100_000, flush_rows: int | None = None):
        self.prep, self.writer, self.limit, self.flush_rows = prep, writer, limit, flush_rows or KEEP_ALL_ROWS
        self.parts, self.size, self.n_evaluated, self.all_parts, self.pending = [], 0, 0, [], 0
        self.front = np.empty((0, 2 + len(prep.devices)))

    @property
    def keep_all(self) -> bool:
        return self.writer is not None

    def block(self, b: Block) -> None:
        obj = block_objectives(self.prep, b)
        self.n_evaluated += len(obj)
        if self.keep_all:
            self._pend(block_rows(self.prep, b, np.arange(len(obj)), -obj[:, 0]))
        cand = np.flatnonzero(~self._dominated_by_front(obj))
        cand = cand[nondominated_mask(obj[cand])]
        self._keep(block_rows(self.prep, b, cand, -obj[cand, 0]))

    def add(self, rows: dict) -> None:
        """Add materialised rows (static truncations, small sets)."""
        self.n_evaluated += len(rows["miou"])
        if self.keep_all:
            self._pend(rows)
        self._keep(take_rows(rows, nondominated_mask(objectives(rows, self.prep.devices))))

    def _pend(self, rows: dict) -> None:
        self.all_parts.append(rows)
        self.pending += len(rows["miou"])
        if self.pending >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Hand the rows kept for --keep-all to the writer."""
        if self.all_parts:
            self.writer(concat_rows(self.all_parts))
            self.all_parts, self.pending = [], 0

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
