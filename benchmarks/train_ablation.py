"""The two-stage ablation: per-exit validation mIoU of two-stage MESS training against (a) joint end-to-end
training of the backbone with the candidate exits, (b) stage 2 on the original backbone (no stage 1: the
original model trained on its final head only, for the same epochs), (c) stage 2 without distillation.
Stage 1 is trained once and shared by two-stage and (c). Writes OUT/ablation.csv, prints the table to
stderr and one JSON line to stdout.

    python benchmarks/train_ablation.py [--space messearch/spaces/quickstart.yaml] [--data synthetic] [--out DIR]
        [--epochs N] [--max-steps N] [--device cpu]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

import torch

from messearch.files import atomic_write_text
from messearch.space import load_space
from messearch.train import train

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ("two-stage", "joint", "no-stage1", "no-distill")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=str(ROOT / "messearch" / "spaces" / "quickstart.yaml"))
    ap.add_argument("--data", default=None, help="default: the space's data spec")
    ap.add_argument("--out", default=str(ROOT / "results" / "ablation"))
    ap.add_argument("--epochs", type=int, default=None, help="epochs of each stage (default: the space's)")
    ap.add_argument("--max-steps", type=int, default=None, help="at most this many steps per epoch")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    space = load_space(args.space)
    out = Path(args.out)
    kw = dict(epochs=args.epochs, device=args.device, progress=False, max_steps=args.max_steps)
    seconds, results = {}, {}

    def run(name, **extra):
        t = time.perf_counter()
        path = train(space, args.data, out / name, **kw, **extra)
        seconds[name] = round(time.perf_counter() - t, 1)
        return path

    stage1 = run("stage1", stage="1")
    for name, extra in (("two-stage", dict(stage="2", init_checkpoint=str(stage1))),
                        ("no-distill", dict(stage="2", init_checkpoint=str(stage1), baseline="no-distill")),
                        ("no-stage1", dict(stage="both", baseline="no-stage1")),
                        ("joint", dict(stage="both", baseline="joint"))):
        results[name] = torch.load(run(name, **extra), weights_only=True)["exit_miou"]
    keys = [f"{p}/{h}" for p in space.positions for h in space.head_names] + ["final"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["exit"] + list(SCHEMES))
    for k in keys:
        w.writerow([k] + [f"{results[s][k]:.4f}" for s in SCHEMES])
    means = {s: sum(results[s][k] for k in keys[:-1]) / (len(keys) - 1) for s in SCHEMES}
    w.writerow(["mean over exits"] + [f"{means[s]:.4f}" for s in SCHEMES])
    atomic_write_text(out / "ablation.csv", buf.getvalue())
    width = max(len(k) for k in keys)
    print("exit".ljust(width) + "".join(f"{s:>12}" for s in SCHEMES), file=sys.stderr)
    for row in list(csv.reader(io.StringIO(buf.getvalue())))[1:]:
        print(row[0].ljust(width) + "".join(f"{v:>12}" for v in row[1:]), file=sys.stderr)
    print(json.dumps({"benchmark": "train_ablation", "space": space.name, "data": args.data or space.data,
                      "epochs": args.epochs, "max_steps": args.max_steps, "csv": str(out / "ablation.csv"),
                      "mean_exit_miou": {s: round(v, 4) for s, v in means.items()},
                      "final_miou": {s: round(results[s]["final"], 4) for s in SCHEMES}, "seconds": seconds}))


if __name__ == "__main__":
    main()
