"""How far to trust a front row: bootstrap intervals over images, the hold-out check, sensitivity to a shift of
confidence, and the robust choice that uses them.

Everything here is computed after the front is formed, for the front rows only, from the cache's per-image
statistics: a row's exit policy sends each image to one exit (`assign`), and every figure of the row is a sum over
images of that exit's counts and costs. A bootstrap resample is a vector of image multiplicities, so a resampled
figure is the same sums weighted by it (exact integers in float64, all resamples in one product).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import pandas as pd

from . import stats
from .cache_format import CacheArrays
from .errors import MessError
from .files import sha256_text
from .search import SearchSpec, exit_confidence, prepare

BOOTSTRAP_RESAMPLES = 200
BOOTSTRAP_LEVEL = 0.90
SHIFT = 0.05              # the confidence shift of the sensitivity figures
FRAGILE_COST_RISE = 1.25  # a row is fragile when the shift raises its mean GMACs by more than this factor
HOLDOUT_BY = ("image", "group")

# Columns this module adds to a front (latency_ms_<device>_lo/_hi come with each profiled device).
TRUST_COLUMNS = ["miou_lo", "miou_hi", "delta_pp_lo", "delta_pp_hi", "gmacs_lo", "gmacs_hi", "holdout_miou", "holdout_mean_gmacs",
                 "holdout_exit_rates", "near_threshold_share", "shift_mean_gmacs", "fragile"]


# ------------------------------------------------------------------------------------------- the hold-out split

def image_group(image_id: str) -> str:
    """The group of an image: its file name up to the first '_' (CamVid sequence `0016E5`, Cityscapes city)."""
    name = PurePosixPath(str(image_id)).name
    return name.split("_", 1)[0] if "_" in name else ""


def _rank(key: str, seed: int) -> str:
    return sha256_text(f"{seed}:{key}")


def check_holdout(fraction: float, by: str = "image") -> None:
    """MessError unless `fraction` lies strictly between 0 and 1 and `by` is one of HOLDOUT_BY (before any work)."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise MessError(f"--holdout {fraction!r}: the share of images to hold out must lie strictly between 0 and 1")
    if by not in HOLDOUT_BY:
        raise MessError(f"--holdout-by {by!r} is not allowed; use one of {', '.join(HOLDOUT_BY)}")


def holdout_mask(image_ids: list[str], fraction: float, by: str = "image", seed: int = 0) -> np.ndarray:
    """bool [N]: the check part. Deterministic: images (or groups) ordered by a seeded hash of their id; the first
    ones go to the check part until it holds round(fraction * N) images (by group: at least that many)."""
    n = len(image_ids)
    check_holdout(fraction, by)
    want = max(1, round(fraction * n))
    check = np.zeros(n, dtype=bool)
    if by == "image":
        order = sorted(range(n), key=lambda i: _rank(image_ids[i], seed))
        check[order[:want]] = True
    else:
        groups = [image_group(i) for i in image_ids]
        names = sorted(set(groups))
        if "" in names or len(names) < 2:
            raise MessError(f"--holdout-by group needs image ids named '<group>_...' from at least two groups; this "
                            f"cache has groups {names[:6] or 'none'} (e.g. image id {image_ids[0]!r})")
        for g in sorted(names, key=lambda g: _rank(g, seed)):
            if check.sum() >= want:
                break
            check |= np.array([x == g for x in groups])
    if check.all() or not check.any():
        raise MessError(f"--holdout {fraction} leaves an empty search or check part of {n} images")
    return check


def subset(cache: CacheArrays, idx: np.ndarray) -> CacheArrays:
    """The cache restricted to the images at idx (arrays copied, meta shared)."""
    idx = np.asarray(idx, dtype=np.int64)
    return CacheArrays(image_ids=[cache.image_ids[i] for i in idx], positions=list(cache.positions),
                       heads=list(cache.heads), tp=cache.tp[idx], pred=cache.pred[idx], gt=cache.gt[idx],
                       conf_mean=cache.conf_mean[idx], n_above=cache.n_above[idx], n_pixels=cache.n_pixels[idx],
                       meta=dict(cache.meta))


def split_cache(cache: CacheArrays, fraction: float, by: str = "image", seed: int = 0):
    """(search part, check part, metadata) of a cache; the metadata records how the split was made."""
    check = holdout_mask(cache.image_ids, fraction, by, seed)
    ids = [cache.image_ids[i] for i in np.flatnonzero(check)]
    meta = {"holdout": json.dumps({"fraction": fraction, "by": by, "seed": seed, "n_search": int((~check).sum()),
                                   "n_check": int(check.sum()),
                                   "check_groups": sorted({image_group(i) for i in ids}) if by == "group" else [],
                                   "check_ids_sha256": sha256_text("\n".join(ids))})}
    return subset(cache, np.flatnonzero(~check)), subset(cache, np.flatnonzero(check)), meta


# --------------------------------------------------------------------------------------- per-image figures

@dataclass
class Images:
    """Per-image figures of one cache part under one spec: what every row's sums are made of."""

    n: int
    conf: np.ndarray          # float64 [N, E] image confidence at each candidate exit (spec order)
    conf_shift: np.ndarray | None   # the same with every pixel confidence SHIFT lower; None when not exact
    tp: np.ndarray            # int64 [N, E+1, C], the final head last
    pred: np.ndarray
    gt: np.ndarray            # int64 [N, C]
    costs: dict               # "macs" / "lat:<device>" -> (backbone_to[E], head[E], backbone_total, final)
    positions: list
    heads: list


def images_of(cache: CacheArrays, spec: SearchSpec, macs, latencies=None) -> tuple[Images, str]:
    """The per-image figures of a cache part, and why the shifted confidence is missing ('' when it is exact)."""
    prep = prepare(cache, spec, macs, latencies)
    ex = [cache.exit_index(p, h) for p in spec.positions for h in spec.heads] + [cache.tp.shape[1] - 1]
    conf = exit_confidence(cache, spec)
    why = ""
    if spec.policy_kind == "mean":
        conf_shift = conf - SHIFT   # the mean of pixel confidences each SHIFT lower
    else:
        # the fraction of pixels at or above edge b after a shift = the fraction at or above edge b + SHIFT
        nb = cache.n_above.shape[2] - 1
        step = SHIFT * nb
        b = int(spec.pixel_threshold_bin) + round(step)
        if abs(step - round(step)) > 1e-9 or b > nb:
            conf_shift, why = None, (f"the fraction policy's pixel threshold shifted by {SHIFT} is not a bin edge of "
                                     f"the cache's {nb} bins")
        else:
            conf_shift = exit_confidence(cache, spec, pixel_bin=b)
    return Images(cache.n_images, conf, conf_shift, cache.tp[:, ex], cache.pred[:, ex], cache.gt, prep.costs,
                  list(spec.positions), list(spec.heads)), why


def _exits_of(im: Images, row) -> list[int]:
    h = len(im.heads)
    return [im.positions.index(p) * h + im.heads.index(hd) for p, hd in zip(row["positions"], row["heads"])]


def assign(im: Images, row, conf: np.ndarray | None = None) -> np.ndarray:
    """int [N]: the early exit (0..k-1) each image leaves at under the row's policy, k for the final head."""
    conf = im.conf if conf is None else conf
    ex, k = _exits_of(im, row), len(row["positions"])
    at = np.full(im.n, k, dtype=np.int64)
    if row["kind"] == "static":
        return np.zeros(im.n, dtype=np.int64)
    for j, (e, t) in enumerate(zip(ex, row["thresholds"])):
        at[(at == k) & (conf[:, e] >= float(t))] = j
    return at


def _per_image(im: Images, row, at: np.ndarray):
    """Per-image counts (tp, pred [N, C]) and costs ({key: [N]}) of a row whose images leave at `at`."""
    ex = _exits_of(im, row)
    col = np.append(np.asarray(ex, dtype=np.int64), im.tp.shape[1] - 1)[at]
    rows = np.arange(im.n)
    costs = {}
    for key, (bb, hd, total, final) in im.costs.items():
        hcum = np.cumsum(hd[ex]) if ex else np.zeros(0, dtype=hd.dtype)
        # the evaluator's order of additions (search._cost_sum): backbone + heads so far; final: (total + heads) + final
        per_exit = bb[ex] + hcum if ex else np.zeros(0, dtype=bb.dtype)
        last = hcum[-1] if ex else hd.dtype.type(0)
        fin = np.array([(total + last) + final], dtype=np.asarray(bb).dtype)
        costs[key] = (per_exit if row["kind"] == "static" else np.concatenate([per_exit, fin]))[at]
    return im.tp[rows, col], im.pred[rows, col], costs


def row_figures(im: Images, row) -> dict:
    """A row's figures on these images, exactly as the search computes them: miou, mean_gmacs, exit_rates."""
    at = assign(im, row)
    tp, pred, costs = _per_image(im, row, at)
    k = len(row["positions"])
    rates = np.bincount(at, minlength=k + 1) / im.n
    return {"miou": float(stats.miou_from_counts(tp.sum(0), pred.sum(0), im.gt.sum(0))),
            "mean_gmacs": int(costs["macs"].sum()) / im.n / 1e9, "exit_rates": [float(r) for r in rates]}


# ------------------------------------------------------------------------------------------------ the figures

def resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """float64 [B, N]: image multiplicities of `resamples` bootstrap resamples of n images (seeded)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def _interval(values: np.ndarray, point: float) -> tuple[float, float]:
    # Percentile interval, widened to the point value where it misses it: a percentile interval of a skewed
    # statistic (mIoU is a ratio of sums) need not contain the estimate, and a row's bound must bracket it.
    a = (1 - BOOTSTRAP_LEVEL) / 2
    lo, hi = np.quantile(values, [a, 1 - a])
    return float(min(lo, point)), float(max(hi, point))


def annotate(front: pd.DataFrame, cache: CacheArrays, spec: SearchSpec, macs, latencies=None,
             check: CacheArrays | None = None, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple:
    """The front with intervals (resamples > 0), hold-out figures (check given) and sensitivity columns added,
    and the metadata that says how they were made."""
    im, why = images_of(cache, spec, macs, latencies)
    devices = sorted(latencies or {})
    df = front.copy()
    df.attrs.update(front.attrs)
    rows = [df.iloc[i] for i in range(len(df))]
    per = [(assign(im, r), r) for r in rows]
    if resamples > 0:
        w = resample_weights(im.n, resamples, seed)
        gt_b = (w @ im.gt.astype(np.float64)).astype(np.int64)
        out = {c: [] for c in ["miou_lo", "miou_hi", "gmacs_lo", "gmacs_hi", "delta_pp_lo", "delta_pp_hi"]
               + [f"latency_ms_{d}_{s}" for d in devices for s in ("lo", "hi")]}
        mious = []
        for (at, r) in per:
            tp, pred, _ = _per_image(im, r, at)
            mious.append(stats.miou_from_counts((w @ tp.astype(np.float64)).astype(np.int64),
                                                (w @ pred.astype(np.float64)).astype(np.int64), gt_b))
        ref_b = mious[int(np.flatnonzero(df["is_reference"].to_numpy(dtype=bool))[0])]
        for (at, r), miou_b in zip(per, mious):
            _, _, costs = _per_image(im, r, at)
            # paired: the row and the reference on the same resample, so the drop's interval is not the sum of both
            lo, hi = _interval((miou_b - ref_b) * 100, float(r["miou_delta_pp"]))
            out["delta_pp_lo"].append(lo)
            out["delta_pp_hi"].append(hi)
            for name, vals, point in [("miou", miou_b, r["miou"]),
                                      ("gmacs", w @ costs["macs"].astype(np.float64) / im.n / 1e9, r["mean_gmacs"])] + \
                    [(f"latency_ms_{d}", w @ costs[f"lat:{d}"] / im.n, r[f"latency_ms_{d}"]) for d in devices]:
                lo, hi = _interval(vals, float(point))
                out[f"{name}_lo"].append(lo)
                out[f"{name}_hi"].append(hi)
        for c, v in out.items():
            df[c] = v
    if check is not None:
        ci, _ = images_of(check, spec, macs, latencies)
        figs = [row_figures(ci, r) for r in rows]
        df["holdout_miou"] = [f["miou"] for f in figs]
        df["holdout_mean_gmacs"] = [f["mean_gmacs"] for f in figs]
        df["holdout_exit_rates"] = [f["exit_rates"] for f in figs]
    near, shifted = [], []
    for at, r in per:
        ex = _exits_of(im, r)
        shares = []
        if r["kind"] == "cascade":
            for j, (e, t) in enumerate(zip(ex, r["thresholds"])):
                reach = at >= j
                close = np.abs(im.conf[:, e] - float(t)) <= SHIFT
                shares.append(float((reach & close).sum() / max(1, reach.sum())))
        near.append(shares)
        if im.conf_shift is None:
            shifted.append(math.nan)
        else:
            _, _, costs = _per_image(im, r, assign(im, r, im.conf_shift))
            shifted.append(int(costs["macs"].sum()) / im.n / 1e9)
    df["near_threshold_share"] = near
    df["shift_mean_gmacs"] = shifted
    df["fragile"] = np.asarray(shifted) > FRAGILE_COST_RISE * df["mean_gmacs"].to_numpy()
    meta = {"bootstrap": json.dumps({"resamples": int(resamples), "seed": int(seed), "level": BOOTSTRAP_LEVEL,
                                     "interval": "percentile, widened to contain the point value"}),
            "shift": json.dumps({"confidence_shift": SHIFT, "fragile_cost_rise": FRAGILE_COST_RISE,
                                 "exact": why == "", "skipped_because": why})}
    return df, meta


# --------------------------------------------------------------------------------------------- the choice

def robust_mask(df: pd.DataFrame, tol_pp: float | None) -> np.ndarray:
    """Rows the robust rule accepts: the plain rule's tolerance met, and also by the lower bound of the mIoU drop
    (paired with the reference on each resample) and by the hold-out mIoU (against the reference's), where the
    front has them, and a cost that holds under the shift."""
    ok = np.ones(len(df), dtype=bool)
    ref = df[df["is_reference"]].iloc[0]
    if tol_pp is not None:
        ok &= df["miou_delta_pp"].to_numpy() >= -tol_pp
        if "delta_pp_lo" in df:
            ok &= df["delta_pp_lo"].to_numpy() >= -tol_pp
        if "holdout_miou" in df:
            ok &= (df["holdout_miou"].to_numpy() - ref["holdout_miou"]) * 100 >= -tol_pp
    if "fragile" in df:
        ok &= ~df["fragile"].to_numpy(dtype=bool)
    return ok | df["is_reference"].to_numpy(dtype=bool)


def choose(df: pd.DataFrame, tol_pp: float, robust: bool = False):
    """The cheapest row (mean GMACs) within tol_pp mIoU points of the reference; robust: among robust_mask rows."""
    ok = df["miou_delta_pp"].to_numpy() >= -tol_pp
    if robust:
        ok = robust_mask(df, tol_pp)
    rows = df[ok | df["is_reference"].to_numpy(dtype=bool)]
    return rows.sort_values(["mean_gmacs", "miou", "config_id"], ascending=[True, False, True]).iloc[0]


def trust_words(row, ref=None) -> list[str]:
    """A chosen row's interval, hold-out figures and sensitivity, in plain sentences (empty when the front has none)."""
    out = []
    if "miou_lo" in row and not pd.isna(row["miou_lo"]):
        out.append(f"On images like the cached ones, its mIoU lies between {row['miou_lo'] * 100:.2f}% and "
                   f"{row['miou_hi'] * 100:.2f}% and its cost between {row['gmacs_lo']:.4f} and {row['gmacs_hi']:.4f} "
                   f"GMACs in {BOOTSTRAP_LEVEL:.0%} of bootstrap resamples of the images; against the original "
                   f"model on the same resamples it loses between {-row['delta_pp_hi']:.2f} and {-row['delta_pp_lo']:.2f} "
                   f"mIoU points.")
    if "holdout_miou" in row and not pd.isna(row["holdout_miou"]):
        vs = "" if ref is None else (f" ({(row['holdout_miou'] - ref['holdout_miou']) * 100:+.2f} pp against the original "
                                     f"model's {ref['holdout_miou'] * 100:.2f}%)")
        out.append(f"On the held-out images, never used to choose it: mIoU {row['holdout_miou'] * 100:.2f}%{vs}, "
                   f"{row['holdout_mean_gmacs']:.4f} GMACs, exit rates "
                   f"{', '.join(f'{r:.2f}' for r in row['holdout_exit_rates'])}.")
    if "near_threshold_share" in row and len(row["near_threshold_share"]):
        shares = ", ".join(f"{s:.0%}" for s in row["near_threshold_share"])
        text = f"Share of images within {SHIFT} of the threshold at each exit they reach: {shares}."
        if not pd.isna(row["shift_mean_gmacs"]):
            text += (f" If every confidence dropped by {SHIFT}, the cost would be {row['shift_mean_gmacs']:.4f} GMACs "
                     f"instead of {row['mean_gmacs']:.4f}"
                     + (" (fragile: the saving hinges on a few hundredths of confidence)." if row["fragile"] else "."))
        out.append(text)
    return out
