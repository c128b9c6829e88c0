"""Both MESS training stages of the deeplabv3_resnet50 space on CamVid at 360x480 (11 classes), in one
process on one device (no Ray), for a few minutes; prints throughput (images/s per stage) and per-exit
validation mIoU as one JSON line.

    python benchmarks/gpu_train_camvid.py --data camvid:/path/to/camvid [--device cuda] [--epochs-stage1 2]
        [--epochs-stage2 2] [--max-steps 50] [--batch 8]
    # CPU smoke run: --device cpu --input-size 64 64 --max-steps 2 --batch 2 --train-images 4 --val-images 2 --heads lin
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from messearch.checkpoint import read_checkpoint
from messearch.space import space_from_text
from messearch.train import train

ROOT = Path(__file__).resolve().parents[1]


def derived_space(path: Path, args) -> object:
    """The resnet50 space at the CamVid size and class count, with this run's training settings."""
    raw = yaml.safe_load(path.read_text())
    raw.update(num_classes=11, input_size=list(args.input_size), data=args.data)
    if args.heads:  # a subset of head variants (the wide ones hold most of stage 2's ~10^8 parameters)
        raw["heads"] = [h for h in raw["heads"] if h["name"] in args.heads.split(",")]
    raw["train"] = dict(raw.get("train") or {}, batch_size=args.batch, epochs_stage1=args.epochs_stage1,
                        epochs_stage2=args.epochs_stage2, lr=args.lr, lr_stage2=args.lr_stage2,
                        train_images=args.train_images, val_images=args.val_images, num_workers=args.workers)
    return space_from_text(yaml.safe_dump(raw, sort_keys=False), f"{path} (camvid {args.input_size[0]}x{args.input_size[1]})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"camvid:{ROOT.parent / 'shared' / 'data' / 'camvid'}",
                    help="camvid:PATH (default: shared/data/camvid beside the repository)")
    ap.add_argument("--space", default=str(ROOT / "messearch" / "spaces" / "deeplabv3_resnet50.yaml"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--input-size", nargs=2, type=int, default=[360, 480], metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs-stage1", type=int, default=2)
    ap.add_argument("--epochs-stage2", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=None, help="at most this many steps per epoch")
    ap.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate of stage 1")
    ap.add_argument("--lr-stage2", type=float, default=2e-3, help="AdamW learning rate of stage 2")
    ap.add_argument("--train-images", type=int, default=0, help="first N training images (0: all)")
    ap.add_argument("--val-images", type=int, default=0, help="first N validation images (0: all)")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    ap.add_argument("--init-checkpoint", default=None, help="torchvision-format deeplabv3_resnet50 weights")
    ap.add_argument("--heads", default=None, help="comma-separated head variants to keep (default: all)")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = ap.parse_args()
    space = derived_space(Path(args.space), args)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mess-camvid-"))
    t = time.perf_counter()
    path = train(space, args.data, out, stage="both", device=args.device, init_checkpoint=args.init_checkpoint,
                 progress=sys.stderr.isatty(), max_steps=args.max_steps)
    payload = read_checkpoint(path)
    extra, miou = payload["extra"], payload["exit_miou"]
    best = max((k for k in miou if k != "final"), key=miou.get)
    print(json.dumps({
        "benchmark": "gpu_train_camvid", "model": space.model, "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "input_size": list(space.input_size), "batch": args.batch, "candidate_heads": len(payload["exits"]),
        "epochs": extra["epochs"], "max_steps": args.max_steps,
        "images_per_s": {f"stage{k}": round(v, 2) for k, v in extra["images_per_s"].items()},
        "train_seconds": {f"stage{k}": round(v, 1) for k, v in extra["seconds"].items()},
        "wall_seconds": round(time.perf_counter() - t, 1),
        "final_miou": round(miou["final"], 4), "best_exit": best, "best_exit_miou": round(miou[best], 4),
        "exit_miou": {k: round(v, 4) for k, v in miou.items()},
        "ray_imported": "ray" in sys.modules, "checkpoint": str(path),
    }))


if __name__ == "__main__":
    main()
