"""Every command in the README is valid as written; the quick ones run."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from messearch.cli import build_parser, main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
ROOT = Path(__file__).resolve().parents[1]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _messearch_lines() -> list[str]:
    lines = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("messearch "):
                lines.append(line)
    return lines


def test_readme_opens_with_the_two_setup_commands():
    first, second = _blocks("bash")[:2]
    assert first.strip().endswith("messearch quickstart")
    assert "pytest" in second
    ci = (ROOT / ".ci" / "run").read_text()
    assert second.strip() in ci  # CI runs exactly the README's test command


@pytest.mark.parametrize("line", _messearch_lines())
def test_every_readme_command_parses(line):
    argv = shlex.split(line.replace("<ID>", "c0123456789"))[1:]
    build_parser().parse_args(argv)  # exits (SystemExit) on an unknown flag or a missing argument


def test_quick_readme_commands_run(capsys):
    info = [line for line in _messearch_lines() if line.startswith("messearch info ")]
    assert info, "the README shows no `messearch info` command"
    for line in info:
        assert main(shlex.split(line)[1:]) == 0
        assert "configurations:" in capsys.readouterr().out


def test_readme_pandas_snippet_runs_on_a_front(journey):
    root, _, _ = journey
    snippet = _blocks("python")[0]
    code = snippet.replace("results/quickstart/pareto.parquet", str(root / "run" / "pareto.parquet"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
