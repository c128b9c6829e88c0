"""`messearch train`: two-stage MESS training (stage 1 exit-aware backbone, stage 2 every candidate head at
once with positive-filtering distillation), the ablation baselines, checkpoints, resume and logs.

Everything is checked before any training starts (space, data, init checkpoint, resume state). Then
`train_loop.run_plan` runs the stages on one device (CPU, or one GPU with bf16 autocast), or inside each
Ray Train worker when `gpus >= 1` (messearch.train_ray). Each epoch ends with a validation pass (rank 0) and an
atomic DIR/train_state.pt; the RNG of every epoch is seeded from (seed, stage, epoch), so a resumed run
gives the same weights as an uninterrupted one on CPU.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from .data import build_dataset, check_dataset
from .devices import parse_device
from .errors import MessError
from .model import MESSNetwork
from .space import Space, load_space
from .train_loop import STAGE_NAMES, Plan, read_state, run_plan
from .train_ray import run_ray
from .train_stages import JOINT, PLAIN, STAGE1, STAGE2, LossWeights, Runtime
from .weights import InitReport, load_init

BASELINES = ("joint", "no-stage1", "no-distill")
STAGE_CHOICES = ("both", "1", "2")


def _stages(space: Space, stage: str, baseline: str | None, init_kind: str | None, epochs: int | None) -> list:
    t = space.train
    e1 = t.epochs_stage1 if epochs is None else epochs
    e2 = t.epochs_stage2 if epochs is None else epochs
    if baseline == "joint":
        if stage != "both":
            raise MessError(f"--baseline joint trains in one stage; use --stage both, not --stage {stage}")
        return [[JOINT, e1, t.lr]]  # the backbone's budget of stage 1: the ablation compares equal backbone epochs
    first = PLAIN if baseline == "no-stage1" else STAGE1
    if baseline == "no-stage1" and init_kind == "original":
        first = None  # the original model's weights are given: nothing to train before stage 2
    plan = []
    if stage in ("both", "1") and first is not None:
        plan.append([first, e1, t.lr])
    if stage in ("both", "2"):
        plan.append([STAGE2, e2, t.lr_stage2])
    if not plan:
        raise MessError("--stage 1 --baseline no-stage1 with the original model's weights has nothing to train")
    return plan


def _check_data(space: Space, spec: str) -> None:
    for split in ("train", "val"):
        check_dataset(spec, split, space.num_classes)
        ds = build_dataset(spec, split, space.input_size, ignore_index=space.ignore_index, num_classes=space.num_classes)
        if ds.num_classes != space.num_classes:
            raise MessError(f"data {spec!r} has {ds.num_classes} classes but the space {space.source} has "
                            f"num_classes={space.num_classes}")
        n = len(ds) if split == "val" or not space.train.train_images else min(len(ds), space.train.train_images)
        if split == "train" and n < space.train.batch_size:
            raise MessError(f"data {spec!r}: {n} training images, fewer than train.batch_size={space.train.batch_size}")


def make_plan(space, out_dir, data_spec: str | None = None, stage: str = "both", epochs: int | None = None,
              init_checkpoint: str | None = None, resume: bool = False, device: str = "cpu",
              baseline: str | None = None, progress: bool = True, max_steps: int | None = None) -> Plan:
    """Validate every input of a training run (before any training) and return its Plan."""
    space = space if isinstance(space, Space) else load_space(space)
    data_spec = data_spec or space.data
    out = Path(out_dir).resolve()
    if stage not in STAGE_CHOICES:
        raise MessError(f"--stage {stage!r}: allowed: {', '.join(STAGE_CHOICES)}")
    if baseline is not None and baseline not in BASELINES:
        raise MessError(f"--baseline {baseline!r}: allowed: {', '.join(BASELINES)}")
    if epochs is not None and epochs < 1:
        raise MessError(f"--epochs {epochs}: must be >= 1")
    if max_steps is not None and max_steps < 1:   # 0 steps would still train one and validate none (mIoU 0)
        raise MessError(f"--max-steps {max_steps}: allowed an integer >= 1")
    parse_device(device)
    init = None
    if init_checkpoint is None and stage == "2" and baseline != "no-stage1":
        if not (out / "mess.pt").exists():
            raise MessError(f"--stage 2 needs a stage-1 checkpoint: pass --init-checkpoint PATH/mess.pt or run "
                            f"--stage 1 into {out} first ({out / 'mess.pt'} does not exist)")
        init_checkpoint = str(out / "mess.pt")
    if init_checkpoint is not None:
        init_checkpoint = str(Path(init_checkpoint).resolve())
        init = load_init(MESSNetwork(space), init_checkpoint)  # raises on anything that does not fit
        if progress:
            print(init.summary(), flush=True)
    # "original": the whole torchvision model (backbone and final head) came from the file.
    init_kind = None if init is None else "mess" if init.kind == "mess" else "original" if init.complete else "partial"
    if stage == "2" and init_kind != "mess" and baseline != "no-stage1":
        raise MessError(f"--stage 2 needs a stage-1 checkpoint (a mess.pt); {init_checkpoint} is a {init.kind} "
                        f"state dict: use --baseline no-stage1 to train heads on the original model, or --stage both")
    if stage == "2" and baseline == "no-stage1" and init_kind != "original":
        if init_kind is None:
            raise MessError("--stage 2 --baseline no-stage1 needs the original model's weights: --init-checkpoint PATH")
        raise MessError(f"--stage 2 --baseline no-stage1 trains heads on the original model, but {init_checkpoint} "
                        f"leaves {len(init.fresh)} of its tensors newly initialised; train it first (--stage both)")
    _check_data(space, data_spec)
    t = space.train
    plan = Plan(space_text=space.text, space_source=space.source, data_spec=data_spec, out_dir=str(out),
                stages=_stages(space, stage, baseline, init_kind, epochs),
                weights=asdict(LossWeights(exit_weight=t.exit_loss_weight,
                                           distill_weight=0.0 if baseline == "no-distill" else t.distill_weight,
                                           temperature=t.temperature, ignore_index=space.ignore_index)),
                init_checkpoint=init_checkpoint, resume=resume, baseline=baseline, device=device,
                progress=progress, max_steps=max_steps, init=init.provenance() if init else {})
    plan.fingerprint = {"space_text": space.text, "data": data_spec, "stages": plan.stages, "weights": plan.weights,
                        "init_checkpoint": init_checkpoint or "", "max_steps": max_steps or 0}
    if resume:
        read_state(out / "train_state.pt", plan.fingerprint)
    return plan


def train(space, data_spec: str | None, out_dir, stage: str = "both", epochs: int | None = None,
          init_checkpoint: str | None = None, resume: bool = False, device: str = "cpu", gpus: int = 0,
          address: str | None = None, baseline: str | None = None, progress: bool = True,
          max_steps: int | None = None, on_epoch_end=None) -> Path:
    """Train a space's MESS network (stage 1, 2 or both, or an ablation baseline); returns DIR/mess.pt.
    on_epoch_end(kind, epoch, row) is called after each epoch; returning True ends that stage early.

    gpus >= 1 trains data-parallel with Ray Train (one worker per GPU; CPU slots when no GPU exists)."""
    if gpus < 0:
        raise MessError(f"--gpus {gpus}: must be >= 0")
    plan = make_plan(space, out_dir, data_spec, stage, epochs, init_checkpoint, resume, device, baseline, progress,
                     max_steps)
    if gpus >= 1:
        return run_ray(plan, gpus, address)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False   # fast, not exact
    return run_plan(plan, Runtime(device=dev, progress=progress), on_epoch_end=on_epoch_end)


def format_summary(payload: dict) -> str:
    """One screen: per-exit validation mIoU as a positions x heads table, the final head, time and throughput."""
    miou, extra = payload.get("exit_miou", {}), payload.get("extra", {})
    exits = [tuple(e) for e in payload.get("exits", [])]
    heads = list(dict.fromkeys(h for _, h in exits))
    positions = list(dict.fromkeys(p for p, _ in exits))
    lines = [f"trained: {', '.join(STAGE_NAMES[s] for s in extra.get('stages', []))}"
             + (f"  [baseline {extra['baseline']}]" if extra.get("baseline") else "")]
    for s, sec in extra.get("seconds", {}).items():
        lines.append(f"  {STAGE_NAMES[s]}: {sec:.1f} s, {extra.get('images_per_s', {}).get(s, 0):.1f} images/s, "
                     f"last loss {extra.get('loss', {}).get(s, float('nan')):.4f}")
    lines.append(f"validation mIoU (data {payload.get('data')}):")
    if extra.get("heads_trained"):
        width = max(len(p) for p in positions) if positions else 8
        lines.append("  " + "position".ljust(width) + "".join(f"{h:>10}" for h in heads))
        for p in positions:
            lines.append("  " + p.ljust(width) + "".join(
                f"{miou.get(f'{p}/{h}', float('nan')):>10.4f}" for h in heads))
    else:
        lines.append("  (candidate heads not trained yet: run --stage 2)")
    lines.append(f"  final head: {miou.get('final', float('nan')):.4f}")
    if extra.get("init"):
        lines.append(InitReport(**extra["init"]).summary())
    return "\n".join(lines)
