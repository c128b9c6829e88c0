"""The training plan (a validated run, in plain values that travel to Ray workers) and the loop that runs it:
every stage's epochs, a validation pass, the resume state, the CSV/TensorBoard log and the checkpoint.

`run_plan` is the same code in one process and inside each Ray Train worker (messearch.train_ray).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .checkpoint import save_checkpoint
from .data import build_dataset
from .errors import MessError
from .files import atomic_write_text, atomic_write_with, load_weights_only
from .model import MESSNetwork
from .space import Space, space_from_text
from .train_stages import (JOINT, PLAIN, STAGE1, STAGE2, LossWeights, Runtime, StageModule, build_aux_exits,
                           epoch_seed, make_optimizer, make_scheduler, set_trainable, train_epoch, validate_exits)
from .weights import load_init

STATE_FORMAT = "messearch/train-state-v1"
VAL_BATCH = 16   # the smallest validation batch (the training batch when larger)
STAGE_NAMES = {STAGE1: "stage 1 (exit-aware backbone)", PLAIN: "original model (final head only)",
               STAGE2: "stage 2 (all candidate heads)", JOINT: "joint (backbone + candidate heads)"}


@dataclass
class Plan:
    """A validated training run, in plain values (it travels to Ray workers)."""

    space_text: str
    space_source: str
    data_spec: str
    out_dir: str
    stages: list  # [stage, epochs, lr] per stage, in order
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


def _loaders(space: Space, data_spec: str, rt: Runtime, num_workers: int):
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
    # validation keeps no activations for a backward pass: larger batches cost little memory and run faster
    val_loader = DataLoader(val_ds, batch_size=max(batch, VAL_BATCH), shuffle=False, num_workers=num_workers)
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


def heads_due(stage: str, epoch: int, epochs: int, every: int) -> bool:
    """Whether the candidate heads are validated after this epoch (1-based): in stages that train them, after every
    `every`-th epoch and always after the last (every 0: the last only)."""
    if stage not in (STAGE2, JOINT):
        return False
    return epoch == epochs or (every > 0 and epoch % every == 0)


def _validate(net, val_loader, rt: Runtime, stage: str, heads: bool, aux, max_steps, last: dict) -> dict:
    # Stage 2 between its head validations has nothing new to measure (the final head is frozen): its figures stay.
    if stage == STAGE2 and not heads:
        return {"final": last["final"]} if "final" in last else {}
    return validate_exits(net, val_loader, rt, heads=heads, aux=aux, max_steps=max_steps)


def run_plan(plan: Plan, rt: Runtime, wrap_model=lambda m: m, wrap_loader=lambda l: l, on_epoch_end=None) -> Path:
    """Run every stage of `plan` (in this process, or in one Ray Train worker); rank 0 writes the files.
    on_epoch_end(kind, epoch, row) returning True ends that stage after this epoch (a caller's time budget)."""
    space, out = plan.space, Path(plan.out_dir)
    t, w = space.train, LossWeights(**plan.weights)
    torch.manual_seed(t.seed)  # the same initial weights in every run and worker
    net = MESSNetwork(space)
    if plan.init_checkpoint:
        load_init(net, plan.init_checkpoint)
    net.to(rt.device, memory_format=rt.memory_format)
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
    for i, (stage, epochs, lr) in enumerate(plan.stages):
        done = 0
        if state is not None:
            if i < state["stage_index"] or (i == state["stage_index"] and state["epoch"] >= epochs):
                continue
            done = state["epoch"] if i == state["stage_index"] else 0
        set_trainable(net, stage)
        torch.manual_seed(epoch_seed(t.seed, stage, -1))
        aux = build_aux_exits(net).to(rt.device, memory_format=rt.memory_format) if stage == STAGE1 else None
        module = StageModule(net, stage, aux)
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
            s = epoch_seed(t.seed, stage, epoch)
            torch.manual_seed(s)  # augmentation and dropout
            generator.manual_seed(s)  # shuffling
            if sampler is not None:
                sampler.set_epoch(s)
            lr_now = optimizer.param_groups[0]["lr"]
            stats = train_epoch(wrapped, stage, train_loader, optimizer, scheduler, w, rt,
                                f"{STAGE_NAMES[stage].split(' (')[0]} epoch {epoch + 1}/{epochs}", plan.max_steps)
            seconds[stage] = seconds.get(stage, 0.0) + stats["seconds"]
            row = {"stage": stage, "epoch": epoch + 1, "lr": lr_now, **stats,
                   "images_per_s": stats["images"] * rt.world_size / max(stats["seconds"], 1e-9)}
            heads_now = heads_due(stage, epoch + 1, epochs, t.head_val_every)
            if rt.is_main:
                miou = _validate(net, val_loader, rt, stage, heads_now, aux, plan.max_steps, miou)
                row.update({f"miou:{k}": v for k, v in miou.items()})
                rows.append(row)
                atomic_write_text(out / "train_log.csv", _csv_text(rows, columns))
                if writer is not None:
                    step = len(rows)
                    for k, v in row.items():
                        if k.startswith("miou:") or k in ("loss", "lr", "images_per_s"):
                            writer.add_scalar(k.replace(":", "/"), v, step)
                state_now = {
                    "format": STATE_FORMAT, "fingerprint": plan.fingerprint, "stage_index": i, "epoch": epoch + 1,
                    "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                    "aux": None if aux is None else {k: v.detach().cpu() for k, v in aux.state_dict().items()},
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "log": rows, "seconds": seconds, "miou": miou}
                # straight to disk: no in-memory copy of the weights and optimizer moments
                atomic_write_with(out / "train_state.pt", lambda f: torch.save(state_now, f))
            if on_epoch_end is not None and on_epoch_end(stage, epoch + 1, row):
                if rt.is_main and stage in (STAGE2, JOINT) and not heads_now:   # its heads need their figures
                    miou = _validate(net, val_loader, rt, stage, True, aux, plan.max_steps, miou)
                    row.update({f"miou:{k}": v for k, v in miou.items()})
                    atomic_write_text(out / "train_log.csv", _csv_text(rows, columns))
                break   # the caller's time is spent: end this stage here (train_state.pt says where)
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
