"""Non-dominated sets with deterministic ties, config ids, and the pareto.parquet file (atomic, with metadata)."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import MessError
from .io import atomic_path

SCHEMA_VERSION = "1"
BASE_COLUMNS = ["config_id", "kind", "n_exits", "positions", "heads", "thresholds", "miou", "pixel_acc",
                "mean_gmacs", "exit_rates", "speedup", "miou_delta_pp", "is_reference"]


def config_id(kind: str, positions, heads, thresholds) -> str:
    """Stable id: "reference", or "c" + 10 hex of sha1("{kind};" + ";".join("{pos}/{head}@{thr!r}"))."""
    if kind == "reference":
        return "reference"
    text = f"{kind};" + ";".join(f"{p}/{h}@{float(t)!r}" for p, h, t in zip(positions, heads, thresholds))
    return "c" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


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


def front_schema(latency_devices=()) -> pa.Schema:
    """The pareto.parquet schema: DESIGN.md's columns plus `kind` and one latency column per device."""
    fields = [
        ("config_id", pa.string()), ("kind", pa.string()), ("n_exits", pa.int64()),
        ("positions", pa.list_(pa.string())), ("heads", pa.list_(pa.string())),
        ("thresholds", pa.list_(pa.float64())), ("miou", pa.float64()), ("pixel_acc", pa.float64()),
        ("mean_gmacs", pa.float64()), ("exit_rates", pa.list_(pa.float64())), ("speedup", pa.float64()),
        ("miou_delta_pp", pa.float64()), ("is_reference", pa.bool_()),
    ]
    fields += [(f"latency_ms_{d}", pa.float64()) for d in latency_devices]
    return pa.schema(fields)


def latency_devices_of(df: pd.DataFrame) -> list[str]:
    """Device names of the latency_ms_<device> columns of a front."""
    return [c[len("latency_ms_"):] for c in df.columns if c.startswith("latency_ms_")]


def write_front(df: pd.DataFrame, path, metadata: dict) -> None:
    """Write the front to Parquet atomically, with string key-value metadata (schema_version added when absent)."""
    missing = [c for c in BASE_COLUMNS if c not in df.columns]
    if missing:
        raise MessError(f"front is missing columns {missing}; pareto.parquet needs {BASE_COLUMNS}")
    schema = front_schema(latency_devices_of(df))
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    meta = {"schema_version": SCHEMA_VERSION}
    meta.update({str(k): "" if v is None else str(v) for k, v in metadata.items()})
    kv = dict(table.schema.metadata or {})
    kv.update({k.encode(): v.encode() for k, v in meta.items()})
    table = table.replace_schema_metadata(kv)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_front(path) -> tuple[pd.DataFrame, dict]:
    """Read pareto.parquet: the DataFrame and its key-value metadata (str -> str, pandas' own entry left out)."""
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
    return table.to_pandas(), meta
