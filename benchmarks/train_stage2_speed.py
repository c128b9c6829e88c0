"""Cost of one stage-2 step (frozen backbone once + every candidate head, one optimizer step) against one
plain training step of the original model on the same batch, and against training the heads one at a
time (a frozen forward per head). Prints one JSON line.

    python benchmarks/train_stage2_speed.py [--space messearch/spaces/quickstart.yaml] [--device cpu|cuda] [--batch N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from messearch.data import build_dataset
from messearch.model import MESSNetwork
from messearch.space import load_space
from messearch.train_stages import (PLAIN, STAGE2, LossWeights, Runtime, StageModule, make_optimizer, set_trainable,
                                    stage_loss)

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int) -> float:
    """Median seconds of `reps` calls after one warm-up call."""
    fn()
    out = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=str(ROOT / "messearch" / "spaces" / "quickstart.yaml"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: the space's train.batch_size")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    space = load_space(args.space)
    device = torch.device(args.device)
    rt = Runtime(device=device, progress=False)
    batch = args.batch or space.train.batch_size
    ds = build_dataset("synthetic", "train", space.input_size, train=True, num_classes=space.num_classes)
    torch.manual_seed(0)
    x = torch.stack([ds[i][0] for i in range(batch)]).to(device)
    y = torch.stack([ds[i][1] for i in range(batch)]).to(device)
    y[y == 255] = space.ignore_index
    net = MESSNetwork(space).to(device)
    w = LossWeights(ignore_index=space.ignore_index, temperature=space.train.temperature,
                    distill_weight=space.train.distill_weight)

    def stepper(kind, module, loss_fn):
        opt = make_optimizer(module, 1e-4, 0.0)

        def step():
            with rt.autocast():
                out = module(x)
            loss = loss_fn(out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    # The original model: one ordinary training step of the torchvision model (backbone + final head).
    set_trainable(net, PLAIN)
    plain = StageModule(net, PLAIN).train()
    t_plain = timed(stepper(PLAIN, plain, lambda o: stage_loss(PLAIN, o[0], o[1], y, w)), device, args.reps)

    # Stage 2: every candidate head in one pass over one frozen forward.
    set_trainable(net, STAGE2)
    s2 = StageModule(net, STAGE2).train()
    t_s2 = timed(stepper(STAGE2, s2, lambda o: stage_loss(STAGE2, o[0], o[1], y, w)), device, args.reps)

    def frozen():
        with torch.no_grad(), rt.autocast():
            feats, taps = net.forward_features(x)
            net.final(taps, x.shape[-2:])
    t_frozen = timed(frozen, device, args.reps)

    # One head at a time: each head's training step pays its own frozen forward.
    size = x.shape[-2:]
    opt = make_optimizer(net.heads, 1e-4, 0.0)

    def one_head(i: int):
        def step():
            with torch.no_grad(), rt.autocast():
                feats, taps = net.forward_features(x)
                final = net.final(taps, size)
            with rt.autocast():
                logits = net.exit_logits(feats, size, [i])
            loss = stage_loss(STAGE2, logits, final, y, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step
    per_head = [timed(one_head(i), device, 1) for i in range(len(net.exits))]
    t_one = sum(per_head)
    print(json.dumps({
        "benchmark": "train_stage2_speed", "space": space.name, "model": space.model, "device": str(device),
        "batch": batch, "input_size": list(space.input_size), "candidate_heads": len(net.exits),
        "plain_step_s": round(t_plain, 4), "stage2_step_s": round(t_s2, 4), "frozen_forward_s": round(t_frozen, 4),
        "heads_one_at_a_time_s": round(t_one, 4),
        "stage2_vs_plain_step": round(t_s2 / t_plain, 3),
        "one_at_a_time_vs_stage2": round(t_one / t_s2, 3),
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
