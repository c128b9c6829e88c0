"""Non-dominated sets, deterministic ties, the pareto.parquet file and the pandas helpers."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from messearch.errors import MessError
from messearch.front import best_under, cheapest_within, filter_front, speedup_at_equal_accuracy, summary_line
from messearch.config import config_id
from messearch.front import read_front, write_front
from messearch.pareto import nondominated_mask, pareto_select


def plain_nondominated(obj):
    return np.array([not any(np.all(b <= a) and np.any(b < a) for b in obj) for a in obj], dtype=bool)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.lists(st.integers(0, 4), min_size=1, max_size=60), st.integers(0, 10**6))
def test_nondominated_mask_equals_plain_loops(d, values, seed):
    rng = np.random.default_rng(seed)
    obj = rng.integers(0, 4, (len(values), d)).astype(float)   # small integers: many ties and equal rows
    assert np.array_equal(nondominated_mask(obj), plain_nondominated(obj))


def test_pareto_select_keeps_one_row_per_vector_by_exits_then_id():
    obj = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    n_exits = np.array([2, 1, 1, 3, 1])
    ids = ["cb", "cz", "ca", "cq", "cc"]
    got = pareto_select(obj, n_exits, lambda idx: [ids[i] for i in idx])
    assert list(got) == [2, 3]      # (1, "ca") beats (1, "cz") and (2, "cb"); row 4 is dominated


def test_config_id_is_stable_and_canonical():
    a = config_id("cascade", ["backbone.layer1.0"], ["h0"], [0.5])
    assert a == config_id("cascade", ["backbone.layer1.0"], ["h0"], [np.float64(0.5)])
    assert a != config_id("static", ["backbone.layer1.0"], ["h0"], [0.5])
    assert a.startswith("c") and len(a) == 11 and config_id("reference", [], [], []) == "reference"


def small_front():
    return pd.DataFrame({
        "config_id": ["reference", "ca", "cb", "cc"], "kind": ["reference", "cascade", "cascade", "static"],
        "n_exits": [0, 1, 2, 1], "positions": [[], ["p1"], ["p1", "p2"], ["p2"]], "heads": [[], ["h"], ["h", "h"], ["h"]],
        "thresholds": [[], [0.5], [0.7, 0.7], [0.0]], "miou": [0.70, 0.698, 0.69, 0.60],
        "pixel_acc": [0.9, 0.89, 0.88, 0.8], "mean_gmacs": [100.0, 60.0, 50.0, 20.0],
        "exit_rates": [[1.0], [0.5, 0.5], [0.3, 0.3, 0.4], [1.0, 0.0]], "speedup": [1.0, 100 / 60, 2.0, 5.0],
        "miou_delta_pp": [0.0, -0.2, -1.0, -10.0], "is_reference": [True, False, False, False],
        "latency_ms_cpu": [10.0, 6.0, 5.5, 2.0]})


def test_write_read_roundtrip_with_metadata(tmp_path):
    df = small_front()
    path = tmp_path / "out" / "pareto.parquet"
    write_front(df, path, {"space_text": "name: x\n", "space_source": "s.yaml", "checkpoint_sha256": "a" * 64,
                           "cache_sha256": "b" * 64, "mode": "cascade", "thresholds": "shared"})
    assert [p.name for p in path.parent.iterdir()] == ["pareto.parquet"]   # no temporary file left behind
    back, meta = read_front(path)
    pd.testing.assert_frame_equal(back.drop(columns=["positions", "heads", "thresholds", "exit_rates"]),
                                  df.drop(columns=["positions", "heads", "thresholds", "exit_rates"]))
    assert [list(x) for x in back["exit_rates"]] == list(df["exit_rates"])
    assert meta["schema_version"] == "1" and meta["space_text"] == "name: x\n" and meta["thresholds"] == "shared"
    plain = pd.read_parquet(path)
    assert list(plain.columns[:13]) == list(df.columns[:13]) and "latency_ms_cpu" in plain


def test_write_front_of_reference_only_keeps_list_types(tmp_path):
    df = small_front().iloc[:1]
    write_front(df, tmp_path / "p.parquet", {})
    back = pd.read_parquet(tmp_path / "p.parquet")
    assert list(back["thresholds"].iloc[0]) == [] and back["is_reference"].iloc[0]
    with pytest.raises(MessError, match="missing columns"):
        write_front(df.drop(columns=["miou"]), tmp_path / "q.parquet", {})


def test_front_helpers():
    df = small_front()
    assert best_under(df, max_gmacs=55)["config_id"] == "cb"
    assert best_under(df, max_latency_ms=("cpu", 6.0))["config_id"] == "ca"
    assert best_under(df, max_gmacs=1) is None
    assert cheapest_within(df, 0.5)["config_id"] == "ca"
    assert cheapest_within(df, 0.5, device="cpu")["config_id"] == "ca"
    assert speedup_at_equal_accuracy(df, 0.5) == pytest.approx(100 / 60)
    assert list(filter_front(df, min_miou=0.65, max_latency_ms={"cpu": 5.9})["config_id"]) == ["cb"]
    with pytest.raises(MessError, match="no latency for device 'gpu'"):
        best_under(df, max_latency_ms=("gpu", 1.0))
    df.attrs.update(n_evaluated=1000, seconds=2.0)
    assert "500 configurations/s" in summary_line(df)
