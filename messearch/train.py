"""`messearch train`: two-stage MESS training (stage 1 exit-aware backbone, stage 2 every candidate head at
once with positive-filtering distillation), the ablation baselines, checkpoints, resume and logs.

Everything is checked before any training starts (space, data, init checkpoint, resume state). Then
`run_plan` runs the stages on one device (CPU, or one GPU with bf16 autocast), or inside each Ray Train
worker when `gpus >= 1` (messearch.train_ray). Each epoch ends with a validation pass (rank 0) and an
atomic DIR/train_state.pt; the RNG of every epoch is seeded from (seed, stage, epoch), so a resumed run
gives the same weights as an uninterrupted one on CPU.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .checkpoint import save_checkpoint
from .errors import MessError
from .io import atomic_write_bytes, atomic_write_text, load_weights_only
from .model import MESSNetwork
from .space import Space, load_space, space_from_text
from .train_stages import (JOINT, PLAIN, STAGE1, STAGE2, LossWeights, Runtime, StageModule, build_aux_exits,
                           epoch_seed, evaluate, make_optimizer, make_scheduler, set_trainable, train_epoch)
from .weights import InitReport, load_init

STATE_FORMAT = "messearch/train-state-v1"
BASELINES = ("joint", "no-stage1", "no-distill")
STAGE_CHOICES = ("both", "1", "2")
STAGE_NAMES = {STAGE1: "stage 1 (exit-aware backbone)", PLAIN: "original model (final head only)",
               STAGE2: "stage 2 (all candidate heads)", JOINT: "joint (backbone + candidate heads)"}


@dataclass
class Plan:
    """A validated training run, in plain values (it travels to Ray workers)."""

    space_text: str
    space_source: str
    data_spec: str
    out_dir: str
    stages: list  # [kind, epochs, lr] per stage, in order
    weights: dict  # LossWeights fields
    init_checkpoint: str | None
    resume: bool
    baseline: str | None
    device: str = "cpu"
    progress: bool = True
    max_steps: int | None = None  # per epoch (smoke runs and benchmarks)
    fingerprint: dict = field(default_factory=dict)
    init: dict = field(default_factory=dict)  # InitReport.provenance() of init_checkpoint (mess.pt's extra.init)

    @property
    def space(self) -> Space:
        return space_from_text(self.space_text, self.space_source)


def _stages(space: Space, stage: str, baseline: str | None, init_kind: str | None, epochs: int | None) -> list:
    t = space.train
    e1 = t.epochs_stage1 if epochs is None else epochs
    e2 = t.epochs_stage2 if epochs is None else epochs
    if baseline == "joint":
        if stage != "both":
            raise MessError(f"--baseline joint trains in one stage; use --stage both, not --stage {stage}")
        return [[JOINT, e1 + e2, t.lr]]  # the same number of passes over the data as both stages together
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
    from .data import build_dataset, check_dataset

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
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MessError(f"--device {device!r}: allowed: cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MessError(f"--device {device}: CUDA is not available on this machine")
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


def read_state(path: Path, fingerprint: dict) -> dict:
    """The resume state at `path`; MessError if it is missing, unreadable or from a different run."""
    if not path.exists():
        raise MessError(f"--resume: {path} does not exist (no interrupted run to continue in {path.parent})")
    state = load_weights_only(path, "training state (--resume)")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise MessError(f"--resume: {path} is not a messearch training state")
    differ = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
    if differ:
        raise MessError(f"--resume: {path} was written by a run with other settings ({', '.join(differ)} differ); "
                        f"use the same arguments, or start afresh without --resume")
    return state


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loaders(space: Space, data_spec: str, rt: Runtime, num_workers: int):
    from .data import build_dataset

    t = space.train
    train_ds = build_dataset(data_spec, "train", space.input_size, train=True, ignore_index=space.ignore_index,
                             num_classes=space.num_classes)
    val_ds = build_dataset(data_spec, "val", space.input_size, train=False, ignore_index=space.ignore_index,
                           num_classes=space.num_classes)
    if t.train_images:
        train_ds = Subset(train_ds, range(min(t.train_images, len(train_ds))))
    if t.val_images:
        val_ds = Subset(val_ds, range(min(t.val_images, len(val_ds))))
    # The global batch is split across data-parallel workers; drop_last keeps BN away from 1-image batches.
    batch = max(2, t.batch_size // rt.world_size)
    generator = torch.Generator()
    sampler = None
    if rt.world_size > 1:
        sampler = DistributedSampler(train_ds, num_replicas=rt.world_size, rank=rt.rank, shuffle=True,
                                     seed=t.seed, drop_last=True)
    train_loader = DataLoader(train_ds, batch_size=batch, shuffle=sampler is None, sampler=sampler, drop_last=True,
                              num_workers=num_workers, generator=generator, pin_memory=rt.device.type == "cuda")
    val_loader = DataLoader(val_ds, batch_size=batch, shuffle=False, num_workers=num_workers)
    return train_loader, val_loader, generator, sampler


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: the CSV has everything
        return None
    return SummaryWriter(str(out / "tensorboard"))


def run_plan(plan: Plan, rt: Runtime, wrap_model=lambda m: m, wrap_loader=lambda l: l, on_epoch_end=None) -> Path:
    """Run every stage of `plan` (in this process, or in one Ray Train worker); rank 0 writes the files."""
    space, out = plan.space, Path(plan.out_dir)
    t, w = space.train, LossWeights(**plan.weights)
    torch.manual_seed(t.seed)  # the same initial weights in every run and worker
    net = MESSNetwork(space)
    if plan.init_checkpoint:
        load_init(net, plan.init_checkpoint)
    net.to(rt.device)
    train_loader, val_loader, generator, sampler = _loaders(space, plan.data_spec, rt, t.num_workers)
    train_loader, val_loader = wrap_loader(train_loader), wrap_loader(val_loader)
    state = read_state(out / "train_state.pt", plan.fingerprint) if plan.resume else None
    rows, seconds = (list(state["log"]), dict(state["seconds"])) if state else ([], {})
    if state:
        net.load_state_dict(state["net"])
    columns = ["stage", "epoch", "loss", "lr", "steps", "images", "seconds", "images_per_s", "miou:final"] \
        + [f"miou:{p}/{h}" for p, h in net.exits] + [f"miou:aux:{p}" for p in net.positions]
    writer = _tensorboard(out) if rt.is_main else None
    miou: dict[str, float] = dict(state["miou"]) if state else {}
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
    for i, (kind, epochs, lr) in enumerate(plan.stages):
        done = 0
        if state is not None:
            if i < state["stage_index"] or (i == state["stage_index"] and state["epoch"] >= epochs):
                continue
            done = state["epoch"] if i == state["stage_index"] else 0
        set_trainable(net, kind)
        torch.manual_seed(epoch_seed(t.seed, kind, -1))
        aux = build_aux_exits(net).to(rt.device) if kind == STAGE1 else None
        module = StageModule(net, kind, aux)
        wrapped = wrap_model(module)
        steps = len(train_loader) if plan.max_steps is None else min(len(train_loader), plan.max_steps)
        optimizer = make_optimizer(module, lr, t.weight_decay)
        scheduler = make_scheduler(optimizer, steps * epochs)
        if state is not None and done:
            if aux is not None:
                aux.load_state_dict(state["aux"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        for epoch in range(done, epochs):
            s = epoch_seed(t.seed, kind, epoch)
            torch.manual_seed(s)  # augmentation and dropout
            generator.manual_seed(s)  # shuffling
            if sampler is not None:
                sampler.set_epoch(s)
            lr_now = optimizer.param_groups[0]["lr"]
            stats = train_epoch(wrapped, kind, train_loader, optimizer, scheduler, w, rt,
                                f"{STAGE_NAMES[kind].split(' (')[0]} epoch {epoch + 1}/{epochs}", plan.max_steps)
            seconds[kind] = seconds.get(kind, 0.0) + stats["seconds"]
            row = {"stage": kind, "epoch": epoch + 1, "lr": lr_now, **stats,
                   "images_per_s": stats["images"] * rt.world_size / max(stats["seconds"], 1e-9)}
            if rt.is_main:
                miou = evaluate(net, val_loader, rt, heads=kind in (STAGE2, JOINT), aux=aux, max_steps=plan.max_steps)
                row.update({f"miou:{k}": v for k, v in miou.items()})
                rows.append(row)
                atomic_write_text(out / "train_log.csv", _csv_text(rows, columns))
                if writer is not None:
                    step = len(rows)
                    for k, v in row.items():
                        if k.startswith("miou:") or k in ("loss", "lr", "images_per_s"):
                            writer.add_scalar(k.replace(":", "/"), v, step)
                atomic_write_bytes(out / "train_state.pt", _bytes({
                    "format": STATE_FORMAT, "fingerprint": plan.fingerprint, "stage_index": i, "epoch": epoch + 1,
                    "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                    "aux": None if aux is None else {k: v.detach().cpu() for k, v in aux.state_dict().items()},
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "log": rows, "seconds": seconds, "miou": miou}))
            if on_epoch_end is not None:
                on_epoch_end(kind, epoch + 1, row)
    path = out / "mess.pt"
    if rt.is_main:
        if writer is not None:
            writer.close()
        heads_trained = any(k in (STAGE2, JOINT) for k, _, _ in plan.stages)
        exit_miou = {k: v for k, v in miou.items() if not k.startswith("aux:") and (heads_trained or k == "final")}
        last = {r["stage"]: r for r in rows}
        save_checkpoint(path, net.cpu(), plan.data_spec, exit_miou, extra={
            "stages": [k for k, _, _ in plan.stages], "epochs": [e for _, e, _ in plan.stages],
            "baseline": plan.baseline or "", "heads_trained": heads_trained, "seconds": seconds,
            "images_per_s": {k: float(r["images_per_s"]) for k, r in last.items()},
            "loss": {k: float(r["loss"]) for k, r in last.items()}, "device": plan.device,
            "world_size": rt.world_size, "init_checkpoint": plan.init_checkpoint or "", "init": plan.init})
    return path


def train(space, data_spec: str | None, out_dir, stage: str = "both", epochs: int | None = None,
          init_checkpoint: str | None = None, resume: bool = False, device: str = "cpu", gpus: int = 0,
          address: str | None = None, baseline: str | None = None, progress: bool = True,
          max_steps: int | None = None, on_epoch_end=None) -> Path:
    """Train a space's MESS network (stage 1, 2 or both, or an ablation baseline); returns DIR/mess.pt.

    gpus >= 1 trains data-parallel with Ray Train (one worker per GPU; CPU slots when no GPU exists)."""
    if gpus < 0:
        raise MessError(f"--gpus {gpus}: must be >= 0")
    plan = make_plan(space, out_dir, data_spec, stage, epochs, init_checkpoint, resume, device, baseline, progress,
                     max_steps)
    if gpus >= 1:
        from .train_ray import run_ray

        return run_ray(plan, gpus, address)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
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
