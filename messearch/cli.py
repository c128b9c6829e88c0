"""The `messearch` command: a thin layer over the library's functions."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import MessError


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="a space file's positions, heads, GMACs and number of configurations")
    p.add_argument("space", help="search-space YAML file")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="override the space's input size")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _run_info(args) -> int:
    from .info import space_info, format_info

    info = space_info(args.space, tuple(args.input_size) if args.input_size else None)
    print(json.dumps(info) if args.json else format_info(info))
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="two-stage MESS training: exit-aware backbone, then every candidate head at once")
    p.add_argument("--space", required=True, help="search-space YAML file")
    p.add_argument("--data", default=None, help="data spec (default: the space's `data`), e.g. synthetic, camvid:PATH")
    p.add_argument("--out", required=True, help="output folder: mess.pt, train_state.pt, train_log.csv")
    p.add_argument("--stage", choices=("both", "1", "2"), default="both", help="which stage(s) to train")
    p.add_argument("--epochs", type=int, default=None, help="epochs of each stage (default: the space's train block)")
    p.add_argument("--init-checkpoint", default=None,
                   help="start from local weights: a torchvision-format state dict, or a mess.pt (needed by --stage 2)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT/train_state.pt")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (one process; bf16 autocast on CUDA)")
    p.add_argument("--gpus", type=int, default=0,
                   help="N >= 1: data-parallel over N Ray Train workers (GPUs, or CPU slots on a CPU-only machine)")
    p.add_argument("--address", default=None, help="Ray cluster address for --gpus (default: RAY_ADDRESS or local)")
    p.add_argument("--baseline", choices=("joint", "no-stage1", "no-distill"), default=None,
                   help="ablation baselines: joint end-to-end, stage 2 on the original model, stage 2 without distillation")
    p.add_argument("--max-steps", type=int, default=None, help="at most this many steps per epoch (smoke runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_train(args) -> int:
    from .checkpoint import read_checkpoint
    from .train import format_summary, train

    path = train(args.space, args.data, args.out, stage=args.stage, epochs=args.epochs,
                 init_checkpoint=args.init_checkpoint, resume=args.resume, device=args.device, gpus=args.gpus,
                 address=args.address, baseline=args.baseline, progress=not args.quiet, max_steps=args.max_steps)
    print(format_summary(read_checkpoint(path)))
    print(f"checkpoint: {path}")
    return 0


# Each command: (adder, runner). Add new commands here, in the order `--help` lists them.
COMMANDS = {
    "info": (_add_info, _run_info),
    "train": (_add_train, _run_train),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="messearch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args) or 0
    except MessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
