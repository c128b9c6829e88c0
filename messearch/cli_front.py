"""The commands on a cache and after it: search, query and plot a front, export and evaluate a model; the whole
journey (pipeline, quickstart).

Each runner calls one library function and prints its summary (the parser and error handling live in `cli`)."""

from __future__ import annotations

import argparse
import json

from .cli_prepare import SPACE_HELP
from .search_spec import EVALUATORS
from .errors import MessError

def _device_budget(items: list[str] | None) -> dict[str, float]:
    out = {}
    for item in items or []:
        device, sep, ms = item.partition("=")
        try:
            budget = float(ms)
        except ValueError:
            sep = ""
        if not sep or not device:
            raise MessError(f"--max-latency-ms {item!r}: expected DEVICE=MILLISECONDS, e.g. cpu=12.5")
        if device in out:   # the last would silently replace the first
            raise MessError(f"--max-latency-ms {item!r}: device {device!r} given twice; allowed one budget per device")
        out[device] = budget
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
    p.add_argument("--evaluator", choices=EVALUATORS, default="auto",
                   help="compiled kernels, or numpy for a small space without their first compile (auto: by size; "
                        "the same rows either way)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N",
                   help="bootstrap resamples of the images for each front row's 90%% intervals (0: none; default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resamples and of the hold-out split (default 0)")
    p.add_argument("--holdout", type=float, metavar="F",
                   help="keep a share F of the cached images out of the search and report each row on them")
    p.add_argument("--holdout-by", choices=("image", "group"), default="image",
                   help="split images, or whole groups (file-name prefix: CamVid sequence, Cityscapes city)")


def _run_search(args) -> int:
    from .front import check_constraints, summary_line
    from .search_driver import SearchOptions, search_to_front

    opts = SearchOptions(max_exits=args.max_exits, thresholds=args.thresholds, mode=args.mode, profiles=args.profile,
                         max_gmacs=args.max_gmacs, max_latency_ms=_device_budget(args.max_latency_ms),
                         min_miou=args.min_miou, max_miou_drop_pp=args.max_miou_drop_pp, shards=args.shards,
                         keep_all=args.keep_all, resume=args.resume, force=args.force, address=args.address,
                         local=args.local, bootstrap=args.bootstrap, seed=args.seed, holdout=args.holdout,
                         holdout_by=args.holdout_by, evaluator=args.evaluator)
    check_constraints(opts.max_gmacs, opts.max_latency_ms, opts.min_miou, opts.max_miou_drop_pp)
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


RESUME_RULE = ("Train, cache, profile, search, export and evaluate. A rerun with the same --out skips every stage "
               "whose output is complete and was made from this run's inputs (OUT/run.json records them), and redoes "
               "a stage whose inputs changed together with every later stage that reads it: an edited grid "
               "(thresholds, max_exits, mode) is searched again on the same cache. An interrupted training resumes "
               "from OUT/train_state.pt. A mess.pt (or train_state.pt) trained from other inputs (other space "
               "fields, --data, --epochs, --init-checkpoint) is never reused or replaced silently: the run stops with "
               "one line naming what changed; use another --out, or remove mess.pt and train_state.pt to retrain.")


def _add_pipeline_args(p) -> None:
    p.add_argument("--out", required=True, help="run folder (mess.pt, cache/, profiles/, pareto.parquet, model.pt)")
    p.add_argument("--data", help="data spec (default: the space's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--epochs", type=int, help="epochs of each training stage (default: the space's)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--robust", action=argparse.BooleanOptionalAction, default=None,
                   help="choose the cheapest row whose 90%% lower mIoU bound (and hold-out mIoU) is within 0.5 pp "
                        "and whose cost holds under a 0.05 confidence shift (the default; --no-robust: the plain "
                        "rule, the cheapest row within 0.5 pp)")
    p.add_argument("--holdout", type=float, metavar="F", help="search on a share 1-F of val, check rows on F (search --holdout)")
    p.add_argument("--holdout-by", choices=("image", "group"), default="image", help="as search --holdout-by")


def _search_opts(args):
    from .search_driver import SearchOptions
    return SearchOptions(holdout=args.holdout, holdout_by=args.holdout_by)


def _add_pipeline(sub) -> None:
    p = sub.add_parser("pipeline", help="train, cache, profile, search, export and evaluate; resumes where it stopped",
                       description=RESUME_RULE)
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
    p = sub.add_parser("quickstart", help="the whole pipeline on built-in synthetic data, CPU, local Ray",
                       description=RESUME_RULE)
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


# Each command: (adder, runner), in the order `--help` lists them.
COMMANDS = {
    "export": (_add_export, _run_export),
    "evaluate": (_add_evaluate, _run_evaluate),
    "search": (_add_search, _run_search),
    "query": (_add_query, _run_query),
    "plot": (_add_plot, _run_plot),
    "pipeline": (_add_pipeline, _run_pipeline),
    "quickstart": (_add_quickstart, _run_quickstart),
}
