"""Cost of one stage-2 step (frozen backbone once + every candidate head, one optimizer step) against one
plain training step of the original model on the same batch, and against training the heads one at a
time (a frozen forward per head). Prints one JSON line.

    python benchmarks/train_stage2_speed.py [--space messearch/spaces/quickstart.yaml] [--device cpu|cuda] [--batch N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from messearch.data import build_dataset
from messearch.model import MESSNetwork
from messearch.space import load_space
from messearch.train_stages import (PLAIN, STAGE1, STAGE2, LossWeights, Runtime, StageModule, build_aux_exits,
                                    make_optimizer, set_trainable, stage_loss)

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


def step_times(net: MESSNetwork, space, x: torch.Tensor, y: torch.Tensor, rt: Runtime, reps: int = 3,
               stage1: bool = False) -> dict:
    """Seconds of one training step on the batch (x, y): plain (the original model), stage 2 (every candidate
    head over one frozen forward), the frozen forward alone, every head trained one at a time (the sum of one step
    per head, each paying its own frozen forward) and, with stage1, a stage-1 step (backbone + auxiliary exits).
    Leaves `net`'s weights changed (optimizer steps); pass a throwaway network."""
    w = LossWeights(ignore_index=space.ignore_index, temperature=space.train.temperature,
                    distill_weight=space.train.distill_weight)
    device = rt.device
    x = rt.to_device(x)
    y = rt.to_device(y)

    def stepper(kind, module):
        opt = make_optimizer(module, 1e-4, 0.0)

        def step():
            with rt.autocast():
                out = module(x)
            loss = stage_loss(kind, out[0], out[1], y, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    out = {}
    # The original model: one ordinary training step of the torchvision model (backbone + final head).
    set_trainable(net, PLAIN)
    out["plain_step_s"] = timed(stepper(PLAIN, StageModule(net, PLAIN).train()), device, reps)
    if stage1:
        aux = build_aux_exits(net).to(device, memory_format=rt.memory_format)
        set_trainable(net, STAGE1)
        out["stage1_step_s"] = timed(stepper(STAGE1, StageModule(net, STAGE1, aux).train()), device, reps)
    # Stage 2: every candidate head in one pass over one frozen forward.
    set_trainable(net, STAGE2)
    out["stage2_step_s"] = timed(stepper(STAGE2, StageModule(net, STAGE2).train()), device, reps)

    def frozen():
        with torch.no_grad(), rt.autocast():
            feats, taps = net.forward_features(x)
            net.final(taps, x.shape[-2:])
    out["frozen_forward_s"] = timed(frozen, device, reps)

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
    out["heads_one_at_a_time_s"] = sum(timed(one_head(i), device, 1) for i in range(len(net.exits)))
    out["stage2_vs_plain_step"] = out["stage2_step_s"] / out["plain_step_s"]
    out["one_at_a_time_vs_stage2"] = out["heads_one_at_a_time_s"] / out["stage2_step_s"]
    return out


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
    x = torch.stack([ds[i][0] for i in range(batch)])
    y = torch.stack([ds[i][1] for i in range(batch)])
    y[y == 255] = space.ignore_index
    net = MESSNetwork(space).to(device, memory_format=rt.memory_format)
    t = step_times(net, space, x, y, rt, args.reps)
    print(json.dumps({
        "benchmark": "train_stage2_speed", "space": space.name, "model": space.model, "device": str(device),
        "batch": batch, "input_size": list(space.input_size), "candidate_heads": len(net.exits),
        **{k: round(v, 4 if k.endswith("_s") else 3) for k, v in t.items()},
        "torch_threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
