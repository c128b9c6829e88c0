"""The Pareto front as a table: assembled from the evaluator's rows, filtered by constraints, stored as
pareto.parquet (atomically, with metadata), and the pandas helpers for the usual questions about it.

Columns are DESIGN.md's (plus `kind` and one `latency_ms_<device>` per profiled device). One predicate,
`meets`, decides whether a row meets the constraints, for the search (on row arrays) and for
`filter_front` (on a DataFrame) alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .config import KIND_NAMES, KIND_REFERENCE, KIND_STATIC, config_id
from .errors import MessError
from .files import atomic_path
from .pareto import pareto_select
from .search import Prepared, reference_rows
from .search_spec import SearchSpec
from .shard_front import concat_rows, objectives, take_rows

SCHEMA_VERSION = "1"
BASE_COLUMNS = ["config_id", "kind", "n_exits", "positions", "heads", "thresholds", "miou", "pixel_acc",
                "mean_gmacs", "exit_rates", "speedup", "miou_delta_pp", "is_reference"]


# ------------------------------------------------------------------------------------------- constraints

def latency_budget(max_latency_ms) -> dict:
    """A latency budget as {device: ms}, from None, (device, ms) or {device: ms}."""
    if not max_latency_ms:
        return {}
    return dict(max_latency_ms) if isinstance(max_latency_ms, dict) else dict([tuple(max_latency_ms)])


def check_constraints(max_gmacs=None, max_latency_ms=None, min_miou=None, max_miou_drop_pp=None) -> None:
    """MessError naming the first constraint that is not a finite number (NaN would silently drop every row)."""
    given = [("--max-gmacs", max_gmacs), ("--min-miou", min_miou), ("--max-miou-drop-pp", max_miou_drop_pp)]
    given += [(f"--max-latency-ms {dev}=", ms) for dev, ms in latency_budget(max_latency_ms).items()]
    for flag, value in given:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not np.isfinite(value)):
            raise MessError(f"{flag}{'' if flag.endswith('=') else ' '}{value}: allowed a finite number")


def meets(miou, mean_gmacs, miou_delta_pp, latency_ms: dict, max_gmacs=None, max_latency_ms=None, min_miou=None,
          max_miou_drop_pp=None) -> np.ndarray:
    """Which rows meet every given constraint (bool array); latency_ms maps device -> that device's column."""
    ok = np.ones(len(miou), dtype=bool)
    if max_gmacs is not None:
        ok &= np.asarray(mean_gmacs) <= max_gmacs
    for dev, ms in (max_latency_ms or {}).items():
        ok &= np.asarray(latency_ms[dev]) <= ms
    if min_miou is not None:
        ok &= np.asarray(miou) >= min_miou
    if max_miou_drop_pp is not None:
        ok &= np.asarray(miou_delta_pp) >= -max_miou_drop_pp
    return ok


def violation(df: pd.DataFrame, max_gmacs=None, max_latency_ms=None, min_miou=None, max_miou_drop_pp=None) -> np.ndarray:
    """Sum of relative constraint violations of each row (0 when it meets them), to show the nearest rows."""
    v = np.zeros(len(df))
    if max_gmacs is not None:
        v += np.maximum(0, df["mean_gmacs"] - max_gmacs) / max(max_gmacs, 1e-12)
    for dev, ms in (max_latency_ms or {}).items():
        v += np.maximum(0, df[f"latency_ms_{dev}"] - ms) / max(ms, 1e-12)
    if min_miou is not None:
        v += np.maximum(0, min_miou - df["miou"]) / max(min_miou, 1e-12)
    if max_miou_drop_pp is not None:
        v += np.maximum(0, -max_miou_drop_pp - df["miou_delta_pp"]) / 100
    return np.asarray(v)


def spec_constraints(spec: SearchSpec) -> dict:
    """The constraints of a SearchSpec as keyword arguments of meets / violation / filter_front."""
    return {"max_gmacs": spec.max_gmacs, "max_latency_ms": dict(spec.max_latency_ms or {}), "min_miou": spec.min_miou,
            "max_miou_drop_pp": spec.max_miou_drop_pp}


# ------------------------------------------------------------------------------------ rows -> the front

def _row_parts(prep: Prepared, rows: dict, i: int):
    k, kind = int(rows["n_exits"][i]), int(rows["kind"][i])
    h = len(prep.heads)
    ex = rows["exits"][i, :k]
    positions = [prep.positions[e // h] for e in ex]
    heads = [prep.heads[e % h] for e in ex]
    if kind == KIND_STATIC:   # a static truncation has no threshold: every image leaves at its exit
        thresholds = [0.0]
    else:
        thresholds = [float(prep.thresholds[t]) for t in rows["tidx"][i, :k]]
    return KIND_NAMES[kind], positions, heads, thresholds


def row_ids(prep: Prepared, rows: dict, idx) -> list[str]:
    """config_id of the rows at idx."""
    return [config_id(*_row_parts(prep, rows, int(i))) for i in idx]


def rows_to_frame(prep: Prepared, rows: dict, ref: dict) -> pd.DataFrame:
    """The DESIGN.md columns (plus kind and latency_ms_<device>) for rows, relative to the reference row `ref`."""
    n = prep.n
    recs = []
    for i in range(len(rows["miou"])):
        kind, positions, heads, thresholds = _row_parts(prep, rows, i)
        k = len(positions)
        rates = [int(x) / n for x in rows["n_at"][i, :k]] + [int(rows["n_final"][i]) / n]
        recs.append((config_id(kind, positions, heads, thresholds), kind, k, positions, heads, thresholds, rates))
    df = pd.DataFrame(recs, columns=["config_id", "kind", "n_exits", "positions", "heads", "thresholds", "exit_rates"])
    df["miou"] = rows["miou"]
    df["pixel_acc"] = rows["pixel_acc"]
    df["mean_gmacs"] = rows["mean_gmacs"]
    df["speedup"] = ref["macsum"][0] / rows["macsum"]
    df["miou_delta_pp"] = (rows["miou"] - ref["miou"][0]) * 100
    df["is_reference"] = rows["kind"] == KIND_REFERENCE
    for dev in prep.devices:
        df[f"latency_ms_{dev}"] = rows[f"lat_{dev}"]
    cols = ["config_id", "kind", "n_exits", "positions", "heads", "thresholds", "miou", "pixel_acc", "mean_gmacs",
            "exit_rates", "speedup", "miou_delta_pp", "is_reference"] + [f"latency_ms_{d}" for d in prep.devices]
    return df[cols]


def finish_front(prep: Prepared, spec: SearchSpec, parts: list[dict]) -> pd.DataFrame:
    """Merge shard candidates into the global front (deterministic ties), apply the constraints, add the reference."""
    ref = reference_rows(prep)
    rows = concat_rows([ref] + [p for p in parts if p and len(p["miou"])])
    win = pareto_select(objectives(rows, prep.devices), rows["n_exits"], lambda idx: row_ids(prep, rows, idx))
    cand = take_rows(rows, win)
    ok = meets(cand["miou"], cand["mean_gmacs"], (cand["miou"] - ref["miou"][0]) * 100,
               {dev: cand[f"lat_{dev}"] for dev in prep.devices}, **spec_constraints(spec))
    sel = win[(rows["kind"][win] != KIND_REFERENCE) & ok]
    if spec.has_constraints and len(sel) == 0:
        near = rows_to_frame(prep, take_rows(rows, win), ref)
        near = near.assign(_v=violation(near, **spec_constraints(spec))).sort_values(["_v", "mean_gmacs"]).drop(columns="_v").head(5)
        shown = ["config_id", "n_exits", "miou", "miou_delta_pp", "mean_gmacs"] + [c for c in near if c.startswith("latency_ms_")]
        raise MessError("no configuration meets the constraints "
                        f"(max_gmacs={spec.max_gmacs}, max_latency_ms={spec.max_latency_ms or None}, "
                        f"min_miou={spec.min_miou}, max_miou_drop_pp={spec.max_miou_drop_pp}); nearest rows of the "
                        f"unconstrained front:\n{near[shown].to_string(index=False)}")
    df = rows_to_frame(prep, take_rows(rows, np.concatenate([[0], sel]).astype(np.int64)), ref)
    df = df.sort_values(["mean_gmacs", "miou", "n_exits", "config_id"], ascending=[True, False, True, True])
    return df.reset_index(drop=True)


# ------------------------------------------------------------------------------------------ pareto.parquet

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


# How far to trust each row (messearch.trust), present when the search computed them.
TRUST_FIELDS = {"miou_lo": pa.float64(), "miou_hi": pa.float64(), "delta_pp_lo": pa.float64(),
                "delta_pp_hi": pa.float64(), "gmacs_lo": pa.float64(), "gmacs_hi": pa.float64(),
                "holdout_miou": pa.float64(), "holdout_mean_gmacs": pa.float64(),
                "holdout_exit_rates": pa.list_(pa.float64()), "near_threshold_share": pa.list_(pa.float64()),
                "shift_mean_gmacs": pa.float64(), "fragile": pa.bool_()}


def _trust_fields(df: pd.DataFrame, devices) -> list:
    fields = [(c, t) for c, t in TRUST_FIELDS.items() if c in df.columns]
    return fields + [(f"latency_ms_{d}_{s}", pa.float64()) for d in devices for s in ("lo", "hi")
                     if f"latency_ms_{d}_{s}" in df.columns]


def latency_devices_of(df) -> list[str]:
    """Device names of the latency_ms_<device> columns of a front (a DataFrame, Series or column names);
    the interval columns latency_ms_<device>_lo/_hi are not devices."""
    cols = list(df.index if isinstance(df, pd.Series) else getattr(df, "columns", df))
    lat = [c for c in cols if str(c).startswith("latency_ms_")]
    return [c[len("latency_ms_"):] for c in lat if not (c[-3:] in ("_lo", "_hi") and c[:-3] in lat)]


def write_front(df: pd.DataFrame, path, metadata: dict) -> None:
    """Write the front to Parquet atomically, with string key-value metadata (schema_version added when absent)."""
    missing = [c for c in BASE_COLUMNS if c not in df.columns]
    if missing:
        raise MessError(f"front is missing columns {missing}; pareto.parquet needs {BASE_COLUMNS}")
    devices = latency_devices_of(df)
    schema = front_schema(devices)
    schema = pa.schema(list(schema) + [pa.field(c, t) for c, t in _trust_fields(df, devices)])
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    meta = {"schema_version": SCHEMA_VERSION, "writer": f"messearch {__version__}"}
    meta.update({str(k): "" if v is None else str(v) for k, v in metadata.items()})
    kv = dict(table.schema.metadata or {})
    kv.update({k.encode(): v.encode() for k, v in meta.items()})
    table = table.replace_schema_metadata(kv)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _type_kind(t: pa.DataType) -> str:
    """An Arrow type's kind as pandas will see it (string and large_string alike, any integer width, ...)."""
    for kind, test in (("list", lambda x: pa.types.is_list(x) or pa.types.is_large_list(x)),
                       ("string", lambda x: pa.types.is_string(x) or pa.types.is_large_string(x)),
                       ("bool", pa.types.is_boolean), ("integer", pa.types.is_integer),
                       ("number", pa.types.is_floating)):
        if test(t):
            return kind if kind != "list" else f"list<{_type_kind(t.value_type)}>"
    return str(t)


def read_front(path) -> tuple[pd.DataFrame, dict]:
    """Read pareto.parquet: the DataFrame and its key-value metadata (str -> str, pandas' own entry left out).

    The one reader of fronts (query, plot, export, pipeline): a missing or non-Parquet file, a missing column, a
    column of the wrong type or no reference row is a MessError naming the file, the column and what wrote it."""
    path = Path(path)
    if not path.is_file():
        raise MessError(f"{path}: front not found{' (it is a folder)' if path.is_dir() else ''}; "
                        f"`messearch search` writes one")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        why = " ".join(str(e).split())[:200]
        raise MessError(f"{path}: not a Parquet file ({why}); a front is the pareto.parquet `messearch search` "
                        f"writes") from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
    writer = meta.get("writer") or (f"messearch (schema_version {meta['schema_version']})"
                                    if "schema_version" in meta else "a program other than messearch search")
    expected = front_schema()
    for name in BASE_COLUMNS:
        if name not in table.column_names:
            raise MessError(f"{path}: column '{name}' missing (the file was written by {writer}); a front has the "
                            f"columns {', '.join(BASE_COLUMNS)}")
        have, want = table.schema.field(name).type, expected.field(name).type
        if _type_kind(have) != _type_kind(want):
            raise MessError(f"{path}: column '{name}' has type {have}, not {want} (the file was written by {writer})")
    df = table.to_pandas()
    if int(df["is_reference"].sum()) != 1:
        raise MessError(f"{path}: {int(df['is_reference'].sum())} reference rows (is_reference), not 1 (the file was "
                        f"written by {writer})")
    return df, meta


# -------------------------------------------------------------------------------------- pandas helpers

def _latency_column(df: pd.DataFrame, device: str) -> str:
    col = f"latency_ms_{device}"
    have = latency_devices_of(df)
    if device not in have:
        raise MessError(f"the front has no latency for device {device!r}; profiled devices: {have or 'none'}")
    return col


def filter_front(df: pd.DataFrame, max_gmacs=None, max_latency_ms=None, min_miou=None, max_miou_drop_pp=None,
                 include_reference: bool = False) -> pd.DataFrame:
    """Rows meeting every given constraint; max_latency_ms is (device, ms) or {device: ms}."""
    check_constraints(max_gmacs, max_latency_ms, min_miou, max_miou_drop_pp)
    budget = latency_budget(max_latency_ms)
    latency = {device: df[_latency_column(df, device)] for device in budget}
    ok = meets(df["miou"], df["mean_gmacs"], df["miou_delta_pp"], latency, max_gmacs, budget, min_miou, max_miou_drop_pp)
    if not include_reference:
        ok &= ~df["is_reference"].to_numpy(dtype=bool)
    return df[ok]


def best_under(df: pd.DataFrame, max_gmacs=None, max_latency_ms=None, **constraints) -> pd.Series | None:
    """The highest-mIoU row within a GMACs and/or latency budget (ties: the cheaper); None when nothing fits."""
    rows = filter_front(df, max_gmacs=max_gmacs, max_latency_ms=max_latency_ms, include_reference=True, **constraints)
    if rows.empty:
        return None
    return rows.sort_values(["miou", "mean_gmacs"], ascending=[False, True]).iloc[0]


def cheapest_within(df: pd.DataFrame, max_miou_drop_pp: float, device: str | None = None) -> pd.Series | None:
    """The lowest-cost row (GMACs, or latency on `device`) losing at most max_miou_drop_pp mIoU points."""
    rows = filter_front(df, max_miou_drop_pp=max_miou_drop_pp, include_reference=True)
    if rows.empty:
        return None
    cost = "mean_gmacs" if device is None else _latency_column(df, device)
    return rows.sort_values([cost, "miou"], ascending=[True, False]).iloc[0]


def speedup_at_equal_accuracy(df: pd.DataFrame, tol_pp: float = 0.5) -> float:
    """The best speed-up (reference MACs / row MACs) among rows losing at most tol_pp mIoU points (1.0 at worst)."""
    rows = filter_front(df, max_miou_drop_pp=tol_pp, include_reference=True)
    return float(max(1.0, rows["speedup"].max())) if not rows.empty else 1.0


def hypervolume(df: pd.DataFrame, min_miou: float = 0.0) -> float:
    """Area dominated by the front in (MAC saving, mIoU), both maximised, above the reference point
    (saving 0, mIoU `min_miou`); MAC saving = 1 - row GMACs / reference GMACs. With min_miou 0 it is the
    front's best mIoU averaged over savings from 0 to 1 (a 0..1 number)."""
    ref = float(df.loc[df["is_reference"], "mean_gmacs"].iloc[0])
    pts = sorted(((1.0 - float(g) / ref, float(m)) for g, m in zip(df["mean_gmacs"], df["miou"])), reverse=True)
    area, best = 0.0, min_miou
    for i, (s, m) in enumerate(pts):
        if s <= 0:
            break
        best = max(best, m)
        nxt = max(pts[i + 1][0], 0.0) if i + 1 < len(pts) else 0.0
        area += (s - nxt) * (best - min_miou)
    return area


def summary_line(df: pd.DataFrame) -> str:
    """One line for the end of a search: front size, time, configurations/s, speed-up at <= 0.5 pp loss."""
    n, secs = df.attrs.get("n_evaluated", 0), df.attrs.get("seconds", 0.0)
    rate = n / secs if secs else 0.0
    return (f"front: {len(df)} rows from {n:,} configurations in {secs:.1f} s ({rate:,.0f} configurations/s); "
            f"best speed-up at <= 0.5 pp mIoU loss: {speedup_at_equal_accuracy(df):.2f}x")
