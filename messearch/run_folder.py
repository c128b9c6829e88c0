"""A pipeline run folder: which outputs still fit this run's inputs, and `run.json`, the record of the inputs each
stage was made from.

Rule (README, `pipeline --help`): a stage is skipped only when its output is complete and was made from exactly
this run's inputs; a stage whose inputs changed is redone, and so is every later stage that reads its output.
The one exception is training: a `mess.pt` (or an interrupted `train_state.pt`) trained from other inputs is never
silently retrained or reused; the run is refused with one line naming what changed and how to proceed.
"""

from __future__ import annotations

import json
from dataclasses import fields, is_dataclass
from pathlib import Path

from .errors import MessError
from .export import predicted
from .files import atomic_write_text, load_weights_only
from .space import Space, space_from_text
from .train_stages import STAGE2

RECORD = "run.json"
# Space fields the trained network and its cache do not depend on: the search's grid (searched again when they
# change), the name, the default data (the run's data is compared instead) and the epochs (compared per stage).
_NOT_TRAINING = {"source", "text", "name", "data", "thresholds", "max_exits", "mode",
                 "train.epochs_stage1", "train.epochs_stage2"}


def _differences(old, new, prefix: str = "") -> list[str]:
    out = []
    for f in fields(old):
        name = prefix + f.name
        if name in _NOT_TRAINING:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if is_dataclass(a) and is_dataclass(b):
            out += _differences(a, b, name + ".")
        elif a != b:
            out.append(f"space field '{name}' {_short(a)} -> {_short(b)}")
    return out


def _short(v) -> str:
    text = repr(list(v) if isinstance(v, tuple) else v)
    return text if len(text) <= 60 else text[:57] + "..."


def training_changes(space_text: str, data: str, stage_epochs, space: Space, run_data: str,
                     epochs: int | None, where: str) -> list[str]:
    """What differs between a training's recorded inputs (its space text, data and [stage, epochs] pairs) and this
    run's; empty when the trained network is what this run would train."""
    trained = space_from_text(space_text, f"{where} (its space)")
    changes = _differences(trained, space)
    if data != run_data:
        changes.append(f"data {data!r} -> {run_data!r}")
    t = space.train
    for stage, had in stage_epochs:
        want = epochs if epochs is not None else (t.epochs_stage2 if stage == STAGE2 else t.epochs_stage1)
        if int(had) != int(want):
            changes.append(f"epochs of stage {stage} {had} -> {want}" + ("" if epochs is not None else " (the space's)"))
    return changes


def check_trained(ckpt: Path, payload: dict, space: Space, data: str, epochs: int | None) -> None:
    """MessError (one line) when the run folder's mess.pt was trained from other inputs than this run asks."""
    extra = payload.get("extra", {})
    changes = training_changes(payload["space_text"], payload.get("data", ""),
                               zip(extra.get("stages", []), extra.get("epochs", [])), space, data, epochs, str(ckpt))
    if changes:
        state = ckpt.with_name("train_state.pt")
        raise MessError(f"{ckpt} was trained from other inputs than this run ({'; '.join(changes)}); rerun with the "
                        f"inputs it was trained with, use another --out, or remove {ckpt} and {state} to retrain")


def interrupted_training(state: Path, space: Space, data: str, epochs: int | None,
                         init_checkpoint: str | None = None) -> Space:
    """The space to resume the interrupted training in `state` with (its own text: the same training fields, so its
    resume fingerprint matches); MessError (one line) when it was started from other inputs than this run's."""
    payload = load_weights_only(state, "training state")
    fp = payload.get("fingerprint") if isinstance(payload, dict) else None
    if not isinstance(fp, dict) or "space_text" not in fp:
        raise MessError(f"{state}: not a messearch training state; remove it to train afresh")
    changes = training_changes(fp["space_text"], fp.get("data", ""), [(s, e) for s, e, _ in fp.get("stages", [])],
                               space, data, epochs, str(state))
    init = str(Path(init_checkpoint).resolve()) if init_checkpoint else ""
    if fp.get("init_checkpoint", "") != init:
        changes.append(f"init checkpoint {fp.get('init_checkpoint') or None!r} -> {init or None!r}")
    if changes:
        raise MessError(f"{state} holds an interrupted training started from other inputs than this run "
                        f"({'; '.join(changes)}); rerun with those inputs to resume it, use another --out, or remove "
                        f"{state} to train afresh")
    return space_from_text(fp["space_text"], space.source)


def read_record(out: Path) -> dict:
    """run.json: {stage: inputs} of the stages this folder's outputs were made by ({} when absent or unreadable)."""
    try:
        record = json.loads((Path(out) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_record(out: Path, stage: str, inputs: dict) -> None:
    """Record (atomically) the inputs `stage`'s output in `out` was just made from."""
    record = read_record(out)
    record[stage] = inputs
    atomic_write_text(Path(out) / RECORD, json.dumps(record, indent=1, sort_keys=True) + "\n")


def model_is_current(provenance: dict, chosen, ckpt_sha: str, cache_sha: str) -> bool:
    """True when an exported model holds the chosen row, exported from this checkpoint and cache, and predicts what
    the row says (the front it came from may have been searched again, e.g. with other latencies)."""
    return ((provenance.get("config_id"), provenance.get("checkpoint_sha256"), provenance.get("cache_sha256"))
            == (chosen["config_id"], ckpt_sha, cache_sha) and provenance.get("predicted") == predicted(chosen))
