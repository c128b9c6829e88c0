"""The `messearch` command: a thin layer over the library's functions."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading

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
    p.add_argument("--threads", type=int, default=1,
                   help="with --local: torch CPU threads (default 1, as a Ray actor: the same CPU rounding)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_cache(args) -> int:
    from .cache import DEFAULT_SHARD_SIZE, build_cache

    if args.device and not args.local:
        raise MessError(f"--device {args.device}: only with --local (Ray actors take a GPU each when the cluster "
                        f"has GPUs; see --gpus-per-actor)")
    m = build_cache(args.checkpoint, args.data, args.split, args.out, actors=args.actors,
                    gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size, resume=args.resume,
                    keep_confusion=args.keep_confusion, address=args.address,
                    shard_size=args.shard_size or DEFAULT_SHARD_SIZE, progress=not args.quiet, local=args.local,
                    device=args.device, threads=args.threads)
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


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="build the pruned dynamic-exit model of one front row")
    p.add_argument("--checkpoint", required=True, help="the MESS checkpoint the front was searched on (DIR/mess.pt)")
    p.add_argument("--front", required=True, help="pareto.parquet")
    p.add_argument("--config-id", required=True, help="config_id of the row to export")
    p.add_argument("--out", help="output file (model.pt)")
    p.add_argument("--torchscript", action="store_true", help="write a TorchScript archive (torch.jit.load alone runs it)")
    p.add_argument("--onnx", metavar="DIR", help="also (or only) write ONNX graphs, one per stage, and cascade.json "
                   "to DIR (run them with messearch.runtime; needs the `onnx` extra)")


def _run_export(args) -> int:
    from .export import build_export, save_exported

    if not args.out and not args.onnx:
        raise MessError("export needs --out FILE, --onnx DIR, or both")
    model = build_export(args.checkpoint, args.front, args.config_id)
    path = save_exported(model, args.out, torchscript=args.torchscript) if args.out else None
    folder = None
    if args.onnx:
        from .onnx_export import export_onnx

        folder = export_onnx(model, args.onnx)
    print(model.meta.format_summary(path, args.torchscript, folder))
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="measure a model (exported or original): mIoU, exit rates, MACs, latency")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="an exported model (messearch export --out), or an ONNX folder (--onnx DIR; "
                   "runs on ONNX Runtime)")
    g.add_argument("--checkpoint", help="a MESS checkpoint: evaluates the original model (backbone + final head)")
    p.add_argument("--data", required=True, help="data spec, e.g. synthetic:0:64 or camvid:/path")
    p.add_argument("--split", default="val")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up forwards")
    p.add_argument("--compare-batch1", action="store_true", help="at batch > 1, count pixels that differ from batch 1")
    p.add_argument("--threads", type=int, help="torch CPU threads (use the cache's count to compare exactly)")
    p.add_argument("--json", action="store_true", help="print one JSON object (keys as in pareto.parquet)")


def _run_evaluate(args) -> int:
    from .evaluate import evaluate

    r = evaluate(args.model or args.checkpoint, args.data, args.split, device=args.device, batch_size=args.batch_size,
                 warmup=args.warmup, progress=not args.json, compare_batch1=args.compare_batch1, threads=args.threads)
    print(json.dumps(r.to_json()) if args.json else r.format_summary())
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


def _device_budget(items: list[str] | None) -> dict[str, float]:
    out = {}
    for item in items or []:
        device, sep, ms = item.partition("=")
        try:
            out[device] = float(ms)
        except ValueError:
            sep = ""
        if not sep or not device:
            raise MessError(f"--max-latency-ms {item!r}: expected DEVICE=MILLISECONDS, e.g. cpu=12.5")
    return out


def _add_constraints(p) -> None:
    p.add_argument("--max-gmacs", type=float, help="keep rows with mean GMACs <= X")
    p.add_argument("--max-latency-ms", action="append", metavar="DEVICE=X", help="keep rows with latency on DEVICE <= X ms")
    p.add_argument("--min-miou", type=float, help="keep rows with mIoU >= X (0..1)")
    p.add_argument("--max-miou-drop-pp", type=float, help="keep rows losing at most X mIoU points against the reference")


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="exhaustive search with Ray Tune; writes the Pareto front to Parquet")
    p.add_argument("--cache", required=True, help="the cache folder (messearch cache --out)")
    p.add_argument("--out", required=True, help="pareto.parquet to write")
    p.add_argument("--space", help=SPACE_HELP + " (default: the one the cache was built with; must match its exits)")
    p.add_argument("--max-exits", type=int, help="at most K early exits (default: the space's max_exits)")
    p.add_argument("--thresholds", choices=("shared", "per-exit"), default="shared",
                   help="one threshold for all exits, or one per exit")
    p.add_argument("--mode", choices=("cascade", "single"), help="single also searches static truncations")
    p.add_argument("--profile", action="append", default=[], help="latency profile(s) (messearch profile --out)")
    _add_constraints(p)
    p.add_argument("--shards", type=int, help="Tune trials (default: one per CPU of the Ray cluster)")
    p.add_argument("--keep-all", action="store_true", help="also write every evaluated configuration (<out>_all/)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search (Tuner.restore)")
    p.add_argument("--force", action="store_true", help="search even a space estimated too large for this machine")
    p.add_argument("--local", action="store_true", help="run the shards in this process, without Ray")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N",
                   help="bootstrap resamples of the images for each front row's 90%% intervals (0: none; default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resamples and of the hold-out split (default 0)")
    p.add_argument("--holdout", type=float, metavar="F",
                   help="keep a share F of the cached images out of the search and report each row on them")
    p.add_argument("--holdout-by", choices=("image", "group"), default="image",
                   help="split images, or whole groups (file-name prefix: CamVid sequence, Cityscapes city)")


def _run_search(args) -> int:
    from .front import summary_line
    from .search_driver import SearchOptions, search_to_front

    opts = SearchOptions(max_exits=args.max_exits, thresholds=args.thresholds, mode=args.mode, profiles=args.profile,
                         max_gmacs=args.max_gmacs, max_latency_ms=_device_budget(args.max_latency_ms),
                         min_miou=args.min_miou, max_miou_drop_pp=args.max_miou_drop_pp, shards=args.shards,
                         keep_all=args.keep_all, resume=args.resume, force=args.force, address=args.address,
                         local=args.local, bootstrap=args.bootstrap, seed=args.seed, holdout=args.holdout,
                         holdout_by=args.holdout_by)
    if args.bootstrap < 0:
        raise MessError(f"--bootstrap {args.bootstrap}: the number of resamples must be 0 (none) or more")
    df = search_to_front(args.cache, args.out, opts, space_path=args.space)
    print(summary_line(df))
    print(f"wrote {args.out}")
    return 0


def _add_query(sub) -> None:
    p = sub.add_parser("query", help="filter a front under constraints; print or write a table")
    p.add_argument("front", help="pareto.parquet")
    _add_constraints(p)
    p.add_argument("--sort", default="mean_gmacs", help="column to sort by (default mean_gmacs)")
    p.add_argument("--descending", action="store_true")
    p.add_argument("--top", type=int, help="at most N rows")
    p.add_argument("--robust", action="store_true",
                   help="the mIoU drop must also hold for the 90%% lower bound and the hold-out mIoU; no fragile rows")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON records")
    fmt.add_argument("--csv", action="store_true", help="CSV")


def _run_query(args) -> int:
    from .query import format_table, query_front

    rows = query_front(args.front, max_gmacs=args.max_gmacs, max_latency_ms=_device_budget(args.max_latency_ms),
                       min_miou=args.min_miou, max_miou_drop_pp=args.max_miou_drop_pp, sort=args.sort,
                       descending=args.descending, top=args.top, robust=args.robust)
    if args.json:
        print(rows.to_json(orient="records"))
    elif args.csv:
        print(rows.to_csv(index=False), end="")
    else:
        print(format_table(rows))
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="the front as a PNG")
    p.add_argument("front", help="pareto.parquet")
    p.add_argument("--out", required=True, help="PNG to write")


def _run_plot(args) -> int:
    from .plot import plot_file

    print(f"wrote {plot_file(args.front, args.out)}")
    return 0


def _add_pipeline_args(p) -> None:
    p.add_argument("--out", required=True, help="run folder (mess.pt, cache/, profiles/, pareto.parquet, model.pt)")
    p.add_argument("--data", help="data spec (default: the space's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--epochs", type=int, help="epochs of each training stage (default: the space's)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--robust", action=argparse.BooleanOptionalAction, default=None,
                   help="choose the cheapest row whose 90%% lower mIoU bound (and hold-out mIoU) is within 0.5 pp "
                        "and whose cost holds under a 0.05 confidence shift (default: the plain rule)")
    p.add_argument("--holdout", type=float, metavar="F", help="search on a share 1-F of val, check rows on F (search --holdout)")
    p.add_argument("--holdout-by", choices=("image", "group"), default="image", help="as search --holdout-by")


def _search_opts(args):
    from .search_driver import SearchOptions
    return SearchOptions(holdout=args.holdout, holdout_by=args.holdout_by)


def _add_pipeline(sub) -> None:
    p = sub.add_parser("pipeline", help="train, cache, profile, search, export and evaluate; resumes where it stopped")
    p.add_argument("--space", required=True, help=SPACE_HELP)
    _add_pipeline_args(p)
    p.add_argument("--init-checkpoint", help="start training from local weights (as train --init-checkpoint)")


def _run_pipeline(args) -> int:
    from .pipeline import format_summary_md, run_pipeline

    summary = run_pipeline(args.space, args.data, args.out, address=args.address, device=args.device, epochs=args.epochs,
                           init_checkpoint=args.init_checkpoint, robust=args.robust, search_opts=_search_opts(args))
    print(format_summary_md(summary))
    return 0


def _add_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="the whole pipeline on built-in synthetic data, CPU, local Ray")
    _add_pipeline_args(p)
    p.set_defaults(out="results/quickstart")
    for a in p._actions:
        if a.dest == "out":
            a.required = False


def _run_quickstart(args) -> int:
    from .pipeline import QUICKSTART_SPACE, format_summary_md, run_pipeline

    summary = run_pipeline(str(QUICKSTART_SPACE), args.data, args.out, address=args.address, device=args.device,
                           epochs=args.epochs, robust=args.robust, search_opts=_search_opts(args))
    print(format_summary_md(summary))
    print(f"results in {args.out}: pareto.parquet, pareto.png, model.pt, summary.md")
    return 0


# Where each command writes: its --out is a file or a folder, checked before any work starts.
OUT_IS_FOLDER = {"cache": True, "train": True, "pipeline": True, "quickstart": True,
                 "profile": False, "export": False, "search": False, "plot": False}

# Each command: (adder, runner). Add new commands here, in the order `--help` lists them.
COMMANDS = {
    "info": (_add_info, _run_info),
    "spaces": (_add_spaces, _run_spaces),
    "check-data": (_add_check_data, _run_check_data),
    "cache": (_add_cache, _run_cache),
    "profile": (_add_profile, _run_profile),
    "train": (_add_train, _run_train),
    "export": (_add_export, _run_export),
    "evaluate": (_add_evaluate, _run_evaluate),
    "search": (_add_search, _run_search),
    "query": (_add_query, _run_query),
    "plot": (_add_plot, _run_plot),
    "pipeline": (_add_pipeline, _run_pipeline),
    "quickstart": (_add_quickstart, _run_quickstart),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="messearch", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="on an error, print the full (remote) stack too")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def _kept(args) -> str:
    """What an interrupted command kept and how to resume it (one clause)."""
    from pathlib import Path

    cmd, out = args.command, Path(getattr(args, "out", None) or ".")
    if cmd == "cache":
        try:
            shards = json.loads((out / "manifest.json").read_text())["shards"]
            done = sum(s is not None for s in shards)
        except (OSError, ValueError, KeyError, TypeError):
            return "nothing was cached; rerun the same command to start again"
        return f"{done} of {len(shards)} shards kept in {out}; rerun the same command with --resume to finish"
    if cmd == "search":
        if args.local:
            return f"no front written to {out}; rerun the same command to search again"
        return (f"no front written to {out}; Ray Tune's progress kept in {out.resolve().parent / 'tune'}; "
                f"rerun the same command with --resume to continue")
    if cmd == "train":
        state = out / "train_state.pt"
        if state.exists():
            return f"completed epochs kept in {state}; rerun the same command with --resume to continue"
        return "no epoch completed, nothing kept; rerun the same command to start again"
    if cmd in ("pipeline", "quickstart"):
        return f"completed stages kept in {out}; rerun the same command to resume from the first unfinished one"
    return "nothing was written; rerun the same command"


def _error_line(e: BaseException, debug: bool) -> str:
    """The one line printed for a user error; a remote (Ray worker) error shows its original message, and its
    stack goes to a log file the line names (or to stderr with --debug)."""
    import tempfile
    import time
    import traceback

    from .errors import is_remote, remote_cause

    if not is_remote(e):
        if debug:
            traceback.print_exception(e)
        return f"error: {e}"
    cause = remote_cause(e)
    stack = "Traceback of the error raised in a Ray worker:\n" + re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if debug:
        print(stack, file=sys.stderr)
        return f"error: {first}"
    log = os.path.join(tempfile.gettempdir(), f"messearch-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    try:
        with open(log, "w", encoding="utf-8") as f:
            f.write(stack + "\n")
    except OSError:
        return f"error: {first} (rerun with --debug for the remote stack)"
    return f"error: {first} (remote stack in {log})"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl+C so the same clean-up runs; exits 143."""


def _on_sigterm(signum, frame):
    # Deliver SIGTERM the way Ctrl+C arrives: a running Ray Tune has its own SIGINT handler that stops trials
    # gracefully (and saves its state); otherwise Python's raises KeyboardInterrupt.
    global _terminated
    _terminated = True
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signal.SIGINT, frame)
    else:
        raise _Terminated()


_terminated = False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    from .errors import is_remote, remote_cause
    from .ray_runtime import shutdown_own

    global _terminated
    args = build_parser().parse_args(argv)
    _terminated = False
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if getattr(args, "out", None) and args.command in OUT_IS_FOLDER:
            from .files import check_writable

            check_writable(args.out, folder=OUT_IS_FOLDER[args.command])
        return COMMANDS[args.command][1](args) or 0
    except KeyboardInterrupt as e:
        code = 143 if (_terminated or isinstance(e, _Terminated)) else 130
        print(f"interrupted ({'SIGTERM' if code == 143 else 'Ctrl+C'}): {_kept(args)}", file=sys.stderr)
        return code
    except Exception as e:
        # A user error, or any error raised inside a Ray worker: one line (the remote stack goes to a log file).
        # Anything else is a bug in messearch and keeps its traceback.
        if not isinstance(e, MessError) and not is_remote(e):
            raise
        print(_error_line(e, args.debug), file=sys.stderr)
        return 2 if isinstance(remote_cause(e), MessError) else 1
    finally:
        shutdown_own()   # only a local Ray this process started; a joined cluster is left alone
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
