"""Cluster launcher configs (cluster/*.yaml) and the `ray submit` entry script (cluster/run.py).

How the configs are validated offline: Ray's own `prepare_config` then `validate_config`, exactly
what `ray up` runs before it touches a cloud. `prepare_config` merges the provider's defaults.yaml,
which it reads from the `ray.autoscaler.<provider>` package directory (a file, no boto3, no
google-api client, no network); for `type: local` it also turns the host list into Ray's internal
node type. `validate_config` then checks the merged dict against ray/autoscaler/ray-schema.json
with jsonschema (top level: no unknown keys; `provider` itself allows extra keys, so a typo there
is not caught by Ray either). The merge is shallow and keeps our keys, so a bad key in our file
reaches the schema check.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CONFIGS = sorted(CLUSTER.glob("*.yaml"))
QUICKSTART = ROOT / "messearch" / "spaces" / "quickstart.yaml"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _validate(cfg: dict) -> dict:
    """What `ray up` does to a config before launching anything; returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def _run_py():
    """cluster/run.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("messearch_cluster_run", CLUSTER / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_all_three_configs_exist():
    assert {p.name for p in CONFIGS} >= {"aws.yaml", "gcp.yaml", "local.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_rays_validator(path):
    prepared = _validate(_load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_unknown_top_level_key_fails(path):
    import jsonschema

    cfg = _load(path)
    cfg["setup_comands"] = ["echo typo"]  # a misspelt key must not be silently ignored
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        _validate(cfg)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_wrong_type_fails(path):
    import jsonschema

    cfg = _load(path)
    cfg["idle_timeout_minutes"] = "ten"
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minutes"):
        _validate(cfg)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_installs_pinned_messearch_and_matching_ray(path):
    import ray

    text = path.read_text()
    cmds = " ".join(_load(path)["setup_commands"])
    git = re.findall(r"messearch @ git\+https://\S+?@([\w.\-]+)\"", cmds)
    wheel = re.findall(r"messearch-[\w.]+-py3-none-any\.whl", cmds)
    assert git or wheel, f"{path.name}: setup_commands must install messearch at a pinned ref"
    assert not set(git) & {"main", "master", "HEAD"}, f"{path.name}: pin a tag or sha, not a branch"
    # The cluster's Ray must be the Ray that submits to it.
    assert f'"ray[default,tune]=={ray.__version__}"' in cmds
    assert "# EDIT:" in text


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_configs_have_cpu_head_and_autoscaling_gpu_workers(name):
    cfg = _validate(_load(CLUSTER / name))
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["max_workers"] == 0 and head["resources"].get("GPU", 0) == 0
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 < t["max_workers"] <= cfg["max_workers"] for t in workers)
    if name == "gcp.yaml":  # GCP does not detect resources; they must state the GPU
        assert all(t["resources"]["GPU"] >= 1 for t in workers)
        assert all(t["node_config"]["guestAccelerators"] for t in workers)


def test_local_config_has_no_node_types_and_ray_rejects_them():
    import click

    cfg = _load(CLUSTER / "local.yaml")
    assert cfg["provider"]["type"] == "local"
    assert "available_node_types" not in cfg and "head_node_type" not in cfg
    prepared = _validate(cfg)
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["max_workers"] == len(cfg["provider"]["worker_ips"])

    bad = copy.deepcopy(cfg)
    bad["available_node_types"] = {"head": {"resources": {}, "node_config": {}}}
    bad["head_node_type"] = "head"
    with pytest.raises(click.ClickException, match="available_node_types"):
        _validate(bad)


# ---- cluster/run.py: argument forwarding -------------------------------------------------------


def _toy_parser():
    """A parser shaped like messearch.cli's: one subcommand with --address, one without."""
    import argparse

    parser = argparse.ArgumentParser(prog="messearch")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("search")
    p.add_argument("--address")
    p.add_argument("files", nargs="*")
    sub.add_parser("info").add_argument("space")
    return parser


def test_forward_adds_address_only_where_accepted():
    fwd = _run_py().forward_argv
    parser = _toy_parser()
    out = fwd(["search", "a", "b"], parser)
    assert out == ["search", "--address", "auto", "a", "b"]
    assert parser.parse_args(out).address == "auto" and parser.parse_args(out).files == ["a", "b"]
    assert fwd(["info", "s.yaml"], parser) == ["info", "s.yaml"]
    # The user's own address wins, in either spelling.
    assert fwd(["search", "--address", "ray://h:10001"], parser) == ["search", "--address", "ray://h:10001"]
    assert fwd(["search", "--address=h:6379"], parser) == ["search", "--address=h:6379"]
    # Unknown subcommands and --help go through untouched, for the CLI's parser to answer.
    assert fwd(["nope", "x"], parser) == ["nope", "x"]
    assert fwd(["--help"], parser) == ["--help"]
    assert fwd([], parser) == []


def test_forward_matches_every_real_subcommand():
    from messearch import cli

    parser = cli.build_parser()
    subs = _run_py()._subparsers(parser)
    assert set(cli.COMMANDS) <= set(subs)
    for name in cli.COMMANDS:
        out = _run_py().forward_argv([name], parser)
        accepts = "--address" in subs[name]._option_string_actions
        assert (out == [name, "--address", "auto"]) if accepts else (out == [name]), name


# ---- cluster/run.py against a real Ray cluster started by `ray start` --------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A real one-CPU Ray head from `ray start --head --block`; yields its address.

    `ray stop` would stop every Ray on this machine (other test sessions' too), so the head runs
    with --block in its own process group and its own temp dir, and is stopped by its pid: on
    SIGTERM `ray start --block` shuts down the processes it started.
    """
    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="rayc")  # short: Ray's unix socket paths must stay < 108 chars
    log = open(Path(tmp) / "start.log", "w")
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
         "--include-dashboard=false", f"--temp-dir={tmp}", "--block"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + 60
        while "block forever" not in (Path(tmp) / "start.log").read_text():
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("ray start failed:\n" + (Path(tmp) / "start.log").read_text()[-3000:])
            time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own group only
            proc.wait()
        log.close()


def _run(args: list[str], address: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS=address)
    return subprocess.run(
        [sys.executable, str(CLUSTER / "run.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


def test_run_py_joins_the_cluster_and_forwards_to_the_cli(ray_head):
    from messearch import cli

    res = _run(["--help"], ray_head)
    assert res.returncode == 0, res.stderr
    port = ray_head.rsplit(":", 1)[1]
    assert re.search(rf"run\.py: connected to Ray at \S+:{port};", res.stderr), res.stderr
    for name in cli.COMMANDS:  # the CLI's own help came back: the argv reached messearch.cli.main
        assert name in res.stdout


def test_run_py_info_matches_the_cli(ray_head, capsys):
    from messearch import cli

    # --no-estimate: the search-time estimate is a measurement, different on every run
    res = _run(["info", str(QUICKSTART), "--json", "--no-estimate"], ray_head)  # same path string as below
    assert res.returncode == 0, res.stderr
    assert f":{ray_head.rsplit(':', 1)[1]};" in res.stderr
    via_cluster = json.loads(res.stdout.strip().splitlines()[-1])

    assert cli.main(["info", str(QUICKSTART), "--json", "--no-estimate"]) == 0
    direct = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert via_cluster == direct and via_cluster
