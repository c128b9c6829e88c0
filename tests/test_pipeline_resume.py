"""A rerun of `pipeline` into the same folder: stages whose inputs changed are redone (with every later stage that
reads them), a training from other inputs is refused in one line, an interrupted training resumes."""

import csv
import json
import shutil

import pytest
import torch

from messearch.cli import main
from messearch.errors import MessError
from messearch.export import load_exported
from messearch.files import sha256_file
from messearch.front import read_front
from messearch.pipeline import run_pipeline, train_stage
from messearch.space import space_from_text

from conftest import TINY


def _said(text: str, stage: str) -> str:
    return text.split(f"[messearch] {stage}: ")[1].splitlines()[0]


def test_a_new_checkpoint_is_cached_profiled_searched_and_exported_again(journey, tmp_path, capsys):
    root, space, _ = journey
    run = shutil.copytree(root / "run", tmp_path / "run")
    old = load_exported(run / "model.pt").meta.provenance
    payload = torch.load(run / "mess.pt", weights_only=True)
    payload["extra"]["note"] = "trained again"   # the same weights in another file: the same front and choice
    torch.save(payload, run / "mess.pt")
    capsys.readouterr()
    run_pipeline(str(space), None, run, evaluate_models=False)
    said = capsys.readouterr().out
    for stage in ("cache", "profile", "search", "export"):
        assert "skipped" not in _said(said, stage), said
    new = load_exported(run / "model.pt").meta.provenance
    assert new["config_id"] == old["config_id"]
    assert new["checkpoint_sha256"] == sha256_file(run / "mess.pt") != old["checkpoint_sha256"]
    _, meta = read_front(run / "pareto.parquet")
    assert new["cache_sha256"] == meta["cache_sha256"] and meta["checkpoint_sha256"] == new["checkpoint_sha256"]


def test_an_edited_grid_is_searched_again_on_the_same_cache(journey, tmp_path, capsys):
    root, _, first = journey
    run = shutil.copytree(root / "run", tmp_path / "run")
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY.replace("{start: 0.5, stop: 0.9, num: 5}", "{start: 0.5, stop: 0.9, num: 3}"))
    capsys.readouterr()
    run_pipeline(str(space), None, run, evaluate_models=False)
    said = capsys.readouterr().out
    for stage in ("train", "cache", "profile"):
        assert "skipped" in _said(said, stage), said
    assert "skipped" not in _said(said, "search"), said
    _, meta = read_front(run / "pareto.parquet")
    assert json.loads(meta["threshold_grid"]) == [0.5, 0.7, 0.9]
    assert json.loads((run / "run.json").read_text())["search"]["space_sha256"] != ""
    run_pipeline(str(space), None, run, evaluate_models=False)   # now current
    said = capsys.readouterr().out
    for stage in ("train", "cache", "profile", "search", "export"):
        assert "skipped" in _said(said, stage), said


@pytest.mark.parametrize("argv,edit,fragment", [
    (["--data", "synthetic:seed=1,train=16,val=12"], None,
     "data 'synthetic:seed=0,train=16,val=12' -> 'synthetic:seed=1,train=16,val=12'"),
    (["--epochs", "2"], None, "epochs of stage 1 1 -> 2; epochs of stage 2 1 -> 2"),
    ([], ("train: {", "train: {lr: 0.02, "), "space field 'train.lr' 0.01 -> 0.02"),
    ([], ("epochs_stage2: 1", "epochs_stage2: 3"), "epochs of stage 2 1 -> 3 (the space's)"),
], ids=["data", "epochs", "train-field", "space-epochs"])
def test_a_checkpoint_trained_from_other_inputs_is_refused_in_one_line(journey, tmp_path, capsys, argv, edit, fragment):
    root, space, _ = journey
    (tmp_path / "run").mkdir()
    shutil.copy(root / "run" / "mess.pt", tmp_path / "run" / "mess.pt")
    (tmp_path / "s.yaml").write_text(TINY.replace(*edit) if edit else TINY)
    capsys.readouterr()
    rc = main(["pipeline", "--space", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "run"), *argv])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert rc == 2 and len(err) == 1, err
    assert "mess.pt was trained from other inputs than this run" in err[0] and fragment in err[0], err
    assert "use another --out, or remove" in err[0] and "train_state.pt to retrain" in err[0]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["mess.pt"]   # nothing else written


def test_an_interrupted_training_resumes_from_its_last_completed_epoch(tmp_path, capsys):
    from messearch.train import train

    space = space_from_text(TINY, "tiny.yaml")
    out = tmp_path / "run"

    def interrupt(stage, epoch, row):
        raise KeyboardInterrupt   # Ctrl+C after stage 1's only epoch: train_state.pt holds it, no mess.pt

    with pytest.raises(KeyboardInterrupt):
        train(space, None, out, progress=False, on_epoch_end=interrupt)
    assert not (out / "mess.pt").exists()
    with open(out / "train_log.csv", newline="") as f:
        before = list(csv.DictReader(f))
    assert [r["stage"] for r in before] == ["1"]
    with pytest.raises(MessError, match=r"train_state.pt holds an interrupted training started from other inputs "
                                        r"than this run \(epochs of stage 1 1 -> 2; epochs of stage 2 1 -> 2\)"):
        train_stage(space, space.data, out, epochs=2)
    capsys.readouterr()
    assert train_stage(space, space.data, out) == out / "mess.pt"
    assert "resuming the interrupted training" in capsys.readouterr().out
    with open(out / "train_log.csv", newline="") as f:
        after = list(csv.DictReader(f))
    assert [r["stage"] for r in after] == ["1", "2"]
    assert after[0] == before[0]   # stage 1 was not trained again (its timing would differ)
