"""Every stage without Ray: the commands that do not need Ray run in a Python where `import ray` fails, the
ones that do say so in one line, and `cache --local` writes the very cache (cache_sha256) the Ray actors write.

One subprocess (a sitecustomize on PYTHONPATH blocks `ray`) runs the whole CLI chain on a tiny space:
train, cache --local, profile, search --local, query, export, evaluate, plot, info; then, in this process with
a real local Ray, the same cache is built by actors and compared bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from messearch.cache import build_cache
from messearch.cache_format import load_cache

ROOT = Path(__file__).resolve().parents[1]
DATA = "synthetic:seed=3,train=8,val=6"
SPACE = """
name: noray
model: deeplabv3_resnet18
num_classes: 5
input_size: [32, 32]
data: synthetic:seed=3,train=8,val=6
positions: [backbone.layer1.1, backbone.layer3.1]
heads:
  - {name: lin, reduction: 4, layers: 0}
thresholds: {start: 0.5, stop: 0.9, num: 3}
max_exits: 2
train: {batch_size: 4, epochs_stage1: 1, epochs_stage2: 1}
"""

BLOCKER = '''
import sys
sys.ray_import_attempts = []

class _NoRay:
    """Makes `import ray` fail as it does where Ray is not installed, and remembers who asked."""
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            sys.ray_import_attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, _NoRay())
'''

# Runs in the Ray-less subprocess: each command through the CLI's own main(), one JSON report at the end.
CHAIN = r'''
import contextlib, io, json, sys, time
from messearch.cli import main

d, space = sys.argv[1], sys.argv[2]
report = {"runs": []}

def run(*argv):
    out, err, t = io.StringIO(), io.StringIO(), time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    report["runs"].append({"argv": list(argv), "rc": rc, "out": out.getvalue(), "err": err.getvalue(),
                           "t": time.perf_counter() - t})
    return out.getvalue()

run("info", space, "--json")
run("train", "--space", space, "--out", d, "--max-steps", "1", "--quiet")
run("cache", "--checkpoint", f"{d}/mess.pt", "--out", f"{d}/cache", "--local", "--shard-size", "4", "--quiet")
run("profile", "--checkpoint", f"{d}/mess.pt", "--out", f"{d}/profiles/cpu.parquet", "--min-run-time", "0.01", "--quiet")
run("search", "--cache", f"{d}/cache", "--out", f"{d}/pareto.parquet", "--local", "--profile", f"{d}/profiles/cpu.parquet")
rows = json.loads(run("query", f"{d}/pareto.parquet", "--json", "--sort", "mean_gmacs") or "[]")
cid = rows[0]["config_id"] if rows else "none"
report["row"] = rows[0] if rows else None
run("export", "--checkpoint", f"{d}/mess.pt", "--front", f"{d}/pareto.parquet", "--config-id", cid, "--out", f"{d}/model.pt")
report["measured"] = json.loads(run("evaluate", "--model", f"{d}/model.pt", "--data", "DATA", "--json", "--threads", "1")
                                or "null")
run("plot", f"{d}/pareto.parquet", "--out", f"{d}/pareto.png")
attempts_before = list(sys.ray_import_attempts)
run("cache", "--checkpoint", f"{d}/mess.pt", "--out", f"{d}/cache_ray")
run("search", "--cache", f"{d}/cache", "--out", f"{d}/p2.parquet")
run("train", "--space", space, "--out", f"{d}/t2", "--gpus", "1", "--quiet")
report["ray_attempts_before_ray_commands"] = attempts_before
report["ray_in_modules"] = "ray" in sys.modules
report["seconds"] = [round(r.pop("t"), 2) for r in report["runs"]]
print(json.dumps(report))
'''.replace("DATA", DATA)


def _no_ray_env(tmp_path: Path) -> dict:
    blocker = tmp_path / "noray"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("RAY_ADDRESS", None)
    return env


def test_every_stage_without_ray_and_local_cache_equals_ray_cache(tmp_path, ray_local):
    space = tmp_path / "noray.yaml"
    space.write_text(SPACE)
    d = tmp_path / "run"
    env = _no_ray_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'ray'" in probe.stderr   # the blocker works
    proc = subprocess.run([sys.executable, "-c", CHAIN, str(d), str(space)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    ok, needs_ray = report["runs"][:9], report["runs"][9:]
    for r in ok:
        assert r["rc"] == 0, (r["argv"], r["err"][-2000:])
    assert report["ray_attempts_before_ray_commands"] == [] and not report["ray_in_modules"]
    for r in needs_ray:   # one clear line, exit 2, no traceback
        assert r["rc"] == 2, r
        assert "needs Ray" in r["err"] and "Traceback" not in r["err"] and r["err"].count("\n") == 1, r["err"]
    assert "--local" in needs_ray[0]["err"] and "--local" in needs_ray[1]["err"] and "without --gpus" in needs_ray[2]["err"]

    # The exported row measured (CPU, batch 1, one thread, as the cache) equals the front's prediction exactly.
    front = pd.read_parquet(d / "pareto.parquet")
    row, measured = front.set_index("config_id").loc[report["row"]["config_id"]], report["measured"]
    assert measured["miou"] == row["miou"] and measured["exit_rates"] == list(row["exit_rates"])

    # The Ray actors' cache of the same checkpoint and shards: bit for bit the local one.
    local = load_cache(d / "cache")
    ray_dir = tmp_path / "ray_cache"
    manifest = build_cache(d / "mess.pt", None, "val", ray_dir, actors=2, shard_size=4, progress=False)
    assert manifest.cache_sha256 == local.meta["cache_sha256"]
    assert [s["sha256"] for s in manifest.shards] == [s["sha256"] for s in
                                                           json.loads((d / "cache" / "manifest.json").read_text())["shards"]]

    # Resume in-process: a lost shard is recomputed, to the same bytes.
    (d / "cache" / "shard-00001.parquet").unlink()
    again = build_cache(d / "mess.pt", None, "val", d / "cache", shard_size=4, resume=True, local=True, progress=False)
    assert again.recomputed == [1] and again.cache_sha256 == manifest.cache_sha256
    assert "latency_ms_cpu" in front.columns and front["is_reference"].sum() == 1


def _tiny_camvid(root: Path, n: int = 4) -> Path:
    """A CamVid-layout folder of n train and n val images (48x64 blocks of colour, 11 classes and void)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        lines = []
        for i in range(n):
            label = np.kron(rng.integers(0, 12, (6, 8)), np.ones((8, 8), np.int64)).astype(np.uint8)
            image = (rng.integers(0, 40, (48, 64, 3)) + label[..., None] * 18).astype(np.uint8)
            Image.fromarray(image).save(root / split / f"{i}.jpg", quality=95)
            Image.fromarray(label).save(root / f"{split}annot" / f"{i}.png")
            lines.append(f"{split}/{i}.jpg {split}annot/{i}.png\n")
        (root / f"{split}.txt").write_text("".join(lines))
    return root


def test_gpu_suite_smoke_runs_every_phase_without_ray(tmp_path):
    """benchmarks/gpu_suite.py --smoke: the device run's code path, on the CPU at a tiny size, where ray is absent."""
    data = _tiny_camvid(tmp_path / "camvid")
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--device", "cpu",
                           "--data", f"camvid:{data}", "--out", str(out)], env=_no_ray_env(tmp_path),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["complete"] and not r["ray_imported"] and "failed_phase" not in r
    assert list(r["phases"]) == ["probe", "train", "cache", "profile_search", "export_evaluate"]
    assert r["phases"]["train"]["epochs_run"] == [1, 1]
    cache = r["phases"]["cache"]
    assert cache["batch1"]["images"] == 4 and cache["batch1"]["exits"] == 4 * 2 + 1
    f = r["figures"]
    for key in ("cache_vs_plain_ratio", "stage2_vs_plain_step", "stage2_vs_heads_one_at_a_time"):
        assert f[key]["value"] > 0 and isinstance(f[key]["met"], bool)
    assert 0 <= f["original_val_miou"] <= 1 and f["best_speedup_within_0.5pp"]["value"] >= 1
    # CPU, batch 1, one thread for the cache and the evaluation: the exported row measures the front exactly.
    assert f["best_speedup_within_0.5pp"]["exact"], f["best_speedup_within_0.5pp"]
    assert f["latency_ms"]["chosen_measured"] > 0 and f["latency_ms"]["original_measured"] > 0
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ray_imported"] is False


def test_quickstart_design_smoke_judges_each_design_without_ray(tmp_path):
    """benchmarks/quickstart_design.py --smoke: two candidate designs trained, cached and searched in process, where
    ray is absent; a design's scenes reach its jobs (the colour cast changes what the model sees, so its figures)."""
    out = tmp_path / "design"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quickstart_design.py"), "--smoke", "--device", "cpu",
           "--variants", "shipped,cast_fast", "--seeds", "0", "--out", str(out)]
    env = _no_ray_env(tmp_path)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [json.loads(x) for x in (out / "jobs.jsonl").read_text().splitlines()]
    assert [(j["variant"], j["seed"]) for j in jobs] == [("shipped", 0), ("cast_fast", 0)]
    assert all("error" not in j for j in jobs), jobs
    for j in jobs:
        assert 0 <= j["final"] <= 1 and j["speedup"] >= 1 and set(j["levels"]) <= {"easy", "medium", "hard"}
        assert j["gap_shallowest_pp"] == pytest.approx(100 * (j["final"] - j["best_shallowest_exit"]))
    assert jobs[0]["final"] != jobs[1]["final"]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])["summary"]
    assert summary["pick"] == "cast_fast" and summary["shipped"]["seeds"] == 1   # the pick never is the shipped recipe
    # A rerun skips finished jobs.
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0 and len((out / "jobs.jsonl").read_text().splitlines()) == 2
