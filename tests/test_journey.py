"""The user's journey: pipeline (train, cache, profile, search, export, evaluate), query and plot, resuming."""

import json

import pandas as pd

from messearch.cli import main
from messearch.pipeline import run_pipeline


def test_pipeline_writes_every_output_and_the_measured_model_matches_the_front(journey):
    root, _, summary = journey
    out = root / "run"
    for name in ("mess.pt", "cache/manifest.json", "profiles/cpu.parquet", "pareto.parquet", "pareto.png",
                 "model.pt", "summary.md"):
        assert (out / name).exists(), name
    front = pd.read_parquet(out / "pareto.parquet")
    assert front["is_reference"].sum() == 1 and len(front) == summary["front_rows"] + 1
    assert "latency_ms_cpu" in front.columns
    assert summary["chosen"]["miou_delta_pp"] >= -0.5
    assert summary["exact"] is True
    assert summary["measured"]["miou"] == summary["chosen"]["miou"]
    assert summary["measured"]["mean_gmacs"] == summary["chosen"]["mean_gmacs"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Front:" in (out / "summary.md").read_text()


def test_rerun_resumes_every_stage(journey, capsys):
    root, space, first = journey
    again = run_pipeline(str(space), None, root / "run", evaluate_models=False)
    said = capsys.readouterr().out
    for stage in ("train", "cache", "profile", "search", "export"):
        assert f"[messearch] {stage}: " in said and "skipped" in said.split(f"[messearch] {stage}: ")[1].splitlines()[0]
    assert again["chosen"] == first["chosen"]


def test_query_json_and_table(journey, capsys):
    root, _, _ = journey
    front = root / "run" / "pareto.parquet"
    assert main(["query", str(front), "--max-miou-drop-pp", "1.0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["is_reference"] is True
    assert all(r["miou_delta_pp"] >= -1.0 for r in rows[1:])
    assert main(["query", str(front), "--sort", "miou", "--descending", "--top", "2"]) == 0
    table = capsys.readouterr().out
    assert "config_id" in table and "(original model)" in table and "matching configurations" in table
    assert main(["query", str(front), "--sort", "nope"]) == 2


def test_plot_command_writes_a_png(journey, tmp_path):
    root, _, _ = journey
    out = tmp_path / "front.png"
    assert main(["plot", str(root / "run" / "pareto.parquet"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_cli_constraint_and_latency_budget(journey, tmp_path, capsys):
    root, _, _ = journey
    out = tmp_path / "front.parquet"
    cache = str(root / "run" / "cache")
    profile = str(root / "run" / "profiles" / "cpu.parquet")
    assert main(["search", "--cache", cache, "--out", str(out), "--profile", profile, "--local",
                 "--max-latency-ms", "cpu=1000"]) == 0
    front = pd.read_parquet(out)
    assert (front.loc[~front["is_reference"], "latency_ms_cpu"] <= 1000).all()
    assert main(["search", "--cache", cache, "--out", str(out), "--local", "--max-gmacs", "0.000001"]) == 2
    assert "no configuration meets the constraints" in capsys.readouterr().err
    assert main(["search", "--cache", cache, "--out", str(out), "--local", "--max-latency-ms", "cpu"]) == 2


def test_search_holdout_and_robust_query(journey, tmp_path, capsys):
    root, _, summary = journey
    assert "How far to trust it" in (root / "run" / "summary.md").read_text()   # the default front has intervals
    out = tmp_path / "front.parquet"
    cache = str(root / "run" / "cache")
    profile = str(root / "run" / "profiles" / "cpu.parquet")
    assert main(["search", "--cache", cache, "--out", str(out), "--profile", profile, "--local", "--holdout", "0.25",
                 "--bootstrap", "30", "--seed", "3"]) == 0
    front = pd.read_parquet(out)
    for c in ("miou_lo", "gmacs_hi", "latency_ms_cpu_lo", "holdout_miou", "holdout_exit_rates", "fragile"):
        assert c in front.columns, c
    capsys.readouterr()
    assert main(["query", str(out), "--max-miou-drop-pp", "1.0", "--robust", "--json"]) == 0
    robust = json.loads(capsys.readouterr().out)
    assert all(r["miou_delta_pp"] >= -1.0 and not r["fragile"] for r in robust[1:])
    assert main(["query", str(out)]) == 0
    assert "hold-out %" in capsys.readouterr().out
    assert main(["search", "--cache", cache, "--out", str(out), "--local", "--holdout", "0.25", "--holdout-by",
                 "group"]) == 2
    assert "at least two groups" in capsys.readouterr().err
