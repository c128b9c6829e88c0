"""How far to trust a front: intervals, the hold-out check, sensitivity to a confidence shift, the robust choice."""

import numpy as np
import pandas as pd
import pytest

from messearch import trust
from messearch.errors import MessError
from messearch.front import read_front, write_front
from messearch.search import SearchSpec
from messearch.search_driver import evaluate_configs, search_local

from test_search import make_cache, make_costs

THRESHOLDS = (0.2, 0.35, 0.5, 0.65)


def problem(seed=3, n_images=40, policy="mean", ids=None):
    cache = make_cache(seed, 3, 2, n_images, 4)
    if ids is not None:
        cache.image_ids = ids
    spec = SearchSpec(cache.positions, cache.heads, THRESHOLDS, max_exits=2, mode="single", policy_kind=policy,
                      pixel_threshold_bin=2 if policy == "fraction" else None)
    macs = make_costs(seed, cache.positions, cache.heads)
    lat = {"cpu": make_costs(seed + 1, cache.positions, cache.heads, unit="ms")}
    return cache, spec, macs, lat


def test_intervals_contain_the_point_and_repeat_from_the_seed():
    cache, spec, macs, lat = problem()
    front = search_local(cache, spec, macs, lat)
    a, meta = trust.annotate(front, cache, spec, macs, lat, resamples=50, seed=7)
    b, _ = trust.annotate(front, cache, spec, macs, lat, resamples=50, seed=7)
    c, _ = trust.annotate(front, cache, spec, macs, lat, resamples=50, seed=8)
    cols = ["miou_lo", "miou_hi", "delta_pp_lo", "delta_pp_hi", "gmacs_lo", "gmacs_hi", "latency_ms_cpu_lo",
            "latency_ms_cpu_hi"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert not a[cols].equals(c[cols])
    for v, lo, hi in (("miou", "miou_lo", "miou_hi"), ("mean_gmacs", "gmacs_lo", "gmacs_hi"),
                      ("latency_ms_cpu", "latency_ms_cpu_lo", "latency_ms_cpu_hi"),
                      ("miou_delta_pp", "delta_pp_lo", "delta_pp_hi")):
        assert (a[lo] <= a[v]).all() and (a[v] <= a[hi]).all()
    ref = a[a["is_reference"]].iloc[0]
    assert ref["delta_pp_lo"] == ref["delta_pp_hi"] == 0.0   # paired with itself on every resample
    assert (a["miou_hi"] - a["miou_lo"] > 0).any()   # resampling 40 images does move mIoU
    assert '"seed": 7' in meta["bootstrap"] and '"resamples": 50' in meta["bootstrap"]


def test_resampled_figures_are_the_weighted_sums():
    """One resample by hand: the images repeated as drawn, the row's figures recomputed from scratch."""
    cache, spec, macs, lat = problem()
    front = search_local(cache, spec, macs, lat)
    w = trust.resample_weights(cache.n_images, 3, seed=5)
    im, _ = trust.images_of(cache, spec, macs, lat)
    for _, row in front.iterrows():
        drawn = np.repeat(np.arange(cache.n_images), w[1].astype(int))
        again, _ = trust.images_of(trust.subset(cache, drawn), spec, macs, lat)
        tp, pred, costs = trust._per_image(im, row, trust.assign(im, row))
        by_weights = trust.stats.miou_from_counts((w[1] @ tp).astype(np.int64), (w[1] @ pred).astype(np.int64),
                                                  (w[1] @ im.gt).astype(np.int64))
        assert by_weights == trust.row_figures(again, row)["miou"]


@pytest.mark.parametrize("by", ["image", "group"])
def test_holdout_figures_equal_brute_force_on_the_check_part(by):
    ids = [f"seq{i % 4}_{i:04d}" for i in range(48)]
    cache, spec, macs, lat = problem(n_images=48, ids=ids)
    search, check, meta = trust.split_cache(cache, 0.3, by, seed=1)
    assert search.n_images + check.n_images == 48 and check.n_images >= round(0.3 * 48)
    if by == "group":
        assert not {trust.image_group(i) for i in search.image_ids} & {trust.image_group(i) for i in check.image_ids}
    again = trust.split_cache(cache, 0.3, by, seed=1)[1]
    assert again.image_ids == check.image_ids   # deterministic
    front = search_local(search, spec, macs, lat)
    df, _ = trust.annotate(front, search, spec, macs, lat, check=check, resamples=0)
    every = evaluate_configs(check, spec, macs, lat).set_index("config_id")
    for _, row in df.iterrows():
        truth = every.loc[row["config_id"]]
        assert row["holdout_miou"] == truth["miou"]
        assert row["holdout_mean_gmacs"] == truth["mean_gmacs"]
        assert list(row["holdout_exit_rates"]) == list(truth["exit_rates"])
    # and the trust helpers reproduce the search's own figures on its part exactly
    im, _ = trust.images_of(search, spec, macs, lat)
    for _, row in df.iterrows():
        f = trust.row_figures(im, row)
        assert (f["miou"], f["mean_gmacs"], f["exit_rates"]) == (row["miou"], row["mean_gmacs"], list(row["exit_rates"]))


def test_shift_sensitivity_is_exact_and_marks_fragile_rows():
    cache, spec, macs, lat = problem()
    front = search_local(cache, spec, macs, lat)
    df, meta = trust.annotate(front, cache, spec, macs, lat, resamples=0)
    shifted = cache.conf_mean - trust.SHIFT
    moved = trust.subset(cache, np.arange(cache.n_images))
    moved.conf_mean = shifted
    truth = evaluate_configs(moved, spec, macs, lat).set_index("config_id")
    for _, row in df.iterrows():
        assert row["shift_mean_gmacs"] == truth.loc[row["config_id"], "mean_gmacs"]
        assert row["fragile"] == (row["shift_mean_gmacs"] > trust.FRAGILE_COST_RISE * row["mean_gmacs"])
        assert len(row["near_threshold_share"]) == (row["n_exits"] if row["kind"] == "cascade" else 0)
    assert df["shift_mean_gmacs"].ge(df["mean_gmacs"]).all()   # less confidence never leaves earlier
    # fraction policy on 4 bins: a 0.05 shift is not a bin edge, so it is skipped and said so
    cache, spec, macs, lat = problem(policy="fraction")
    df, meta = trust.annotate(search_local(cache, spec, macs, lat), cache, spec, macs, lat, resamples=0)
    assert df["shift_mean_gmacs"].isna().all() and '"exact": false' in meta["shift"] and "bin edge" in meta["shift"]


def test_robust_rule_never_picks_what_the_plain_rule_rejects(tmp_path):
    cache, spec, macs, lat = problem(n_images=60)
    search, check, meta = trust.split_cache(cache, 0.3, "image")
    front = search_local(search, spec, macs, lat)
    df, more = trust.annotate(front, search, spec, macs, lat, check=check, resamples=40)
    write_front(df, tmp_path / "f.parquet", {**meta, **more})
    back, m = read_front(tmp_path / "f.parquet")
    assert set(back.columns) == set(df.columns) and "holdout" in m and "bootstrap" in m
    for tol in (0.0, 0.5, 2.0, 5.0, 20.0):
        plain_ok = set(back.loc[back["miou_delta_pp"] >= -tol, "config_id"])
        robust = trust.robust_mask(back, tol)
        assert set(back.loc[robust, "config_id"]) <= plain_ok | {"reference"}
        chosen = trust.choose(back, tol, robust=True)
        assert chosen["config_id"] in plain_ok | {"reference"}
        assert chosen["mean_gmacs"] >= trust.choose(back, tol)["mean_gmacs"]


@pytest.mark.parametrize("args, msg", [((1.0, "image"), "strictly between"), ((0.3, "city"), "not allowed"),
                                       ((0.3, "group"), "at least two groups")])
def test_bad_holdout_is_named(args, msg):
    with pytest.raises(MessError, match=msg):
        trust.holdout_mask([f"i{i}" for i in range(10)], *args)
