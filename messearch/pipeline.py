"""The stages wired together: search a cache into a front file, and the whole journey (`pipeline`, `quickstart`),
each stage skipped when its output is already complete so that a rerun resumes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MessError
from .io import atomic_write_text, sha256_file

# The built-in default space (package data messearch/spaces/quickstart.yaml, so it ships in the wheel too).
QUICKSTART_SPACE = "quickstart"


@dataclass
class SearchOptions:
    """What `messearch search` takes beyond the cache: the space's grid can be overridden, constraints added."""

    max_exits: int | None = None
    thresholds: str = "shared"
    mode: str | None = None
    profiles: list[str] = field(default_factory=list)
    max_gmacs: float | None = None
    max_latency_ms: dict[str, float] = field(default_factory=dict)
    min_miou: float | None = None
    max_miou_drop_pp: float | None = None
    shards: int | None = None
    keep_all: bool = False
    resume: bool = False
    force: bool = False
    address: str | None = None
    local: bool = False   # run the shards in this process, without Ray (machines without Ray)


def search_spec_for(space, opts: SearchOptions):
    """The SearchSpec of a space, with the options' overrides and constraints."""
    from .search import SearchSpec

    return SearchSpec(positions=list(space.positions), heads=space.head_names, thresholds=tuple(space.thresholds),
                      max_exits=opts.max_exits or space.max_exits, thresholds_mode=opts.thresholds,
                      mode=opts.mode or space.mode, policy_kind=space.policy.kind,
                      pixel_threshold_bin=space.policy.pixel_threshold_bin, max_gmacs=opts.max_gmacs,
                      max_latency_ms=dict(opts.max_latency_ms), min_miou=opts.min_miou,
                      max_miou_drop_pp=opts.max_miou_drop_pp)


def search_to_front(cache_dir, out, opts: SearchOptions | None = None, space_path: str | None = None):
    """Search every configuration over a cache and write the front to `out` (pareto.parquet); returns the DataFrame."""
    from .cache import load_cache
    from .costs import mac_table
    from .pareto import write_front
    from .profile import load_profile
    from .space import load_space, space_from_text

    opts = opts or SearchOptions()
    cache = load_cache(cache_dir)
    cached_space = space_from_text(cache.meta["space_text"],
                                   cache.meta.get("space_source") or f"{cache_dir} (space of the cache)")
    space = cached_space
    if space_path:
        space = load_space(space_path)
        if (space.model, space.positions, space.head_names, space.num_classes) != (
                cached_space.model, cached_space.positions, cached_space.head_names, cached_space.num_classes):
            raise MessError(f"{space_path}: the space's model, positions, heads or classes differ from those the "
                            f"cache {cache_dir} was built with; use the space of the checkpoint, or rebuild the cache")
    latencies, device_names = {}, {}
    for path in opts.profiles:
        # The file's stem (profiles/<device>.parquet) names the column latency_ms_<device>: short and typeable.
        device_name, table = load_profile(path)
        key = Path(path).stem
        if key in latencies:
            raise MessError(f"{path}: two profiles named {key!r}; name each profile file after its device")
        if table.positions != list(space.positions) or table.heads != space.head_names:
            raise MessError(f"{path}: the profile's positions or heads differ from the cache's space")
        latencies[key], device_names[key] = table, device_name
    spec = search_spec_for(space, opts)
    macs = mac_table(space)
    keep_all_dir = Path(out).with_name(Path(out).stem + "_all") if opts.keep_all else None
    t0 = time.perf_counter()
    if opts.local:
        from .tune_search import search_local

        df = search_local(cache, spec, macs, latencies, shards=opts.shards or 1, keep_all_dir=keep_all_dir)
    else:
        from .tune_search import run_search

        storage = Path(out).resolve().parent / "tune"
        df = run_search(cache, spec, macs, latencies, shards=opts.shards, address=opts.address,
                        keep_all_dir=keep_all_dir, resume=opts.resume, storage_path=str(storage), force=opts.force)
    meta = {
        "space_text": space.text, "space_source": space.source,
        "checkpoint_sha256": cache.meta.get("checkpoint_sha256", ""), "cache_sha256": cache.meta.get("cache_sha256", ""),
        "mode": spec.mode, "thresholds": spec.thresholds_mode, "max_exits": spec.max_exits,
        "policy": json.dumps({"kind": space.policy.kind, "pixel_threshold": space.policy.pixel_threshold,
                              "n_bins": space.policy.n_bins}),
        "data": cache.meta.get("data", ""), "split": cache.meta.get("split", ""),
        "n_images": cache.n_images, "n_evaluated": df.attrs.get("n_evaluated", ""),
        "seconds": f"{df.attrs.get('seconds', time.perf_counter() - t0):.3f}",
        "profiles": json.dumps(device_names), "keep_all_dir": str(keep_all_dir or ""),
    }
    write_front(df, out, meta)
    return df


def _front_is_current(path: Path, ckpt_sha: str, cache_sha: str) -> bool:
    from .pareto import read_front

    if not path.exists():
        return False
    _, meta = read_front(path)
    return meta.get("checkpoint_sha256") == ckpt_sha and meta.get("cache_sha256") == cache_sha


def _say(msg: str) -> None:
    print(f"[messearch] {msg}", flush=True)


def run_pipeline(space_path: str, data_spec: str | None, out_dir, address: str | None = None, device: str = "cpu",
                 tol_pp: float = 0.5, evaluate_models: bool = True, epochs: int | None = None,
                 search_opts: SearchOptions | None = None, init_checkpoint: str | None = None) -> dict:
    """Train (both stages), cache, profile, search, export the cheapest row within `tol_pp` of the reference, and
    evaluate it; each stage is skipped when its output is complete. `space_path`: a built-in space name or a YAML
    file; `init_checkpoint`: training starts from these weights (any shape messearch.weights accepts).
    Returns a summary dict (also summary.md)."""
    from .cache import build_cache, load_cache
    from .checkpoint import read_checkpoint
    from .data import check_dataset
    from .export import export_model, load_exported
    from .front import cheapest_within
    from .pareto import read_front
    from .plot import plot_front
    from .profile import profile_latency
    from .ray_runtime import connect
    from .space import load_space
    from .train import train

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    space = load_space(space_path)
    data = data_spec or space.data
    check_dataset(data, "train", space.num_classes)
    check_dataset(data, "val", space.num_classes)
    timings = {}

    ckpt = out / "mess.pt"
    t = time.perf_counter()
    if ckpt.exists():
        trained = read_checkpoint(ckpt)  # a broken file is an error, not a silent retrain
        init_sha = trained.get("extra", {}).get("init", {}).get("sha256")
        if init_checkpoint and (not Path(init_checkpoint).is_file() or init_sha != sha256_file(init_checkpoint)):
            raise MessError(f"--init-checkpoint {init_checkpoint}: {ckpt} exists and was not trained from it; "
                            f"use another --out, or remove {ckpt} to retrain")
        _say(f"train: {ckpt} exists, skipped")
    else:
        _say("train: stage 1 (exit-aware backbone), then stage 2 (every candidate head)")
        train(space, data, out, stage="both", epochs=epochs, device=device, address=address,
              init_checkpoint=init_checkpoint)
    timings["train"] = time.perf_counter() - t
    ckpt_sha = sha256_file(ckpt)

    connect(address)
    cache_dir = out / "cache"
    t = time.perf_counter()
    try:
        cache = load_cache(cache_dir, expect_checkpoint_sha256=ckpt_sha)
        _say(f"cache: {cache_dir} complete ({cache.n_images} images), skipped")
    except MessError:
        _say("cache: every candidate exit over the validation split, Ray actors")
        build_cache(ckpt, data, "val", cache_dir, resume=(cache_dir / "manifest.json").exists(), address=address)
        cache = load_cache(cache_dir, expect_checkpoint_sha256=ckpt_sha)
    timings["cache"] = time.perf_counter() - t

    dev_name = "cuda" if device.startswith("cuda") else "cpu"
    profile_path = out / "profiles" / f"{dev_name}.parquet"
    t = time.perf_counter()
    if profile_path.exists():
        _say(f"profile: {profile_path} exists, skipped")
    else:
        _say(f"profile: latency of every segment and head on this {dev_name}")
        profile_latency(ckpt, device=device, out=profile_path)
    timings["profile"] = time.perf_counter() - t

    front_path = out / "pareto.parquet"
    t = time.perf_counter()
    cache_sha = cache.meta.get("cache_sha256", "")
    if _front_is_current(front_path, ckpt_sha, cache_sha):
        _say(f"search: {front_path} is current, skipped")
    else:
        _say("search: every configuration, Ray Tune shards")
        opts = search_opts or SearchOptions()
        opts.profiles = [str(profile_path)]
        opts.address = address
        search_to_front(cache_dir, front_path, opts)
    timings["search"] = time.perf_counter() - t
    front, meta = read_front(front_path)
    plot_front(front, out / "pareto.png", title=f"{space.name}: MESS configurations on {data} (val)")

    chosen = cheapest_within(front, tol_pp)
    model_path = out / "model.pt"
    t = time.perf_counter()
    if model_path.exists() and load_exported(model_path).meta["provenance"].get("config_id") == chosen["config_id"]:
        _say(f"export: {model_path} holds {chosen['config_id']}, skipped")
    else:
        _say(f"export: {chosen['config_id']} (cheapest within {tol_pp} pp of the reference)")
        export_model(ckpt, front_path, chosen["config_id"], model_path)
    timings["export"] = time.perf_counter() - t

    ref = front[front["is_reference"]].iloc[0]
    summary = {"space": str(space_path), "data": data, "out": str(out), "front_rows": int((~front["is_reference"]).sum()),
               "n_evaluated": meta.get("n_evaluated"), "reference": _row_summary(ref), "chosen": _row_summary(chosen),
               "timings_s": timings}
    if evaluate_models:
        from .evaluate import evaluate

        t = time.perf_counter()
        _say("evaluate: the exported model and the original, batch 1, on the cached split")
        # Equal numerics: the cache's batch size and torch thread count (CPU convolutions pick kernels by threads).
        threads = (cache.meta.get("workers") or [{}])[0].get("threads", 1)
        measured = evaluate(str(model_path), data, "val", device=device, progress=False, threads=threads)
        original = evaluate(str(ckpt), data, "val", device=device, progress=False, threads=threads)
        summary["measured"] = {k: measured[k] for k in ("miou", "pixel_acc", "exit_rates", "mean_gmacs",
                                                       "latency_ms_median", "latency_ms_p90")}
        summary["measured_reference"] = {k: original[k] for k in ("miou", "mean_gmacs", "latency_ms_median")}
        summary["exact"] = bool(measured["miou"] == chosen["miou"] and measured["mean_gmacs"] == chosen["mean_gmacs"]
                                and list(measured["exit_rates"]) == list(chosen["exit_rates"]))
        timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    atomic_write_text(out / "summary.md", format_summary_md(summary))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=float))
    return summary


def _row_summary(row) -> dict:
    d = {"config_id": row["config_id"], "kind": row["kind"], "positions": list(row["positions"]),
         "heads": list(row["heads"]), "thresholds": [float(t) for t in row["thresholds"]],
         "miou": float(row["miou"]), "mean_gmacs": float(row["mean_gmacs"]), "speedup": float(row["speedup"]),
         "miou_delta_pp": float(row["miou_delta_pp"]), "exit_rates": [float(r) for r in row["exit_rates"]]}
    for c in row.index:
        if c.startswith("latency_ms_"):
            d[c] = float(row[c])
    return d


def format_summary_md(s: dict) -> str:
    """The run's summary as a short Markdown page (also what the command prints at the end)."""
    ref, ch = s["reference"], s["chosen"]
    lat = [c for c in ref if c.startswith("latency_ms_")]
    lines = [f"# messearch run: {s['space']} on {s['data']}", "",
             f"Front: {s['front_rows']} configurations (of {s['n_evaluated']} evaluated) plus the reference.", "",
             "| | config | mIoU | GMACs | speed-up |" + "".join(f" {c} |" for c in lat),
             "|---|---|---|---|---|" + "---|" * len(lat)]
    for name, r in (("reference", ref), ("chosen (cheapest within 0.5 pp)", ch)):
        lines.append(f"| {name} | {r['config_id']} | {r['miou'] * 100:.2f}% | {r['mean_gmacs']:.4f} | "
                     f"{r['speedup']:.2f}x |" + "".join(f" {r[c]:.2f} |" for c in lat))
    exits = ", ".join(f"{p}/{h}@{t:g}" for p, h, t in zip(ch["positions"], ch["heads"], ch["thresholds"])) or "none"
    lines += ["", f"Chosen exits: {exits}; exit rates {', '.join(f'{r:.2f}' for r in ch['exit_rates'])} (final last)."]
    if "measured" in s:
        m, mr = s["measured"], s["measured_reference"]
        lines += ["", f"Measured (exported model, batch 1): mIoU {m['miou'] * 100:.2f}%, {m['mean_gmacs']:.4f} GMACs, "
                      f"latency median {m['latency_ms_median']:.2f} ms (p90 {m['latency_ms_p90']:.2f} ms); original model: "
                      f"mIoU {mr['miou'] * 100:.2f}%, {mr['mean_gmacs']:.4f} GMACs, {mr['latency_ms_median']:.2f} ms.",
                  "", f"Measured mIoU, GMACs and exit rates equal the front's prediction exactly: {s['exact']}."]
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["timings_s"].items())]
    return "\n".join(lines) + "\n"
