"""`messearch query`: the rows of a front that meet constraints, as a readable table."""

from __future__ import annotations

import pandas as pd

from .config import exits_text
from .errors import MessError
from .front import filter_front, latency_devices_of, read_front
from .trust import FRAGILE_COST_RISE, SHIFT, robust_mask


def query_front(path, max_gmacs=None, max_latency_ms=None, min_miou=None, max_miou_drop_pp=None,
                sort: str = "mean_gmacs", descending: bool = False, top: int | None = None,
                robust: bool = False) -> pd.DataFrame:
    """Rows of the front in `path` meeting every constraint (the reference row always listed first), sorted.
    robust: the mIoU tolerance must also hold for the lower bound and the hold-out mIoU, and fragile rows go."""
    if top is not None and top < 1:
        raise MessError(f"--top {top}: allowed an integer >= 1 (at most that many rows besides the reference)")
    front, _ = read_front(path)
    if sort not in front.columns:
        raise MessError(f"--sort {sort!r}: not a column of {path}; allowed: {', '.join(front.columns)}")
    if robust and not {"miou_lo", "holdout_miou", "fragile"} & set(front.columns):
        raise MessError(f"--robust: {path} has no intervals, hold-out or sensitivity columns; search again with "
                        "--bootstrap N (the default) or --holdout F")
    rows = filter_front(front, max_gmacs=max_gmacs, max_latency_ms=max_latency_ms or None, min_miou=min_miou,
                        max_miou_drop_pp=max_miou_drop_pp)
    if robust:
        ok = pd.Series(robust_mask(front, max_miou_drop_pp), index=front.index)
        rows = rows[ok.loc[rows.index].to_numpy(dtype=bool)]
    rows = rows.sort_values([sort, "config_id"], ascending=[not descending, True])
    if top is not None:
        rows = rows.head(top)
    return pd.concat([front[front["is_reference"]], rows]).reset_index(drop=True)


def format_table(rows: pd.DataFrame) -> str:
    """A compact text table: id, exits as position/head@threshold, mIoU, delta, GMACs, speed-up, latency, exit rates."""
    lat = [f"latency_ms_{d}" for d in latency_devices_of(rows)]
    out = pd.DataFrame({
        "config_id": rows["config_id"],
        "exits": [exits_text(ps, hs, ts, sep=" > ", short=True, none="(original model)")
                  for ps, hs, ts in zip(rows["positions"], rows["heads"], rows["thresholds"])],
        "mIoU %": (rows["miou"] * 100).round(2),
    })
    if "miou_lo" in rows:
        out["90% mIoU"] = [f"{lo * 100:.2f}..{hi * 100:.2f}" for lo, hi in zip(rows["miou_lo"], rows["miou_hi"])]
        out["90% d pp"] = [f"{lo:.2f}..{hi:.2f}" for lo, hi in zip(rows["delta_pp_lo"], rows["delta_pp_hi"])]
    if "holdout_miou" in rows:
        out["hold-out %"] = (rows["holdout_miou"] * 100).round(2)
    out = out.assign(**{
        "d pp": rows["miou_delta_pp"].round(2),
        "GMACs": rows["mean_gmacs"].round(4),
        "speed-up": rows["speedup"].round(2),
    })
    if "holdout_mean_gmacs" in rows:
        out["hold-out GMACs"] = rows["holdout_mean_gmacs"].round(4)
    for c in lat:
        out[c.removeprefix("latency_")] = rows[c].round(2)
    out["exit rates"] = [" ".join(f"{r:.2f}" for r in rates) for rates in rows["exit_rates"]]
    note = ""
    if "fragile" in rows:
        out["fragile"] = ["FRAGILE" if f else "" for f in rows["fragile"]]
        note = (f"; FRAGILE: mean GMACs rise by more than {FRAGILE_COST_RISE:g}x if every confidence drops by {SHIFT}"
                if rows["fragile"].any() else "")
    n = len(rows) - int(rows["is_reference"].sum())
    return out.to_string(index=False) + f"\n{n} matching configurations (the reference row first){note}"
