"""Synthetic data: generation speed, and how difficulty changes what shallow and deeper nets get right.

Prints one JSON line. `--steps 0` skips the training part (speed only).
    python benchmarks/data_synthetic.py [--images 1000] [--size 128] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from messearch.data import build_dataset
from messearch.data_synthetic import LEVELS, render_scene


def _speed(n: int, size: int) -> dict:
    t0 = time.perf_counter()
    for i in range(n):
        render_scene(0, "val", i, (size, size))
    raw = time.perf_counter() - t0
    ds = build_dataset(f"synthetic:0:{n}", "val", (size, size))
    t0 = time.perf_counter()
    for i in range(n):
        ds[i]
    full = time.perf_counter() - t0
    return {"images": n, "size": [size, size], "render_s": round(raw, 3), "render_images_per_s": round(n / raw, 1),
            "dataset_s": round(full, 3), "images_per_s": round(n / full, 1)}


def _net(depth: int, width: int, classes: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU()]
    for _ in range(depth - 1):
        layers += [torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU()]
    layers.append(torch.nn.Conv2d(width, classes, 1))
    return torch.nn.Sequential(*layers)


def _accuracy(steps: int, size: int) -> dict:
    spec = "synthetic:seed=1,train=384,val=192"
    tr, va = build_dataset(spec, "train", (size, size)), build_dataset(spec, "val", (size, size))
    X, Y = (torch.stack(t) for t in zip(*(tr[i] for i in range(len(tr)))))
    VX, VY = (torch.stack(t) for t in zip(*(va[i] for i in range(len(va)))))
    out = {}
    for name, depth in (("shallow_1conv", 1), ("deeper_5conv", 5)):
        torch.manual_seed(0)
        net = _net(depth, 24, tr.num_classes)
        opt = torch.optim.Adam(net.parameters(), 3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(0, len(X), (16,), generator=g)
            loss = torch.nn.functional.cross_entropy(net(X[idx]), Y[idx], ignore_index=255)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            correct = (net(VX).argmax(1) == VY).float().mean((1, 2)).numpy()
        out[name] = {lv: round(float(correct[va.level == k].mean()), 4) for k, lv in enumerate(LEVELS)}
    out["val_images_per_level"] = {lv: int((np.asarray(va.level) == k).sum()) for k, lv in enumerate(LEVELS)}
    return out


def main() -> None:
    """Run the benchmark and print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=300, help="training steps per net (0: speed only)")
    p.add_argument("--train-size", type=int, default=48)
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny convs; also keeps the timing comparable on a busy machine
    result = {"benchmark": "data_synthetic", **_speed(args.images, args.size)}
    if args.steps > 0:
        result["pixel_acc_by_difficulty"] = _accuracy(args.steps, args.train_size)
        result["train_steps"], result["train_size"] = args.steps, args.train_size
    print(json.dumps(result))


if __name__ == "__main__":
    main()
