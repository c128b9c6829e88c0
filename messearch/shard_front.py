"""A shard's front: the non-dominated rows (ties kept) of every row the evaluator hands over, and the helpers
on the evaluator's rows (dicts of equal-length arrays, the form search.block_metrics returns)."""

from __future__ import annotations

import numpy as np

from .pareto import nondominated_mask
from .search import Prepared
from .search_kernel import Output

KEEP_ALL_ROWS = 500_000   # rows handed to the --keep-all writer at a time


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

    Memory stays bounded: the kernels hand over only the configurations that no earlier one dominates (their
    pre-filter), and those are reduced as they arrive. With a `writer` (--keep-all) the kernels hand over every
    row, which also goes to writer(rows) in chunks of about flush_rows (KEEP_ALL_ROWS) rows.
    """

    emit_all = False   # the kernels hand over every configuration, not only the pre-filter's candidates

    def __init__(self, prep: Prepared, writer=None, limit: int = 100_000, flush_rows: int | None = None):
        self.prep, self.writer, self.limit, self.flush_rows = prep, writer, limit, flush_rows or KEEP_ALL_ROWS
        self.parts, self.size, self.n_evaluated, self.all_parts, self.pending = [], 0, 0, [], 0
        self._output = None

    @property
    def keep_all(self) -> bool:
        return self.writer is not None

    def output(self, prep: Prepared) -> Output:
        """The kernels' output buffer and pre-filter, one per sink (the pre-filter carries over the shard's trees)."""
        if self._output is None:
            self._output = Output(prep, emit_all=self.emit_all or self.keep_all)
        return self._output

    def take(self, rows: dict, n_evaluated: int) -> None:
        """Rows from a kernel, standing for n_evaluated configurations (the rest were dominated)."""
        self.n_evaluated += n_evaluated
        if len(rows["miou"]):
            if self.keep_all:
                self._pend(rows)
            self._keep(take_rows(rows, nondominated_mask(objectives(rows, self.prep.devices))))

    def add(self, rows: dict) -> None:
        """Add materialised rows (static truncations, small sets)."""
        self.take(rows, len(rows["miou"]))

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

    def rows(self) -> dict:
        """The non-dominated rows so far (ties kept)."""
        if not self.parts:
            return {}
        rows = concat_rows(self.parts)
        rows = take_rows(rows, nondominated_mask(objectives(rows, self.prep.devices)))
        self.parts, self.size = [rows], len(rows["miou"])
        return rows
