"""The commands that prepare a search: spaces and their sizes, checking data, training, caching and profiling.

Each runner calls one library function and prints its summary (the parser and error handling live in `cli`)."""

from __future__ import annotations

import json

from .errors import MessError

SPACE_HELP = "a built-in space name (`messearch spaces` lists them, e.g. quickstart) or a space YAML file"


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="a space file's positions, heads, GMACs and number of configurations")
    p.add_argument("space", help=SPACE_HELP)
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="override the space's input size")
    p.add_argument("--images", type=int, default=500, help="cached validation images the search time is estimated for")
    p.add_argument("--no-estimate", action="store_true", help="skip measuring the search time (about 2 s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_spaces(sub) -> None:
    p = sub.add_parser("spaces", help="the built-in search spaces: model, classes, input size, configurations")
    p.add_argument("--json", action="store_true", help="print one JSON list")


def _run_spaces(args) -> int:
    from .info import format_spaces, list_spaces

    rows = list_spaces()
    print(json.dumps(rows) if args.json else format_spaces(rows))
    return 0


def _run_info(args) -> int:
    from .info import space_info, format_info

    if args.images < 1:
        raise MessError(f"--images {args.images} must be at least 1")
    info = space_info(args.space, tuple(args.input_size) if args.input_size else None, args.images,
                      not args.no_estimate)
    print(json.dumps(info) if args.json else format_info(info))
    return 0


def _add_check_data(sub) -> None:
    p = sub.add_parser("check-data", help="validate a data set file by file: images per split, class shares, problems")
    p.add_argument("data", help="data spec, e.g. folder:PATH, camvid:PATH or synthetic")
    p.add_argument("--split", action="append", help="split(s) to check (default: train, val, and a folder's test)")
    p.add_argument("--space", help="also check the data against this space's num_classes (a built-in name or a file)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_check_data(args) -> int:
    from .data_check import check_data, format_report
    from .space import load_space

    num_classes = load_space(args.space).num_classes if args.space else None
    report = check_data(args.data, args.split, num_classes, progress=not args.quiet)
    print(format_report(report))
    return 0 if report.ok else 2


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="two-stage MESS training: exit-aware backbone, then every candidate head at once")
    p.add_argument("--space", required=True, help=SPACE_HELP)
    p.add_argument("--data", default=None, help="data spec (default: the space's `data`), e.g. synthetic, camvid:PATH")
    p.add_argument("--out", required=True, help="output folder: mess.pt, train_state.pt, train_log.csv")
    p.add_argument("--stage", choices=("both", "1", "2"), default="both", help="which stage(s) to train")
    p.add_argument("--epochs", type=int, default=None, help="epochs of each stage (default: the space's train block)")
    p.add_argument("--init-checkpoint", default=None,
                   help="start from local weights: a torchvision segmentation state dict (any class count), an ImageNet "
                        "classification state dict of the backbone, either as {'model': ...}, or a mess.pt")
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


def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="Ray actors (or this process: --local) cache exact per-exit statistics; resumable")
    p.add_argument("--checkpoint", required=True, help="the MESS checkpoint (DIR/mess.pt)")
    p.add_argument("--data", default=None, help="data spec (default: the checkpoint's), e.g. synthetic or camvid:PATH")
    p.add_argument("--split", default="val")
    p.add_argument("--out", required=True, help="cache folder (DIR/cache): Parquet shards + manifest.json")
    p.add_argument("--actors", type=int, default=None, help="number of actors (default: one per GPU, else per CPU)")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs per actor (default: 1 if the cluster has GPUs)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward (1 = exactly the deployed model)")
    p.add_argument("--shard-size", type=int, default=None, help="images per shard (default 32)")
    p.add_argument("--keep-confusion", action="store_true", help="also keep every (image, exit) confusion matrix")
    p.add_argument("--resume", action="store_true", help="continue or verify a cache: keep verified shards, redo the rest")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--local", action="store_true",
                   help="no Ray: the same worker runs every shard in this process (same manifest, resume and hashes)")
    p.add_argument("--device", default=None, help="with --local: cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="with --local: torch CPU threads (default 1, as a Ray actor: the same CPU rounding)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_cache(args) -> int:
    from .cache import DEFAULT_SHARD_SIZE, build_cache

    if args.device and not args.local:
        raise MessError(f"--device {args.device}: only with --local (Ray actors take a GPU each when the cluster "
                        f"has GPUs; see --gpus-per-actor)")
    if args.threads is not None and not args.local:
        raise MessError(f"--threads {args.threads}: only with --local (each Ray actor runs one torch thread, for the "
                        f"same CPU rounding everywhere)")
    m = build_cache(args.checkpoint, args.data, args.split, args.out, actors=args.actors,
                    gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size, resume=args.resume,
                    keep_confusion=args.keep_confusion, address=args.address,
                    shard_size=DEFAULT_SHARD_SIZE if args.shard_size is None else args.shard_size,
                    progress=not args.quiet, local=args.local, device=args.device,
                    threads=1 if args.threads is None else args.threads)
    print(m.format_summary(args.out))
    return 0


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="measure the latency of every backbone segment and head on this device")
    p.add_argument("--checkpoint", required=True, help="the MESS checkpoint (DIR/mess.pt)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", required=True, help="output Parquet file (DIR/profiles/<device>.parquet)")
    p.add_argument("--min-run-time", type=float, default=0.1, help="seconds of timing per piece (more: steadier)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_profile(args) -> int:
    from .profile import format_profile, profile_latency

    df = profile_latency(args.checkpoint, device=args.device, batch_size=args.batch_size, out=args.out,
                         min_run_time=args.min_run_time, threads=args.threads, progress=not args.quiet)
    print(format_profile(df))
    print(f"profile: {args.out}")
    return 0


# Each command: (adder, runner), in the order `--help` lists them.
COMMANDS = {
    "info": (_add_info, _run_info),
    "spaces": (_add_spaces, _run_spaces),
    "check-data": (_add_check_data, _run_check_data),
    "cache": (_add_cache, _run_cache),
    "profile": (_add_profile, _run_profile),
    "train": (_add_train, _run_train),
}
