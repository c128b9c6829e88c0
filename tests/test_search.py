"""The vectorised search against a brute-force evaluation written plainly, on random small caches."""

import contextlib
import dataclasses
import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from messearch import search_kernel, search_plain, search_shared, shard_front, stats
from messearch.cache_format import CacheArrays
from messearch.errors import MessError
from messearch.config import config_id
from messearch.front import read_front, write_front
from messearch.costs import CostTable as Costs
from messearch.search_spec import SearchSpec
from messearch.search_driver import evaluate_configs, run_search, search_local

N_BINS = 4


def make_cache(seed, n_pos, n_heads, n_images, n_classes, size=4):
    """A consistent cache from real logits and masks through stats.exit_statistics (deeper exits sharper)."""
    g = torch.Generator().manual_seed(seed)
    positions = [f"backbone.layer{i + 1}.0" for i in range(n_pos)]
    heads = [f"h{j}" for j in range(n_heads)]
    mask = torch.randint(0, n_classes, (n_images, size, size), generator=g)
    mask[torch.rand(mask.shape, generator=g) < 0.1] = 255
    parts = []
    n_exit = n_pos * n_heads + 1
    for e in range(n_exit):
        logits = torch.randn(n_images, n_classes, size, size, generator=g) * (1 + e % 3)
        # some exits copy the final head's sharpness so confidences and predictions repeat (ties)
        parts.append(stats.exit_statistics(logits, mask, n_classes, 255, N_BINS))
    st_ = {k: torch.stack([p[k] for p in parts], dim=1).numpy() for k in ("tp", "pred", "conf_mean", "n_above")}
    return CacheArrays(image_ids=[f"i{i}" for i in range(n_images)], positions=positions, heads=heads,
                       tp=st_["tp"], pred=st_["pred"], gt=parts[0]["gt"].numpy(), conf_mean=st_["conf_mean"],
                       n_above=st_["n_above"], n_pixels=np.full(n_images, size * size, dtype=np.int64),
                       meta={"n_bins": N_BINS})


def make_costs(seed, positions, heads, unit="macs"):
    rng = np.random.default_rng(seed)
    p, h = len(positions), len(heads)
    if unit == "macs":
        bb = np.cumsum(rng.integers(1, 4, p)) * 10**9
        # head costs from a small set so that different configurations can cost the same (ties)
        return Costs(positions, heads, bb, int(bb[-1] + 10**9), rng.integers(0, 3, (p, h)) * 10**8, 5 * 10**8, "macs")
    bb = np.cumsum(rng.uniform(0.5, 2.0, p))
    return Costs(positions, heads, bb, float(bb[-1] + 0.7), rng.uniform(0.0, 0.3, (p, h)), 0.4, "ms")


# ------------------------------------------------------------------------------------------ brute force

def brute_force_rows(cache, spec, macs, latencies):
    """Every configuration one at a time, image by image, with Python loops; the same formulas as DESIGN.md."""
    n = cache.n_images
    gt = cache.gt.sum(axis=0)
    final = cache.tp.shape[1] - 1

    def confidence(i, e):
        if spec.policy_kind == "mean":
            return float(cache.conf_mean[i, e])
        return float(np.float64(cache.n_above[i, e, spec.pixel_threshold_bin]) / np.float64(cache.n_pixels[i]))

    def cost(table, exits, n_at, n_final):
        ints = table.unit == "macs"
        acc, h = (0, 0) if ints else (0.0, 0.0)
        for (p, hh), nj in zip(exits, n_at):
            pi, hi = table.positions.index(p), table.heads.index(hh)
            hv = int(table.head[pi, hi]) if ints else float(table.head[pi, hi])
            h = h + hv
            acc = acc + nj * ((int(table.backbone_to[pi]) if ints else float(table.backbone_to[pi])) + h)
        total = int(table.backbone_total) if ints else float(table.backbone_total)
        fin = int(table.final) if ints else float(table.final)
        return acc + n_final * ((total + h) + fin)

    def row(kind, exits, thresholds, static=False):
        tp = np.zeros(cache.gt.shape[1], dtype=np.int64)
        pred = np.zeros_like(tp)
        n_at = [0] * len(exits)
        n_final = 0
        for i in range(n):
            taken = None
            for j, ((p, h), t) in enumerate(zip(exits, thresholds)):
                if static or confidence(i, cache.exit_index(p, h)) >= t:
                    taken = j
                    break
            e = final if taken is None else cache.exit_index(*exits[taken])
            if taken is None:
                n_final += 1
            else:
                n_at[taken] += 1
            tp += cache.tp[i, e]
            pred += cache.pred[i, e]
        r = {"kind": kind, "n_exits": len(exits), "positions": [p for p, _ in exits], "heads": [h for _, h in exits],
             "thresholds": [float(t) for t in thresholds],
             "miou": float(stats.miou_from_counts(tp, pred, gt)), "pixel_acc": float(stats.pixel_accuracy(tp, gt)),
             "exit_rates": [x / n for x in n_at] + [n_final / n]}
        r["macsum"] = cost(macs, exits, n_at, n_final)
        r["mean_gmacs"] = r["macsum"] / n / 1e9
        for dev, table in latencies.items():
            r[f"latency_ms_{dev}"] = cost(table, exits, n_at, n_final) / n
        r["config_id"] = config_id(kind, r["positions"], r["heads"], r["thresholds"])
        return r

    rows = [row("reference", [], [])]
    for k in range(1, spec.max_exits + 1):
        for pos in itertools.combinations(spec.positions, k):
            for hs in itertools.product(spec.heads, repeat=k):
                if spec.thresholds_mode == "shared":
                    combos = [(t,) * k for t in spec.thresholds]
                else:
                    combos = itertools.product(spec.thresholds, repeat=k)
                for ts in combos:
                    rows.append(row("cascade", list(zip(pos, hs)), list(ts)))
    if spec.mode == "single":
        for p in spec.positions:
            for h in spec.heads:
                rows.append(row("static", [(p, h)], [0.0], static=True))
    ref = rows[0]
    for r in rows:
        r["speedup"] = ref["macsum"] / r["macsum"]
        r["miou_delta_pp"] = (r["miou"] - ref["miou"]) * 100
        r["is_reference"] = r["kind"] == "reference"
    return rows


def brute_force_front(rows, latencies, spec):
    """Non-dominated rows (O(M^2) loops), one per objective vector by (n_exits, config_id), constraints, reference."""
    def obj(r):
        return (-r["miou"], r["mean_gmacs"]) + tuple(r[f"latency_ms_{d}"] for d in sorted(latencies))

    def feasible(r):
        return ((spec.max_gmacs is None or r["mean_gmacs"] <= spec.max_gmacs)
                and (spec.min_miou is None or r["miou"] >= spec.min_miou)
                and (spec.max_miou_drop_pp is None or r["miou_delta_pp"] >= -spec.max_miou_drop_pp)
                and all(r[f"latency_ms_{d}"] <= ms for d, ms in spec.max_latency_ms.items()))
    objs = [obj(r) for r in rows]
    front = []
    for i, a in enumerate(objs):
        dominated = any(all(x <= y for x, y in zip(b, a)) and b != a for b in objs)
        if not dominated:
            front.append(i)
    best = {}
    for i in front:
        key = (rows[i]["n_exits"], rows[i]["config_id"])
        if objs[i] not in best or key < best[objs[i]][0]:
            best[objs[i]] = (key, i)
    keep = {i for _, i in best.values() if feasible(rows[i]) and not rows[i]["is_reference"]}
    keep.add(0)
    return [rows[i] for i in sorted(keep)]


COLUMNS = ["config_id", "kind", "n_exits", "positions", "heads", "thresholds", "miou", "pixel_acc", "mean_gmacs",
           "exit_rates", "speedup", "miou_delta_pp", "is_reference"]


def assert_same_rows(df, expected, latencies):
    cols = COLUMNS + [f"latency_ms_{d}" for d in sorted(latencies)]
    got = df.sort_values("config_id").reset_index(drop=True)
    want = sorted(expected, key=lambda r: r["config_id"])
    assert list(got["config_id"]) == [r["config_id"] for r in want]
    for (_, g), w in zip(got.iterrows(), want):
        for c in cols:
            gv = list(g[c]) if isinstance(w[c], list) else g[c]
            assert gv == w[c], (c, g["config_id"], gv, w[c])   # exact, not approximate


def assert_no_row_dominated(df):
    o = np.stack([-df["miou"], df["mean_gmacs"]] + [df[c] for c in df if c.startswith("latency_ms_")], axis=1)
    rest = o[~df["is_reference"].to_numpy()]
    for a in rest:
        assert not np.any(np.all(rest <= a, axis=1) & np.any(rest < a, axis=1))


# ---------------------------------------------------------------------------------------------- the tests

@st.composite
def problems(draw, per_exit=False):
    n_pos = draw(st.integers(2, 4))
    n_heads = draw(st.integers(1, 3))
    n_thr = draw(st.integers(2, 3 if per_exit else 4))
    thresholds = tuple(draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.6, 0.75, 1.0]), min_size=n_thr,
                                     max_size=n_thr, unique=True)))
    cache = make_cache(draw(st.integers(0, 10**6)), n_pos, n_heads, draw(st.integers(3, 12)), draw(st.integers(2, 4)))
    fraction = draw(st.booleans())
    spec = SearchSpec(positions=list(cache.positions), heads=list(cache.heads), thresholds=thresholds,
                      max_exits=draw(st.integers(1, 4)),
                      thresholds_mode="per-exit" if per_exit else "shared",
                      mode=draw(st.sampled_from(["cascade", "single"])),
                      policy_kind="fraction" if fraction else "mean", pixel_threshold_bin=2 if fraction else None,
                      evaluator="kernel")   # the compiled kernels; test_plain_* draw the same problems plain
    seed = draw(st.integers(0, 1000))
    macs = make_costs(seed, cache.positions, cache.heads)
    latencies = {"cpu": make_costs(seed + 1, cache.positions, cache.heads, "ms")} if draw(st.booleans()) else {}
    return cache, spec, macs, latencies


SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


@contextlib.contextmanager
def small_blocks(on: bool):
    """An output buffer of one threshold's rows: the kernels pause after every (prefix, new exit) pair and resume;
    the plain evaluator sums one configuration a block."""
    saved = search_kernel.OUT_ROWS, search_plain.BLOCK_CELLS
    if on:
        search_kernel.OUT_ROWS, search_plain.BLOCK_CELLS = 1, 1
    try:
        yield
    finally:
        search_kernel.OUT_ROWS, search_plain.BLOCK_CELLS = saved


@SETTINGS
@given(problems(), st.integers(1, 5), st.booleans())
def test_front_equals_brute_force_shared(problem, shards, small):
    cache, spec, macs, latencies = problem
    rows = brute_force_rows(cache, spec, macs, latencies)
    with small_blocks(small):
        df = search_local(cache, spec, macs, latencies, shards=shards)
    assert_same_rows(df, brute_force_front(rows, latencies, spec), latencies)
    assert_no_row_dominated(df)
    assert df.attrs["n_evaluated"] == len(rows) - 1 == spec.n_configs()


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(problems(per_exit=True), st.integers(1, 3), st.booleans())
def test_front_equals_brute_force_per_exit(problem, shards, small):
    cache, spec, macs, latencies = problem
    rows = brute_force_rows(cache, spec, macs, latencies)
    with small_blocks(small):
        df = search_local(cache, spec, macs, latencies, shards=shards)
    assert_same_rows(df, brute_force_front(rows, latencies, spec), latencies)
    assert df.attrs["n_evaluated"] == len(rows) - 1 == spec.n_configs()


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.booleans().flatmap(problems), st.booleans(), st.integers(1, 4))
def test_every_configuration_equals_brute_force(problem, small, shards):
    # both modes, every configuration row for row: the incremental sums (carried from one threshold to the next:
    # per-exit, a prefix's last-exit thresholds; shared, the one threshold of all exits), the compiled kernels
    # paused and resumed after every step (small), and trees holding only a shard's thresholds give the brute
    # force's exact numbers
    cache, spec, macs, latencies = problem
    rows = brute_force_rows(cache, spec, macs, latencies)
    with small_blocks(small):
        df = evaluate_configs(cache, spec, macs, latencies, shards=shards)
    assert len(df) == len(rows) and df["config_id"].is_unique
    assert_same_rows(df, rows, latencies)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(problems(), st.booleans())
def test_shared_kernel_without_its_pair_table_equals_brute_force(problem, small):
    # over its budget (PAIR_BYTES) the pair table is not built and the last exits are summed as their prefixes
    cache, spec, macs, latencies = problem
    rows = brute_force_rows(cache, spec, macs, latencies)
    saved = search_shared.PAIR_BYTES
    search_shared.PAIR_BYTES = 0
    try:
        with small_blocks(small):
            df = evaluate_configs(cache, spec, macs, latencies, shards=2)
    finally:
        search_shared.PAIR_BYTES = saved
    assert len(df) == len(rows)
    assert_same_rows(df, rows, latencies)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.booleans().flatmap(problems), st.integers(1, 4), st.booleans())
def test_plain_evaluator_equals_brute_force_row_for_row(problem, shards, small):
    # search_plain (numpy, for small spaces) against the brute force: every configuration, then the front
    cache, spec, macs, latencies = problem
    spec = dataclasses.replace(spec, evaluator="plain")
    rows = brute_force_rows(cache, spec, macs, latencies)
    with small_blocks(small):
        df = evaluate_configs(cache, spec, macs, latencies, shards=shards)
    assert len(df) == len(rows) and df["config_id"].is_unique
    assert_same_rows(df, rows, latencies)
    front = search_local(cache, spec, macs, latencies, shards=shards)
    assert_same_rows(front, brute_force_front(rows, latencies, spec), latencies)
    assert front.attrs["n_evaluated"] == spec.n_configs()


def test_auto_evaluates_plain_up_to_its_work_limit_and_with_the_kernels_beyond(monkeypatch):
    from messearch import search_plain
    from messearch.search import prepare
    cache = make_cache(4, 3, 2, 10, 3)
    macs = make_costs(4, cache.positions, cache.heads)
    spec = SearchSpec(positions=cache.positions, heads=cache.heads, thresholds=(0.3, 0.5, 0.7), max_exits=3)
    work = search_plain.plain_work(spec, cache.n_images)
    fronts = {}
    for limit, plain in ((work, True), (work - 1, False)):
        monkeypatch.setattr(search_plain, "PLAIN_MAX_WORK", limit)
        assert prepare(cache, spec, macs).plain is plain
        fronts[plain] = search_local(cache, spec, macs, shards=2)
    assert fronts[True].equals(fronts[False])
    assert prepare(cache, dataclasses.replace(spec, evaluator="plain"), macs).plain
    monkeypatch.setattr(search_plain, "PLAIN_MAX_WORK", 10**12)
    assert not prepare(cache, dataclasses.replace(spec, evaluator="kernel"), macs).plain


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 10**6), st.booleans(), st.booleans(), st.sampled_from(["kernel", "plain"]))
def test_many_thresholds_carried_row_for_row(seed, per_exit, small, evaluator):
    # many thresholds over many images, confidences tied to the thresholds' values: each step of the carried sums
    # adds and removes several images, some at exactly the threshold; every configuration against the brute force
    rng = np.random.default_rng(seed)
    cache = make_cache(seed, 3, 2, 24, 3)
    thresholds = tuple(float(t) for t in rng.permutation(np.round(np.linspace(0.05, 0.95, 7 if per_exit else 12), 2)))
    cache.conf_mean = rng.choice(np.asarray(thresholds + (0.0, 1.0)), cache.conf_mean.shape)
    spec = SearchSpec(positions=cache.positions, heads=cache.heads, thresholds=thresholds, max_exits=3,
                      thresholds_mode="per-exit" if per_exit else "shared", evaluator=evaluator)
    macs = make_costs(seed, cache.positions, cache.heads)
    rows = brute_force_rows(cache, spec, macs, {})
    with small_blocks(small):
        df = evaluate_configs(cache, spec, macs, shards=int(rng.integers(1, 4)))
    assert_same_rows(df, rows, {})


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(problems(), st.floats(0.0, 3.0), st.floats(0.0, 1.0))
def test_constraints_filter_the_front(problem, drop_pp, gmacs_share):
    cache, spec, macs, latencies = problem
    rows = brute_force_rows(cache, spec, macs, latencies)
    spec.max_miou_drop_pp = drop_pp
    spec.max_gmacs = rows[0]["mean_gmacs"] * (0.5 + gmacs_share)
    expected = brute_force_front(rows, latencies, spec)
    if len(expected) == 1:
        with pytest.raises(MessError, match="no configuration meets the constraints"):
            search_local(cache, spec, macs, latencies)
    else:
        assert_same_rows(search_local(cache, spec, macs, latencies, shards=2), expected, latencies)


def test_ties_resolved_by_fewest_exits_then_config_id():
    # one image, every exit a copy of the final head with confidence 1: all cascades that exit at the first
    # exit with the same cost tie; the 1-exit configuration must win, the rest by config_id
    cache = make_cache(3, 3, 2, 1, 2)
    cache.tp[:] = cache.tp[:, -1:]
    cache.pred[:] = cache.pred[:, -1:]
    cache.conf_mean[:] = 1.0
    pos, heads = cache.positions, cache.heads
    macs = Costs(pos, heads, np.array([10, 20, 30]) * 10**9, 40 * 10**9, np.zeros((3, 2), dtype=np.int64), 10**9)
    spec = SearchSpec(positions=pos, heads=heads, thresholds=(0.5, 0.9), max_exits=3, evaluator="kernel")
    df = search_local(cache, spec, macs, shards=3)
    rows = brute_force_rows(cache, spec, macs, {})
    assert_same_rows(df, brute_force_front(rows, {}, spec), {})
    cheapest = df.iloc[0]
    assert cheapest["n_exits"] == 1 and cheapest["positions"] == [pos[0]]
    ties = [r for r in rows if r["n_exits"] == 1 and r["positions"] == [pos[0]]]
    assert cheapest["config_id"] == min(r["config_id"] for r in ties)


BAD_SPECS = {
    "unknown position": (lambda c: SearchSpec(["backbone.layer9.9"], c.heads, (0.5,)), "another space or checkpoint"),
    "repeated threshold": (lambda c: SearchSpec(c.positions, c.heads, (0.5, 0.5)), "distinct"),
    "too large": (lambda c: SearchSpec(c.positions, c.heads, tuple(np.linspace(0, 1, 200_000)), max_exits=2,
                                       thresholds_mode="per-exit"), "--force"),
    "unknown evaluator": (lambda c: SearchSpec(c.positions, c.heads, (0.5,), evaluator="gpu"),
                          "evaluator 'gpu' is not allowed; use one of auto, kernel, plain"),
    "latency without profile": (lambda c: SearchSpec(c.positions, c.heads, (0.5,), max_latency_ms={"gpu": 1.0}),
                                "without a profile"),
    "NaN budget": (lambda c: SearchSpec(c.positions, c.heads, (0.5,), max_gmacs=float("nan")), "max_gmacs nan"),
    "infinite latency budget": (lambda c: SearchSpec(c.positions, c.heads, (0.5,), max_latency_ms={"cpu": math.inf}),
                                r"max_latency_ms\[cpu\] inf"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_input_is_named(case):
    cache = make_cache(0, 2, 1, 3, 2)
    macs = make_costs(0, cache.positions, cache.heads)
    make_spec, named = BAD_SPECS[case]
    with pytest.raises(MessError, match=named):
        search_local(cache, make_spec(cache), macs)


@pytest.mark.parametrize("shards", [0, -1, 1.5])
def test_a_shard_count_below_one_is_named(shards):
    cache = make_cache(0, 2, 1, 3, 2)
    macs = make_costs(0, cache.positions, cache.heads)
    with pytest.raises(MessError, match=f"shards {shards!r} must be a whole number >= 1"):
        search_local(cache, SearchSpec(cache.positions, cache.heads, (0.5,)), macs, shards=shards)


def test_search_through_local_ray_writes_a_front_pandas_reads(ray_local, tmp_path):
    cache = make_cache(7, 3, 2, 10, 3)
    macs = make_costs(7, cache.positions, cache.heads)
    spec = SearchSpec(positions=cache.positions, heads=cache.heads, thresholds=(0.3, 0.5, 0.7), max_exits=3,
                      mode="single", evaluator="kernel")
    df = run_search(cache, spec, macs, shards=2, storage_path=tmp_path / "tune", keep_all_dir=tmp_path / "all",
                    verbose=False)
    assert_same_rows(df, brute_force_front(brute_force_rows(cache, spec, macs, {}), {}, spec), {})
    # resuming keeps the shard count the run started with, whatever the rate measured now suggests
    again = run_search(cache, spec, macs, storage_path=tmp_path / "tune", resume=True, verbose=False)
    assert again.equals(df)
    out = tmp_path / "pareto.parquet"
    write_front(df, out, {"space_text": "x: 1", "space_source": "s.yaml", "checkpoint_sha256": "ab",
                          "cache_sha256": "cd", "mode": spec.mode, "thresholds": spec.thresholds_mode})
    back = pd.read_parquet(out)
    assert list(back["config_id"]) == list(df["config_id"])
    assert back["is_reference"].sum() == 1 and back["thresholds"].map(list).tolist() == df["thresholds"].tolist()
    _, meta = read_front(out)
    assert meta["schema_version"] == "1" and meta["thresholds"] == "shared"
    every = pd.read_parquet(tmp_path / "all")
    assert len(every) == spec.n_configs() and every["config_id"].is_unique
    assert set(df["config_id"]) - {"reference"} <= set(every["config_id"])


@pytest.mark.parametrize("evaluator", ["kernel", "plain"])
@pytest.mark.parametrize("scale", [2**19, 2**27])
def test_large_pixel_counts_stay_exact(scale, evaluator):
    # counts whose sums pass 2**24 (float32's exact integers; the kernels add in int32) and 2**31 (int64): bit-exact,
    # the plain evaluator's float64 products too
    cache = make_cache(11, 3, 2, 12, 3)
    for name in ("tp", "pred", "gt", "n_above", "n_pixels"):
        setattr(cache, name, getattr(cache, name) * scale)
    macs = make_costs(11, cache.positions, cache.heads)
    spec = SearchSpec(positions=cache.positions, heads=cache.heads, thresholds=(0.3, 0.5, 0.7), max_exits=3,
                      policy_kind="fraction", pixel_threshold_bin=2, evaluator=evaluator)
    from messearch.search import prepare
    prep = prepare(cache, spec, macs)
    assert prep.xt.dtype == (np.int32 if scale == 2**19 else np.int64) and int(prep.base.max()) >= 2**24
    rows = brute_force_rows(cache, spec, macs, {})
    assert_same_rows(evaluate_configs(cache, spec, macs), rows, {})
    assert_same_rows(search_local(cache, spec, macs, shards=2), brute_force_front(rows, {}, spec), {})


def test_the_front_does_not_depend_on_the_number_of_shards_or_the_evaluator():
    cache = make_cache(21, 4, 2, 9, 3)
    macs = make_costs(21, cache.positions, cache.heads)
    for mode in ("shared", "per-exit"):
        spec = SearchSpec(positions=cache.positions, heads=cache.heads, thresholds=(0.6, 0.3, 0.8), max_exits=3,
                          thresholds_mode=mode, mode="single", evaluator="kernel")
        one = search_local(cache, spec, macs, shards=1)
        for shards, evaluator in itertools.product((1, 2, 3, 7, 40), ("kernel", "plain")):
            other = search_local(cache, dataclasses.replace(spec, evaluator=evaluator), macs, shards=shards)
            assert other.equals(one) and other.attrs["n_evaluated"] == spec.n_configs(), (mode, shards, evaluator)


def test_keep_all_writes_every_configuration_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_front, "KEEP_ALL_ROWS", 40)
    cache = make_cache(5, 3, 2, 8, 3)
    macs = make_costs(5, cache.positions, cache.heads)
    spec = SearchSpec(positions=cache.positions, heads=cache.heads, thresholds=(0.3, 0.5, 0.7), max_exits=3,
                      thresholds_mode="per-exit", evaluator="kernel")
    search_local(cache, spec, macs, shards=2, keep_all_dir=tmp_path / "all")
    files = list((tmp_path / "all").rglob("*.parquet"))
    assert len(files) >= spec.n_configs() // 40   # written as it went, ~KEEP_ALL_ROWS rows at a time
    every = pd.read_parquet(tmp_path / "all").sort_values("config_id").reset_index(drop=True)
    want = evaluate_configs(cache, spec, macs).query("not is_reference").sort_values("config_id").reset_index(drop=True)
    assert list(every["config_id"]) == list(want["config_id"])
    assert every["miou"].tolist() == want["miou"].tolist() and every["mean_gmacs"].tolist() == want["mean_gmacs"].tolist()
    # a second run with another shard count and fewer exits replaces the first run's files; no temporary is left
    spec2 = SearchSpec(positions=cache.positions, heads=cache.heads, thresholds=(0.3, 0.5), max_exits=2,
                       thresholds_mode="per-exit")
    search_local(cache, spec2, macs, shards=1, keep_all_dir=tmp_path / "all")
    again = pd.read_parquet(tmp_path / "all")
    assert len(again) == spec2.n_configs() and again["config_id"].is_unique
    assert not [p for p in (tmp_path / "all").rglob("*") if p.name.startswith(".")]


def test_size_estimate_from_a_measured_rate_refuses_an_hour_without_force_or_cluster():
    from messearch import search_size
    from messearch.info import space_info
    info = space_info("quickstart", n_images=20)
    est = info["search_estimate"]
    for mode, n in (("shared", info["n_configs"]), ("per-exit", info["n_configs_per_exit_thresholds"])):
        e = est[mode]
        assert e["n_configs"] == n - 1 and e["configs_per_cpu_s"] > 0   # info counts the reference row too
        assert e["seconds"] == pytest.approx(e["n_configs"] / e["configs_per_cpu_s"] / e["cores"])
    long = {"n_configs": 10**12, "configs_per_cpu_s": 1e6, "cores": 2, "cpu_seconds": 1e6, "seconds": 5e5, "bytes": 1}
    with pytest.raises(MessError, match="--force.*--address"):
        search_size.check(long, force=False, address=None)
    search_size.check(long, force=True, address=None)
    search_size.check(long, force=False, address="10.0.0.1:6379")
    assert search_size.n_shards(long, 2) == math.ceil(1e6 / search_size.TRIAL_SECONDS)   # no trial over a minute


def test_shards_take_contiguous_thresholds_with_the_same_loads():
    from messearch.search_spec import BOUNDARY_SLACK, assign_shards, plan_items
    spec = SearchSpec(positions=[f"p{i}" for i in range(5)], heads=["a", "b"], thresholds=tuple(range(11)),
                      max_exits=3, mode="single")
    items = plan_items(spec)
    for n, whole_trees in itertools.product((1, 2, 3, 4, 7), (False, True)):
        shards = assign_shards(items, n, whole_trees)
        assert sorted(it for s in shards for it in s) == sorted(items)   # every item once
        loads = [sum(it[-1] for it in s) for s in shards]
        biggest = max(it[-1] for it in items)
        if whole_trees:   # each run near its share of what was left: within an item, or ends a whole tree nearby
            left = sum(loads)
            for k, load in enumerate(loads[:-1]):
                share = left / (n - k)
                assert abs(load - share) <= max(biggest, BOUNDARY_SLACK * share), (n, k, load, share)
                left -= load
        else:
            assert max(loads) - min(loads) <= biggest   # LPT balance kept
        for s in shards:
            for p in {it[2] for it in s if it[0] == "tree"}:
                ts = sorted(it[1] for it in s if it[0] == "tree" and it[2] == p)
                assert ts == list(range(ts[0], ts[0] + len(ts))), (n, p, ts)
        if whole_trees:   # shared thresholds: a tree's pass serves all its thresholds, so few trees are split
            split = [p for p in range(5) if sum(any(it[0] == "tree" and it[2] == p for it in s) for s in shards) > 1]
            assert len(split) <= n - 1 and all(shards), (n, split)
    # the reference space in two shards: its trees at positions 0-2 hold 48.6% of the work, so no tree is cut
    spec = SearchSpec(positions=[f"p{i}" for i in range(16)], heads=[str(j) for j in range(8)],
                      thresholds=tuple(range(20)), max_exits=3)
    first, second = assign_shards(plan_items(spec), 2, True)
    assert {it[2] for it in first} == {0, 1, 2} and {it[2] for it in second} == set(range(3, 16))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 10**6), st.integers(1, 30), st.sampled_from([10, 10**4, 2**40]))
def test_kernel_miou_is_the_one_definition_float_for_float(seed, n_classes, scale):
    # the kernels' pre-filter compares this mIoU; it must be stats.miou_from_counts's float, classes with no pixel too
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, scale, n_classes) * (rng.random(n_classes) < 0.7)
    tp = np.minimum(rng.integers(0, scale, (50, n_classes)), gt)
    pred = tp + rng.integers(0, scale, (50, n_classes)) * (rng.random((50, n_classes)) < 0.5)
    want = stats.miou_from_counts(tp, pred, gt)
    rows = np.zeros((50, 2 * n_classes + 5), np.int64)   # the kernels' rows: tp, pred, the exit counter, padding
    rows[:, :n_classes], rows[:, n_classes:2 * n_classes] = tp, pred
    got = np.array([search_kernel.miou_of(r, gt.astype(np.int64)) for r in rows])
    assert got.tobytes() == want.tobytes()


def test_the_kernels_hand_over_few_rows_and_count_every_configuration():
    # the pre-filter drops only configurations that an evaluated one dominates: few rows reach Python, the count is whole
    cache = make_cache(8, 4, 3, 12, 3)
    macs = make_costs(8, cache.positions, cache.heads)
    from messearch.search import evaluate_items, prepare
    from messearch.search_spec import plan_items
    for mode in ("shared", "per-exit"):
        spec = SearchSpec(positions=cache.positions, heads=cache.heads, thresholds=(0.2, 0.4, 0.5, 0.6, 0.8),
                          max_exits=3, thresholds_mode=mode, evaluator="kernel")
        prep = prepare(cache, spec, macs)
        sink = shard_front.FrontSink(prep)
        taken = []
        take = sink.take
        sink.take = lambda rows, n: (taken.append(len(rows["miou"])), take(rows, n))
        evaluate_items(prep, plan_items(spec), sink)
        assert sink.n_evaluated == spec.n_configs() and 0 < sum(taken) < spec.n_configs() / 5, (mode, sum(taken))


def test_plot_names_a_damaged_keep_all_folder(tmp_path):
    from messearch.plot import plot_file
    cache = make_cache(5, 2, 2, 6, 3)
    macs = make_costs(5, cache.positions, cache.heads)
    spec = SearchSpec(positions=cache.positions, heads=cache.heads, thresholds=(0.3, 0.7), max_exits=2)
    keep = tmp_path / "pareto_all"
    df = search_local(cache, spec, macs, keep_all_dir=keep)
    out = tmp_path / "pareto.parquet"
    write_front(df, out, {"space_text": "x: 1", "space_source": "s.yaml", "checkpoint_sha256": "ab",
                          "cache_sha256": "cd", "mode": spec.mode, "thresholds": spec.thresholds_mode,
                          "keep_all_dir": str(keep)})
    assert plot_file(out, tmp_path / "ok.png").exists()
    victim = sorted(keep.rglob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:40])   # a file cut short, as by a crash mid-write before this change
    with pytest.raises(MessError, match="pareto_all: the --keep-all points are not readable"):
        plot_file(out, tmp_path / "bad.png")
