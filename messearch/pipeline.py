"""The whole journey (`messearch pipeline`, `quickstart`): train, cache, profile, search, export, evaluate,
each stage skipped when its output is complete and made from this run's inputs, so that a rerun resumes
(messearch.run_folder: the rule, and run.json, the record of each stage's inputs)."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

from .cache import build_cache
from .cache_format import load_cache, read_manifest
from .checkpoint import read_checkpoint
from .config import exits_text
from .data import check_dataset
from .devices import device_kind
from .errors import MessError
from .evaluate import evaluate_side_by_side
from .exit_quality import single_exit_miou, structure_report
from .export import export_model, load_exported
from .files import atomic_write_text, sha256_file, sha256_text
from .front import latency_devices_of, read_front
from .plot import plot_front
from .profile import profile_latency, read_profile
from .ray_runtime import connect
from .run_folder import check_trained, interrupted_training, model_is_current, read_record, write_record
from .search_driver import SearchOptions, check_options, search_to_front
from .space import load_space
from .train import train
from .trust import TRUST_COLUMNS, choose, trust_words

# The built-in default space (package data messearch/spaces/quickstart.yaml, so it ships in the wheel too).
QUICKSTART_SPACE = "quickstart"
# The pipeline's choice: the robust rule (messearch.trust.robust_mask) unless asked for the plain one
# (--no-robust): on held-out images its choices stayed within the tolerance far more often, on the quickstart
# (5 of 5 splits against 2 of 5) and on CamVid by sequence (2 of 2 against 1 of 2); results/README.md.
ROBUST_DEFAULT = True


def _front_is_current(path: Path, ckpt_sha: str, cache_sha: str, space_text: str, opts: SearchOptions,
                      searched: dict | None, inputs: dict) -> bool:
    if not path.exists() or searched != inputs:   # run.json: the profile (and the rest) the front was searched with
        return False
    try:
        _, meta = read_front(path)
        held = json.loads(meta.get("holdout") or "null")
    except (MessError, ValueError):   # not a front this run can trust: search again (the new one replaces it atomically)
        return False
    asked = None if opts.holdout is None else [opts.holdout, opts.holdout_by, opts.seed]
    return (meta.get("checkpoint_sha256") == ckpt_sha and meta.get("cache_sha256") == cache_sha
            and meta.get("space_text") == space_text
            and ([held.get("fraction"), held.get("by"), held.get("seed")] if isinstance(held, dict) else None) == asked)


def _cache_stage(ckpt: Path, ckpt_sha: str, data: str, cache_dir: Path, address: str | None):
    """The run's cache: kept when complete and built from this checkpoint and data, resumed when partial, rebuilt
    when it was built from another checkpoint or data (its shards cannot be reused)."""
    try:
        cache = load_cache(cache_dir, expect_checkpoint_sha256=ckpt_sha)
        if cache.meta.get("data") == data:
            _say(f"cache: {cache_dir} complete ({cache.n_images} images), skipped")
            return cache
    except MessError:
        pass
    old = read_manifest(cache_dir)
    if old is not None and (old.checkpoint_sha256 != ckpt_sha or old.data != data):
        _say(f"cache: {cache_dir} was built from another checkpoint or data; removed, built again")
        shutil.rmtree(cache_dir)
        old = None
    _say("cache: every candidate exit over the validation split, Ray actors")
    build_cache(ckpt, data, "val", cache_dir, resume=old is not None, address=address)
    return load_cache(cache_dir, expect_checkpoint_sha256=ckpt_sha)


def _profile_is_current(path: Path, ckpt_sha: str) -> bool:
    if not path.exists():
        return False
    try:
        meta, _ = read_profile(path)
    except MessError:
        return False
    return meta.get("checkpoint_sha256") == ckpt_sha


def _model_is_current(path: Path, chosen, ckpt_sha: str, cache_sha: str) -> bool:
    if not path.exists():
        return False
    try:
        provenance = load_exported(path).meta.provenance
    except MessError:   # unreadable: export again (atomically)
        return False
    return model_is_current(provenance, chosen, ckpt_sha, cache_sha)


def _say(msg: str) -> None:
    print(f"[messearch] {msg}", flush=True)


def run_pipeline(space_path: str, data_spec: str | None, out_dir, address: str | None = None, device: str = "cpu",
                 tol_pp: float = 0.5, evaluate_models: bool = True, epochs: int | None = None,
                 search_opts: SearchOptions | None = None, init_checkpoint: str | None = None,
                 robust: bool | None = None) -> dict:
    """Train (both stages), cache, profile, search, export the cheapest row within `tol_pp` of the reference, and
    evaluate it; each stage is skipped when its output is complete and was made from these inputs, redone when they
    changed (a trained mess.pt from other inputs is refused; messearch.run_folder). `space_path`: a built-in space name or a YAML
    file; `init_checkpoint`: training starts from these weights (any shape messearch.weights accepts);
    `robust`: choose by messearch.trust.robust_mask (default ROBUST_DEFAULT).
    Returns a summary dict (also summary.md)."""
    t_start = time.perf_counter()
    opts = search_opts or SearchOptions()
    check_options(opts)   # later stages' options are refused before the earlier stages spend their minutes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    space = load_space(space_path)
    data = data_spec or space.data
    check_dataset(data, "train", space.num_classes)
    check_dataset(data, "val", space.num_classes)
    timings = {}

    t = time.perf_counter()
    ckpt = train_stage(space, data, out, epochs, device, address, init_checkpoint)
    timings["train"] = time.perf_counter() - t
    ckpt_sha = sha256_file(ckpt)
    write_record(out, "train", {"checkpoint_sha256": ckpt_sha, "data": data, "epochs": epochs,
                                "init_checkpoint": init_checkpoint, "space": str(space_path)})

    connect(address, what="`messearch pipeline` (Ray actors and Ray Tune)")
    cache_dir = out / "cache"
    t = time.perf_counter()
    cache = _cache_stage(ckpt, ckpt_sha, data, cache_dir, address)
    cache_sha = cache.meta.get("cache_sha256", "")
    write_record(out, "cache", {"checkpoint_sha256": ckpt_sha, "data": data, "split": "val", "cache_sha256": cache_sha})
    timings["cache"] = time.perf_counter() - t

    dev_name = device_kind(device)
    profile_path = out / "profiles" / f"{dev_name}.parquet"
    t = time.perf_counter()
    if _profile_is_current(profile_path, ckpt_sha):
        _say(f"profile: {profile_path} exists, skipped")
    else:
        _say(f"profile: latency of every segment and head on this {dev_name}")
        profile_latency(ckpt, device=device, out=profile_path)
    profile_sha = sha256_file(profile_path)
    write_record(out, "profile", {"checkpoint_sha256": ckpt_sha, "device": device, "profile_sha256": profile_sha})
    timings["profile"] = time.perf_counter() - t

    front_path = out / "pareto.parquet"
    t = time.perf_counter()
    search_inputs = {"checkpoint_sha256": ckpt_sha, "cache_sha256": cache_sha,
                     "profile_sha256": profile_sha, "space_sha256": sha256_text(space.text),
                     "holdout": None if opts.holdout is None else [opts.holdout, opts.holdout_by, opts.seed]}
    if _front_is_current(front_path, ckpt_sha, cache_sha, space.text, opts, read_record(out).get("search"),
                         search_inputs):
        _say(f"search: {front_path} is current, skipped")
    else:
        _say("search: every configuration, Ray Tune shards")
        opts.profiles = [str(profile_path)]
        opts.address = address
        # the space given, not the cache's: an edited grid (thresholds, max_exits, mode) is searched on the same cache
        search_to_front(cache_dir, front_path, opts, space_path=str(space_path))
    write_record(out, "search", search_inputs)
    timings["search"] = time.perf_counter() - t
    front, meta = read_front(front_path)
    plot_front(front, out / "pareto.png", title=f"{space.name}: MESS configurations on {data} (val)")

    robust = ROBUST_DEFAULT if robust is None else robust
    rule = f"{'robust: ' if robust else ''}cheapest within {tol_pp} pp of the reference"
    chosen = choose(front, tol_pp, robust=robust)
    model_path = out / "model.pt"
    t = time.perf_counter()
    if _model_is_current(model_path, chosen, ckpt_sha, cache_sha):
        _say(f"export: {model_path} holds {chosen['config_id']} of this front, skipped")
    else:
        _say(f"export: {chosen['config_id']} ({rule})")
        export_model(ckpt, front_path, chosen["config_id"], model_path)
    write_record(out, "export", {"config_id": chosen["config_id"], "rule": rule,
                                 "front_sha256": sha256_file(front_path), "checkpoint_sha256": ckpt_sha})
    timings["export"] = time.perf_counter() - t

    ref = front[front["is_reference"]].iloc[0]
    summary = {"space": str(space_path), "data": data, "out": str(out), "front_rows": int((~front["is_reference"]).sum()),
               "n_evaluated": meta.get("n_evaluated"), "reference": _row_summary(ref), "chosen": _row_summary(chosen),
               "exits": structure_report(single_exit_miou(cache), cache.positions),
               "learning_curve": learning_curve(out / "train_log.csv"),
               "rule": rule, "trust": trust_words(chosen, ref), "holdout": json.loads(meta.get("holdout") or "null"),
               "timings_s": timings}
    if evaluate_models:
        t = time.perf_counter()
        _say("evaluate: the exported model and the original, batch 1, on the cached split")
        # Equal numerics: the cache's batch size and torch thread count (CPU convolutions pick kernels by threads).
        threads = (cache.meta.get("workers") or [{}])[0].get("threads", 1)
        measured, original = evaluate_side_by_side([str(model_path), str(ckpt)], data, "val", device=device,
                                                   progress=False, threads=threads)
        summary["measured"] = {k: getattr(measured, k) for k in ("miou", "pixel_acc", "exit_rates", "mean_gmacs",
                                                       "latency_ms_median", "latency_ms_p90")}
        summary["measured_reference"] = {k: getattr(original, k) for k in ("miou", "mean_gmacs", "latency_ms_median")}
        # with a hold-out the front's figures cover the search part only, the measurement the whole split
        summary["exact"] = None if summary["holdout"] else bool(
            measured.miou == chosen["miou"] and measured.mean_gmacs == chosen["mean_gmacs"]
            and list(measured.exit_rates) == list(chosen["exit_rates"]))
        timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    atomic_write_text(out / "summary.md", format_summary_md(summary))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=float))
    return summary


def train_stage(space, data: str, out: Path, epochs: int | None = None, device: str = "cpu",
                address: str | None = None, init_checkpoint: str | None = None) -> Path:
    """The pipeline's training (both stages) into `out`; returns out/mess.pt. Skipped when mess.pt was trained from
    these inputs (MessError when from others), resumed when train_state.pt holds an interrupted training."""
    ckpt, state = out / "mess.pt", out / "train_state.pt"
    if ckpt.exists():
        trained = read_checkpoint(ckpt)  # a broken file is an error, not a silent retrain
        check_trained(ckpt, trained, space, data, epochs)
        init_sha = trained.get("extra", {}).get("init", {}).get("sha256")
        if init_checkpoint and (not Path(init_checkpoint).is_file() or init_sha != sha256_file(init_checkpoint)):
            raise MessError(f"--init-checkpoint {init_checkpoint}: {ckpt} exists and was not trained from it; "
                            f"use another --out, or remove {ckpt} and {state} to retrain")
        _say(f"train: {ckpt} exists, skipped")
        return ckpt
    resume = state.exists()
    train_space = interrupted_training(state, space, data, epochs, init_checkpoint) if resume else space
    _say(f"train: resuming the interrupted training in {state}" if resume else
         "train: stage 1 (exit-aware backbone), then stage 2 (every candidate head)")
    return train(train_space, data, out, stage="both", epochs=epochs, device=device, address=address,
                 init_checkpoint=init_checkpoint, resume=resume)


def learning_curve(log_path: Path) -> list[float]:
    """The original model's val mIoU after each epoch that trained the backbone (stage 1, plain or joint)."""
    if not Path(log_path).exists():
        return []
    with open(log_path, newline="") as f:
        return [float(r["miou:final"]) for r in csv.DictReader(f) if r["stage"] != "2"]


def _row_summary(row) -> dict:
    d = {"config_id": row["config_id"], "kind": row["kind"], "positions": list(row["positions"]),
         "heads": list(row["heads"]), "thresholds": [float(t) for t in row["thresholds"]],
         "miou": float(row["miou"]), "mean_gmacs": float(row["mean_gmacs"]), "speedup": float(row["speedup"]),
         "miou_delta_pp": float(row["miou_delta_pp"]), "exit_rates": [float(r) for r in row["exit_rates"]]}
    for dev in latency_devices_of(row):
        d[f"latency_ms_{dev}"] = float(row[f"latency_ms_{dev}"])
    for c in row.index:
        if c in TRUST_COLUMNS or (c.startswith("latency_ms_") and c[-3:] in ("_lo", "_hi")):
            v = row[c]
            d[c] = [float(x) for x in v] if hasattr(v, "__len__") else (bool(v) if c == "fragile" else float(v))
    return d


def format_summary_md(s: dict) -> str:
    """The run's summary as a short Markdown page (also what the command prints at the end)."""
    ref, ch = s["reference"], s["chosen"]
    lat = [f"latency_ms_{d}" for d in latency_devices_of(list(ref))]
    lines = [f"# messearch run: {s['space']} on {s['data']}", "",
             f"Front: {s['front_rows']} configurations (of {s['n_evaluated']} evaluated) plus the reference.", "",
             "| | config | mIoU | GMACs | speed-up |" + "".join(f" {c} |" for c in lat),
             "|---|---|---|---|---|" + "---|" * len(lat)]
    for name, r in (("reference", ref), (f"chosen ({s.get('rule', 'cheapest within 0.5 pp')})", ch)):
        lines.append(f"| {name} | {r['config_id']} | {r['miou'] * 100:.2f}% | {r['mean_gmacs']:.4f} | "
                     f"{r['speedup']:.2f}x |" + "".join(f" {r[c]:.2f} |" for c in lat))
    exits = exits_text(ch["positions"], ch["heads"], ch["thresholds"])
    lines += ["", f"Chosen exits: {exits}; exit rates {', '.join(f'{r:.2f}' for r in ch['exit_rates'])} (final last)."]
    if s.get("exits"):
        e = s["exits"]
        lines += ["", f"Single exits (every image leaves there), val mIoU: final head {e['final'] * 100:.2f}%, best exit "
                      f"at the shallowest position {e['best_shallowest'] * 100:.2f}%, best before the last stage "
                      f"{e['best_before_last_stage'] * 100:.2f}%, best overall {e['best_exit'] * 100:.2f}%; mean per stage "
                      + ", ".join(f"{k} {v * 100:.2f}%" for k, v in e["stage_means"].items()) + "."]
    if s.get("learning_curve"):
        lines += ["", "Original model's val mIoU after each backbone epoch (train_log.csv): "
                      + ", ".join(f"{v * 100:.1f}%" for v in s["learning_curve"]) + "."]
    if s.get("trust"):
        lines += ["", "How far to trust it:", ""] + [f"- {t}" for t in s["trust"]]
    if "measured" in s:
        m, mr = s["measured"], s["measured_reference"]
        lines += ["", f"Measured (exported model, batch 1): mIoU {m['miou'] * 100:.2f}%, {m['mean_gmacs']:.4f} GMACs, "
                      f"latency median {m['latency_ms_median']:.2f} ms (p90 {m['latency_ms_p90']:.2f} ms); original model: "
                      f"mIoU {mr['miou'] * 100:.2f}%, {mr['mean_gmacs']:.4f} GMACs, {mr['latency_ms_median']:.2f} ms.",
                  "", f"Measured mIoU, GMACs and exit rates equal the front's prediction exactly: {s['exact']}."
                  if s["exact"] is not None else "\nThe front's figures cover the search part only (hold-out), the "
                  "measured ones the whole split: they are not compared."]
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["timings_s"].items())]
    return "\n".join(lines) + "\n"
