"""Spaces inside the package: built-in names everywhere a space is taken, `messearch spaces`, and a real wheel
that ships them, installed into a fresh folder and run from outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from messearch.cli import main
from messearch.errors import SpaceError
from messearch.config import count_configs
from messearch.space import builtin_spaces, load_space

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (ROOT / "messearch" / "spaces").glob("*.yaml"))


def test_builtin_names_load_the_shipped_files():
    assert builtin_spaces() == SHIPPED and "quickstart" in SHIPPED
    for name in SHIPPED:
        by_name, by_path = load_space(name), load_space(ROOT / "messearch" / "spaces" / f"{name}.yaml")
        assert by_name.text == by_path.text and by_name.name == by_path.name == name
        assert by_name.source == f"messearch/spaces/{name}.yaml"


def test_unknown_name_and_missing_path_are_clear_errors(tmp_path):
    with pytest.raises(SpaceError, match="neither a space file nor a built-in space.*quickstart"):
        load_space("quickstar")
    with pytest.raises(SpaceError, match="not found"):
        load_space(str(tmp_path / "quickstart.yaml"))  # a path is never taken for a name


def test_cli_spaces_lists_every_builtin(capsys):
    assert main(["spaces", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == SHIPPED
    for r in rows:
        s = load_space(r["name"])
        assert (r["model"], r["input_size"], r["num_classes"]) == (s.model, list(s.input_size), s.num_classes)
        assert r["n_configs"] == count_configs(len(s.positions), len(s.heads), len(s.thresholds), s.max_exits,
                                               "shared", s.mode)
    assert main(["spaces"]) == 0
    out = capsys.readouterr().out
    assert "quickstart" in out and "17,881" in out
    assert main(["info", "nope_space"]) == 2
    assert "built-in spaces:" in capsys.readouterr().err


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source (so no build/ or egg-info lands in the repository)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "messearch", src / "messearch", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    # offline and fast: the venv's setuptools, no dependencies
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, env=_clean_env(), cwd=src)
    (whl,) = out.glob("messearch-*.whl")
    return whl


def test_wheel_contains_the_spaces(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n[len("messearch/spaces/"):-5] for n in names if n.startswith("messearch/spaces/") and n.endswith(".yaml"))
    assert shipped == SHIPPED
    assert not any(n.startswith("search_spaces/") for n in names)


def test_installed_wheel_runs_info_quickstart_outside_the_repository(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                    str(target), str(wheel)], check=True, env=_clean_env())
    work = tmp_path / "elsewhere"   # no messearch/ and no spaces here: only the installed package can answer
    work.mkdir()
    env = _clean_env(PYTHONPATH=str(target))   # the other dependencies come from this venv's site-packages
    where = subprocess.run([sys.executable, "-c", "import messearch; print(messearch.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(target)
    script = target / "bin" / "messearch"   # the console script pip wrote for the wheel's entry point
    out = subprocess.run([sys.executable, str(script), "info", "quickstart", "--json"], cwd=work, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    s = load_space("quickstart")
    assert info["name"] == "quickstart" and info["n_configs"] == count_configs(
        len(s.positions), len(s.heads), len(s.thresholds), s.max_exits, "shared", s.mode)
