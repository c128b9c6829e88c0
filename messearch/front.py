"""Small pandas helpers for the usual questions about a front (a DataFrame read from pareto.parquet)."""

from __future__ import annotations

import pandas as pd

from .errors import MessError


def _latency_column(df: pd.DataFrame, device: str) -> str:
    col = f"latency_ms_{device}"
    if col not in df.columns:
        have = [c[len("latency_ms_"):] for c in df.columns if c.startswith("latency_ms_")]
        raise MessError(f"the front has no latency for device {device!r}; profiled devices: {have or 'none'}")
    return col


def filter_front(df: pd.DataFrame, max_gmacs=None, max_latency_ms=None, min_miou=None, max_miou_drop_pp=None,
                 include_reference: bool = False) -> pd.DataFrame:
    """Rows meeting every given constraint; max_latency_ms is (device, ms) or {device: ms}."""
    ok = pd.Series(True, index=df.index)
    if max_gmacs is not None:
        ok &= df["mean_gmacs"] <= max_gmacs
    if max_latency_ms is not None:
        items = max_latency_ms.items() if isinstance(max_latency_ms, dict) else [tuple(max_latency_ms)]
        for device, ms in items:
            ok &= df[_latency_column(df, device)] <= ms
    if min_miou is not None:
        ok &= df["miou"] >= min_miou
    if max_miou_drop_pp is not None:
        ok &= df["miou_delta_pp"] >= -max_miou_drop_pp
    if not include_reference:
        ok &= ~df["is_reference"]
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


def summary_line(df: pd.DataFrame) -> str:
    """One line for the end of a search: front size, time, configurations/s, speed-up at <= 0.5 pp loss."""
    n, secs = df.attrs.get("n_evaluated", 0), df.attrs.get("seconds", 0.0)
    rate = n / secs if secs else 0.0
    return (f"front: {len(df)} rows from {n:,} configurations in {secs:.1f} s ({rate:,.0f} configurations/s); "
            f"best speed-up at <= 0.5 pp mIoU loss: {speedup_at_equal_accuracy(df):.2f}x")
