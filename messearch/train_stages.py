"""The pieces of two-stage MESS training: auxiliary exits, the per-stage forward modules, the losses,
one epoch of training, and the per-exit validation mIoU.

Stage 1 trains the backbone and the final head end to end with a light auxiliary exit at every
candidate position (discarded afterwards). Stage 2 freezes the backbone and the final head and trains
every candidate exit head at once, the frozen features computed once per batch, on cross-entropy plus a
distillation term towards the final head restricted to the pixels the final head gets right.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model import MESSNetwork, feature_shapes
from .stats import check_batch, class_counts, miou_from_counts

STAGE1, STAGE2, JOINT, PLAIN = "1", "2", "joint", "plain"


class AuxExit(nn.Module):
    """A light stage-1 exit: 1x1 conv-BN-ReLU, 1x1 classifier, bilinear upsampling to the input size."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64):
        super().__init__()
        width = min(width, in_channels)
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(self.classifier(self.body(x)), size=size, mode="bilinear", align_corners=False)


def build_aux_exits(net: MESSNetwork) -> nn.ModuleList:
    """One auxiliary exit per candidate position of `net` (stage 1 only)."""
    space = net.space
    shapes = feature_shapes(space.model, space.num_classes, space.input_size)
    return nn.ModuleList(AuxExit(shapes[p][0], space.num_classes) for p in net.positions)


class StageModule(nn.Module):
    """What one training step runs, as one module (so DDP can wrap it): returns (exit logits, final logits).

    stage '1': features with grad, the auxiliary exits and the final head. stage 'plain': the original model
    only (no exits). stage '2': frozen backbone and final head under no_grad, then every candidate head.
    stage 'joint': backbone, candidate heads and final head end to end.
    """

    def __init__(self, net: MESSNetwork, stage: str, aux: nn.ModuleList | None = None):
        super().__init__()
        self.net, self.stage, self.aux = net, stage, aux

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        size = x.shape[-2:]
        if self.stage == STAGE2:
            with torch.no_grad():
                feats, taps = self.net.forward_features(x)
                final = self.net.final(taps, size)
            return self.net.exit_logits(feats, size), final
        feats, taps = self.net.forward_features(x)
        final = self.net.final(taps, size)
        if self.stage == STAGE1:
            return [a(f, size) for a, f in zip(self.aux, feats)], final
        if self.stage == JOINT:
            return self.net.exit_logits(feats, size), final
        return [], final

    def train(self, mode: bool = True):
        """Train mode for what is trained; the frozen base of stage 2 stays in eval mode (BN statistics fixed)."""
        super().train(mode)
        if self.stage == STAGE2:
            self.net.base.eval()
        return self


def set_trainable(net: MESSNetwork, stage: str) -> None:
    """requires_grad for a stage: the base (backbone + final head) in stages 1/plain/joint, the heads in 2/joint."""
    net.base.requires_grad_(stage in (STAGE1, PLAIN, JOINT))
    net.heads.requires_grad_(stage in (STAGE2, JOINT))


def positive_mask(final_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Pixels where the final head's prediction equals the label (ignore pixels excluded), bool [B, H, W]."""
    return (final_logits.argmax(dim=1) == labels) & (labels != ignore_index)


def _teacher(final_logits: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    logp = F.log_softmax(final_logits.detach().float() / T, dim=1)
    return logp.exp(), logp


def _pfd(exit_logits, p_t, logp_t, mask, n_pos, T: float) -> torch.Tensor:
    # T^2 keeps the gradient's scale independent of T (Hinton et al.); mean over the positive pixels.
    kl = (p_t * (logp_t - F.log_softmax(exit_logits.float() / T, dim=1))).sum(dim=1)
    return (T * T) * (kl * mask).sum() / n_pos


def positive_filtering_distillation_loss(exit_logits: torch.Tensor, final_logits: torch.Tensor, labels: torch.Tensor,
                                         T: float, ignore_index: int) -> torch.Tensor:
    """T^2 * KL(softmax(final/T) || softmax(exit/T)), averaged over the pixels the final head gets right (0 if none)."""
    mask = positive_mask(final_logits, labels, ignore_index)
    p_t, logp_t = _teacher(final_logits, T)
    return _pfd(exit_logits, p_t, logp_t, mask.float(), mask.sum().clamp(min=1), T)


def _ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # A batch whose pixels are all ignored gives 0, not NaN.
    if not bool((labels != ignore_index).any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)


@dataclass
class LossWeights:
    """How a step's outputs become one loss."""

    exit_weight: float = 0.5      # stage 1 / joint: weight of each exit's CE against the final head's
    distill_weight: float = 1.0   # stage 2: weight of the positive-filtering distillation term
    temperature: float = 2.0
    ignore_index: int = 255


def stage_loss(stage: str, exits: list[torch.Tensor], final: torch.Tensor, labels: torch.Tensor, w: LossWeights) -> torch.Tensor:
    """The loss of one step. Stage 2: sum over heads of CE + distill_weight * PFD (the teacher and mask
    computed once, each head's gradient the same as if it were trained alone)."""
    if stage == STAGE2:
        loss = sum(_ce(e, labels, w.ignore_index) for e in exits)
        if w.distill_weight > 0:
            mask = positive_mask(final, labels, w.ignore_index)
            p_t, logp_t = _teacher(final, w.temperature)
            maskf, n_pos = mask.float(), mask.sum().clamp(min=1)
            loss = loss + w.distill_weight * sum(_pfd(e, p_t, logp_t, maskf, n_pos, w.temperature) for e in exits)
        return loss
    loss = _ce(final, labels, w.ignore_index)
    if exits and w.exit_weight > 0:
        loss = loss + w.exit_weight * sum(_ce(e, labels, w.ignore_index) for e in exits)
    return loss


@dataclass
class Runtime:
    """Where and how steps run: the device, bf16 autocast on CUDA, and the rank in data-parallel training."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    progress: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """bf16 autocast on CUDA; nothing on CPU (CPU results stay exactly reproducible)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def memory_format(self) -> torch.memory_format:
        """channels_last: cuDNN's bf16 tensor-core convolutions run in it, and oneDNN's CPU training steps are
        about 10% faster in it (benchmarks/README.md); training only, the cache and evaluate keep their own."""
        return torch.channels_last

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """An input batch on this runtime's device (and, for images, in its memory format)."""
        if x.dim() == 4:
            return x.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return x.to(self.device, non_blocking=True)


def epoch_seed(seed: int, stage: str, epoch: int) -> int:
    """The RNG seed of one epoch: a function of (seed, stage, epoch) only, so a resumed run draws what
    an uninterrupted one would (shuffling, augmentation, dropout)."""
    return (seed * 1_000_003 + {STAGE1: 1, PLAIN: 2, STAGE2: 3, JOINT: 4}[stage] * 10_007 + epoch) % (2**63 - 1)


def train_epoch(module: nn.Module, stage: str, loader, optimizer, scheduler, weights: LossWeights, rt: Runtime,
                desc: str, max_steps: int | None = None) -> dict:
    """One epoch over `loader`; returns the mean loss, steps, images and seconds."""
    from tqdm import tqdm

    module.train()
    total, steps, images, t0 = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not (rt.progress and rt.is_main), dynamic_ncols=True)
    for x, y in bar:
        x, y = rt.to_device(x), rt.to_device(y)
        with rt.autocast():
            exits, final = module(x)
        loss = stage_loss(stage, exits, final, y, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{desc}: the loss became {value}; lower the learning rate")
        total, steps, images = total + value, steps + 1, images + x.shape[0]
        bar.set_postfix(loss=f"{value:.3f}")
        if max_steps is not None and steps >= max_steps:
            break
    bar.close()
    seconds = time.perf_counter() - t0
    return {"loss": total / max(steps, 1), "steps": steps, "images": images, "seconds": seconds}


@torch.no_grad()
def validate_exits(net: MESSNetwork, loader, rt: Runtime, heads: bool = True, aux: nn.ModuleList | None = None,
             max_steps: int | None = None) -> dict[str, float]:
    """Validation mIoU of the final head ('final'), of every candidate exit ('position/head') when `heads`,
    and of the auxiliary exits ('aux:position') when given; counts summed over the split (messearch.stats)."""
    space = net.space
    was_training = net.training
    net.eval()
    if aux is not None:
        aux.eval()
    names = ["final"] + ([f"{p}/{h}" for p, h in net.exits] if heads else []) \
        + ([f"aux:{p}" for p in net.positions] if aux is not None else [])
    counts = {n: np.zeros((3, space.num_classes), dtype=np.int64) for n in names}
    for step, (x, y) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        x, y = rt.to_device(x), rt.to_device(y)
        size = x.shape[-2:]
        with rt.autocast():
            feats, taps = net.forward_features(x)
            outs = [net.final(taps, size)]
            if heads:
                outs += net.exit_logits(feats, size)
            if aux is not None:
                outs += [a(f, size) for a, f in zip(aux, feats)]
        check_batch(outs[0], y, space.num_classes, space.ignore_index)
        for n, logits in zip(names, outs):
            # only the class counts: validation needs no confidences (the cache computes those)
            tp, n_pred, n_gt = class_counts(logits.argmax(dim=1), y, space.num_classes, space.ignore_index)
            counts[n] += np.stack([c.sum(dim=0).cpu().numpy() for c in (tp, n_pred, n_gt)])
    net.train(was_training)
    return {n: float(miou_from_counts(c[0], c[1], c[2])) for n, c in counts.items()}


def make_scheduler(optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5% of steps (at least 1), then cosine decay to 0."""
    warm = max(1, total_steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on BN and biases. The fused implementation where
    this torch has it for the parameters' device (one kernel per step: half the step time of the default on the
    quickstart's CPU training), else the default."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)

    def groups() -> list[dict]:   # fresh dicts: the optimizer writes its defaults into the ones it is given
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    try:
        return torch.optim.AdamW(groups(), lr=lr, fused=True)
    except (RuntimeError, ValueError):   # fused AdamW on CPU needs torch >= 2.4
        return torch.optim.AdamW(groups(), lr=lr)


StepHook = Callable[[str, int, dict], None]
