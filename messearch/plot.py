"""`messearch plot`: the front as a PNG — mIoU against mean GMACs, and against latency per profiled device."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .front import cheapest_within, latency_devices_of, read_front
from .errors import MessError
from .files import atomic_path


def _axes_columns(front: pd.DataFrame) -> list[tuple[str, str]]:
    cols = [("mean_gmacs", "mean GMACs per image")]
    for d in latency_devices_of(front):
        cols.append((f"latency_ms_{d}", f"mean latency on {d} (ms per image)"))
    return cols


def plot_front(front: pd.DataFrame, out: str | Path, all_points: pd.DataFrame | None = None, title: str | None = None) -> Path:
    """Draw the front (and faint evaluated points when given) to a PNG at `out`, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_cols = _axes_columns(front)
    fig, axes = plt.subplots(1, len(axes_cols), figsize=(6.5 * len(axes_cols), 4.8), squeeze=False)
    ref = front[front["is_reference"]].iloc[0]
    rows = front[~front["is_reference"]]
    best = cheapest_within(front, 0.0)
    near = cheapest_within(front, 0.5)
    for ax, (col, label) in zip(axes[0], axes_cols):
        if all_points is not None and col in all_points and len(all_points):
            sample = all_points.sample(min(len(all_points), 50_000), random_state=0)
            ax.scatter(sample[col], sample["miou"] * 100, s=3, alpha=0.08, color="tab:gray", lw=0,
                       label=f"evaluated configurations ({len(all_points):,})")
        ordered = rows.sort_values([col, "miou"], ascending=[True, False])
        # With several cost objectives a front row can be dominated on this one axis: the line joins the rows
        # that are non-dominated in (this cost, mIoU); the others are dots.
        line = ordered[ordered["miou"] > ordered["miou"].cummax().shift(fill_value=-1.0)]
        ax.scatter(rows[col], rows["miou"] * 100, s=12, color="tab:blue", alpha=0.45,
                   label=f"Pareto front ({len(rows)} configurations)")
        ax.plot(line[col], line["miou"] * 100, "-", lw=1.4, color="tab:blue", label="non-dominated on this axis")
        if "miou_lo" in rows:
            ax.errorbar(rows[col], rows["miou"] * 100, yerr=[(rows["miou"] - rows["miou_lo"]) * 100,
                        (rows["miou_hi"] - rows["miou"]) * 100], fmt="none", ecolor="tab:blue", alpha=0.25, lw=0.8,
                        label="90% bootstrap interval of mIoU")
        if "fragile" in rows and rows["fragile"].any():
            fr = rows[rows["fragile"].astype(bool)]
            ax.scatter(fr[col], fr["miou"] * 100, marker="x", s=30, color="tab:purple", zorder=4,
                       label=f"fragile ({len(fr)}): cost hinges on a 0.05 confidence shift")
        ax.scatter([ref[col]], [ref["miou"] * 100], marker="*", s=220, color="tab:red", zorder=5,
                   label=f"original model ({ref[col]:.3g}, {ref['miou'] * 100:.2f}% mIoU)")
        ax.axhline(ref["miou"] * 100, color="tab:red", lw=0.8, ls="--", alpha=0.6)
        for row, text, colour in ((best, "equal accuracy", "tab:green"), (near, "within 0.5 pp", "tab:orange")):
            if row is not None and not row["is_reference"] and row[col] > 0:
                ax.scatter([row[col]], [row["miou"] * 100], s=90, facecolors="none", edgecolors=colour, lw=2, zorder=6,
                           label=f"{text}: {ref[col] / row[col]:.2f}x cheaper ({row['config_id']})")
        ax.set_xlabel(label)
        ax.set_ylabel("mIoU (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "MESS configurations: accuracy against cost")
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out


def plot_file(front_path: str | Path, out: str | Path) -> Path:
    """Plot a pareto.parquet file (with the evaluated points its --keep-all dataset holds, when present)."""
    front, meta = read_front(front_path)
    all_points = None
    keep = meta.get("keep_all_dir")
    if keep and Path(keep).exists():
        try:
            all_points = pd.read_parquet(keep)
        except Exception as e:   # a damaged file in the --keep-all folder: name it, no traceback
            raise MessError(f"{keep}: the --keep-all points are not readable ({type(e).__name__}: {e}); "
                            "search again with --keep-all, or delete the folder to plot the front alone") from None
    title = f"{Path(meta.get('space_source', 'front')).stem}: MESS configurations on {meta.get('data', '?')}"
    return plot_front(front, out, all_points=all_points, title=title)
