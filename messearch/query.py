"""`messearch query`: the rows of a front that meet constraints, as a readable table."""

from __future__ import annotations

import pandas as pd

from .config import exits_text
from .errors import MessError
from .front import filter_front, read_front


def query_front(path, max_gmacs=None, max_latency_ms=None, min_miou=None, max_miou_drop_pp=None,
                sort: str = "mean_gmacs", descending: bool = False, top: int | None = None) -> pd.DataFrame:
    """Rows of the front in `path` meeting every constraint (the reference row always listed first), sorted."""
    front, _ = read_front(path)
    if sort not in front.columns:
        raise MessError(f"--sort {sort!r}: not a column of {path}; allowed: {', '.join(front.columns)}")
    rows = filter_front(front, max_gmacs=max_gmacs, max_latency_ms=max_latency_ms or None, min_miou=min_miou,
                        max_miou_drop_pp=max_miou_drop_pp)
    rows = rows.sort_values([sort, "config_id"], ascending=[not descending, True])
    if top is not None:
        rows = rows.head(top)
    return pd.concat([front[front["is_reference"]], rows]).reset_index(drop=True)


def format_table(rows: pd.DataFrame) -> str:
    """A compact text table: id, exits as position/head@threshold, mIoU, delta, GMACs, speed-up, latency, exit rates."""
    lat = [c for c in rows.columns if c.startswith("latency_ms_")]
    out = pd.DataFrame({
        "config_id": rows["config_id"],
        "exits": [exits_text(ps, hs, ts, sep=" > ", short=True, none="(original model)")
                  for ps, hs, ts in zip(rows["positions"], rows["heads"], rows["thresholds"])],
        "mIoU %": (rows["miou"] * 100).round(2),
        "d pp": rows["miou_delta_pp"].round(2),
        "GMACs": rows["mean_gmacs"].round(4),
        "speed-up": rows["speedup"].round(2),
    })
    for c in lat:
        out[c.removeprefix("latency_")] = rows[c].round(2)
    out["exit rates"] = [" ".join(f"{r:.2f}" for r in rates) for rates in rows["exit_rates"]]
    n = len(rows) - int(rows["is_reference"].sum())
    return out.to_string(index=False) + f"\n{n} matching configurations (the reference row first)"
