"""Running the search: the shard plan, the in-process driver (search_local) and the Ray Tune driver (run_search)
over the same shards, and the entry point `search_to_front` (a cache folder in, pareto.parquet out).

The evaluator is `search`; merging the shards' candidates into the front and writing it is `front`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .cache_format import CacheArrays, load_cache
from .costs import mac_table
from .errors import MessError
from .files import atomic_write_text, sha256_text
from .front import finish_front, rows_to_frame, write_front
from . import search_size
from .profile import check_profile_fits, load_profile
from .provenance import policy_record, reconcile_space
from .ray_runtime import connect
from .search import evaluate_items, prepare, reference_rows
from .search_shard import _shard_trial, evaluate_shard, for_trials, fresh_keep_all
from .search_spec import SearchSpec, assign_shards, plan_items
from .shard_front import FrontSink, concat_rows
from .space import load_space, space_from_text
from . import trust


# ------------------------------------------------------------------------------------------ size and shards

def evaluate_configs(cache: CacheArrays, spec: SearchSpec, macs, latencies=None, shards: int = 1) -> pd.DataFrame:
    """Every configuration of the space (reference row first) with all front columns; for small spaces and checks.
    The work items are evaluated shard by shard (as a search with `shards` shards would), rows concatenated."""
    prep = prepare(cache, spec, macs, latencies)
    parts = []

    class _All(FrontSink):
        emit_all = True

        def take(self, rows, n_evaluated):
            parts.append(rows)
    for items in assign_shards(plan_items(spec), shards, spec.thresholds_mode == "shared"):
        evaluate_items(prep, items, _All(prep))
    ref = reference_rows(prep)
    return rows_to_frame(prep, concat_rows([ref] + parts), ref)


def _check_shards(shards) -> None:
    """MessError unless the shard count is a whole number >= 1."""
    if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
        raise MessError(f"shards {shards!r} must be a whole number >= 1")


def search_local(cache: CacheArrays, spec: SearchSpec, macs, latencies=None, shards: int = 1, keep_all_dir=None,
                 force: bool = False, verbose: bool = False) -> pd.DataFrame:
    """The search without Ray: the same shards and merge, run one after another in this process."""
    t0 = time.perf_counter()
    _check_shards(shards)
    prep = prepare(cache, spec, macs, latencies)
    items = plan_items(spec)
    est = search_size.estimate(prep, spec, items, 1)
    search_size.check(est, force, None)
    if verbose:
        print(f"search: {search_size.describe(est)}", file=sys.stderr, flush=True)
    parts, total = [], 0
    fresh_keep_all(keep_all_dir)
    for i, items in enumerate(assign_shards(items, shards, spec.thresholds_mode == "shared")):
        rows, n = evaluate_shard(prep, items, keep_all_dir, f"shard{i}")
        parts.append(rows)
        total += n
    df = finish_front(prep, spec, parts)
    df.attrs.update(n_evaluated=total, seconds=time.perf_counter() - t0)
    return df


# ------------------------------------------------------------------------------------------------- Ray Tune

def _progress_callback(total: int):
    from ray import tune

    class Progress(tune.Callback):
        """Prints configurations evaluated and the size of the shards' fronts (before the merge)."""

        def __init__(self):
            self.latest = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.latest[trial.trial_id] = (result.get("n_evaluated", 0), result.get("front_size", 0))
            done = sum(v[0] for v in self.latest.values())
            front = sum(v[1] for v in self.latest.values())
            print(f"search: {done:,}/{total:,} configurations evaluated, {front:,} front candidates",
                  file=sys.stderr, flush=True)
    return Progress()


def _read_plan(key_file: Path) -> dict:
    """The plan file of an earlier run ({"key", "n_shards"}), or {} when there is none or it is unreadable."""
    try:
        d = json.loads(key_file.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _plan_key(spec: SearchSpec, n_shards: int, cache: CacheArrays) -> str:
    """What a resumed run must share with the run it continues (not the evaluator: the rows are the same)."""
    spec = dataclasses.replace(spec, evaluator="auto")
    text = repr((spec, n_shards, cache.n_images, cache.image_ids[:3], cache.image_ids[-3:]))
    return sha256_text(text)


def run_search(cache: CacheArrays, spec: SearchSpec, macs, latencies=None, shards: int | None = None,
               address: str | None = None, keep_all_dir=None, resume: bool = False, storage_path=None,
               force: bool = False, name: str = "messearch_search", verbose: bool = True) -> pd.DataFrame:
    """Search with Ray Tune: one trial per shard, the cache shared once through the object store, merged front out.

    Reuses a running Ray; otherwise joins `address` / RAY_ADDRESS, or starts a local Ray. df.attrs holds
    n_evaluated and seconds. resume=True continues the run stored at storage_path/name (Tuner.restore).
    """
    t0 = time.perf_counter()
    if shards is not None:
        _check_shards(shards)
    ray = connect(address, what="`messearch search` (Ray Tune)", instead="search in this process with --local")
    from ray import tune
    cores = int(ray.cluster_resources().get("CPU", 1))
    prep = prepare(cache, spec, macs, latencies)   # validates everything before any trial starts
    items = plan_items(spec)
    est = search_size.estimate(prep, spec, items, cores)
    search_size.check(est, force, address or os.environ.get("RAY_ADDRESS"))
    storage_path = os.path.abspath(storage_path or tempfile.mkdtemp(prefix="messearch-tune-"))
    exp = os.path.join(storage_path, name)
    key_file = Path(storage_path) / f"{name}.plan"
    stored = _read_plan(key_file) if resume else {}
    # the shard count follows the measured rate; a resumed run keeps the count it started with
    n_shards = int(shards or stored.get("n_shards") or search_size.n_shards(est, cores))
    if verbose:
        print(f"search: {search_size.describe(est)}; {n_shards} shard(s)", file=sys.stderr, flush=True)
    plan = assign_shards(items, n_shards, spec.thresholds_mode == "shared")
    if keep_all_dir is not None:
        keep_all_dir = os.path.abspath(keep_all_dir)
        print(f"warning: --keep-all writes all {est['n_configs']:,} configurations (about "
              f"{est['n_configs'] * 150 / 2**20:,.0f} MiB) to {keep_all_dir}", file=sys.stderr)
    key = _plan_key(spec, n_shards, cache)
    trainable = tune.with_resources(
        tune.with_parameters(_shard_trial, prep=for_trials(prep), keep_all_dir=keep_all_dir), {"cpu": 1})
    # Each trial's work items are in its config, so ResultGrid.get_dataframe() says what every trial did.
    work = [{"index": i, "items": [list(it) for it in items]} for i, items in enumerate(plan)]
    # An experiment interrupted before Tune saved its first state has a tuner.pkl but nothing to restore (a
    # restore would then run trials without their config): start it again.
    restorable = tune.Tuner.can_restore(exp) and any(Path(exp).glob("experiment_state-*.json"))
    if resume and restorable:
        if stored.get("key") != key:
            raise MessError(f"cannot resume {exp}: it was started with another space, cache or shard count")
        tuner = tune.Tuner.restore(exp, trainable=trainable, resume_errored=False, restart_errored=True)
    else:
        shutil.rmtree(exp, ignore_errors=True)   # never mix trials of an earlier run into this one
        Path(storage_path).mkdir(parents=True, exist_ok=True)
        atomic_write_text(key_file, json.dumps({"key": key, "n_shards": n_shards}))
        fresh_keep_all(keep_all_dir)
        tuner = tune.Tuner(
            trainable, param_space={"shard": tune.grid_search(work)},
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=2),
                                      callbacks=[_progress_callback(est["n_configs"])] if verbose else None))
    grid = tuner.fit()
    results = list(grid)
    if grid.errors:
        raise grid.errors[0]   # the trial's own error; the CLI prints its message and logs the remote stack
    if any(r.checkpoint is None or not (r.metrics or {}).get("done") for r in results):
        # Tune caught Ctrl+C (or SIGTERM, delivered as Ctrl+C), stopped the trials and saved its state
        raise KeyboardInterrupt
    parts, total, cpu_s, thread_s, rss, eval_s, kernels_s = [], 0, 0.0, 0.0, 0.0, [], []
    for result in results:
        with result.checkpoint.as_directory() as d:
            with np.load(os.path.join(d, "rows.npz"), allow_pickle=False) as z:
                parts.append({k: z[k] for k in z.files})
        total += int(result.metrics.get("n_evaluated", 0))
        cpu_s += float(result.metrics.get("cpu_s", 0.0))
        thread_s += float(result.metrics.get("thread_cpu_s", 0.0))
        rss = max(rss, float(result.metrics.get("max_rss_mb", 0.0)))
        eval_s.append(float(result.metrics.get("eval_s", 0.0)))
        kernels_s.append(float(result.metrics.get("kernels_s", 0.0)))
    df = finish_front(prep, spec, parts)
    # shard_cpu_s: CPU seconds the shards spent evaluating (configurations per CPU second = per-core speed), of
    # which shard_thread_cpu_s in the evaluating thread (the rest: other threads, Ray's or BLAS's);
    # shard_eval_s: each shard's evaluation wall time; shard_kernels_s: each trial's load of the compiled kernel
    # before it; trial_max_rss_mb: the largest trial process's peak memory
    df.attrs.update(n_evaluated=total, seconds=time.perf_counter() - t0, shard_cpu_s=cpu_s,
                    shard_thread_cpu_s=thread_s, shard_eval_s=eval_s, shard_kernels_s=kernels_s, trial_max_rss_mb=rss)
    return df


# ---------------------------------------------------------------------------------------- the entry point

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
    bootstrap: int = 200              # resamples of the front rows' intervals (0: none); see messearch.trust
    seed: int = 0                     # of the resamples and of the hold-out split
    holdout: float | None = None      # share of the cached images kept out of the search, to check its rows
    holdout_by: str = "image"         # image | group (file-name prefix: CamVid sequence, Cityscapes city)
    evaluator: str = "auto"           # search_spec.EVALUATORS: how; the rows are the same


def check_options(opts: SearchOptions) -> None:
    """MessError naming the first search option out of range (before any stage reads a cache or trains)."""
    if opts.bootstrap < 0:
        raise MessError(f"--bootstrap {opts.bootstrap}: the number of resamples must be 0 (none) or more")
    if opts.shards is not None and opts.shards < 1:
        raise MessError(f"--shards {opts.shards}: allowed an integer >= 1 (Ray Tune trials)")
    if opts.seed < 0:   # numpy's generators take no negative seed
        raise MessError(f"--seed {opts.seed}: allowed an integer >= 0")
    if opts.holdout is not None:
        trust.check_holdout(opts.holdout, opts.holdout_by)


def search_spec_for(space, opts: SearchOptions, policy=None):
    """The SearchSpec of a space, with the options' overrides and constraints; `policy` (default the space's) is the
    exit policy the search reads from the cache."""
    policy = policy or space.policy
    if opts.max_exits is not None and not 1 <= opts.max_exits <= len(space.positions):
        raise MessError(f"--max-exits {opts.max_exits}: allowed 1 to {len(space.positions)} (the number of candidate "
                        f"positions of {space.source})")
    return SearchSpec(positions=list(space.positions), heads=space.head_names, thresholds=tuple(space.thresholds),
                      max_exits=opts.max_exits or space.max_exits, thresholds_mode=opts.thresholds,
                      mode=opts.mode or space.mode, policy_kind=policy.kind,
                      pixel_threshold_bin=policy.pixel_threshold_bin, max_gmacs=opts.max_gmacs,
                      max_latency_ms=dict(opts.max_latency_ms), min_miou=opts.min_miou,
                      max_miou_drop_pp=opts.max_miou_drop_pp, evaluator=opts.evaluator)


def search_to_front(cache_dir, out, opts: SearchOptions | None = None, space_path: str | None = None):
    """Search every configuration over a cache and write the front to `out` (pareto.parquet); returns the DataFrame.

    The figures follow the cache's own space and policy: a `space_path` may change only the search's grid
    (thresholds, max_exits, mode), or the policy's bins by an exact conversion (provenance.reconcile_space)."""
    opts = opts or SearchOptions()
    check_options(opts)
    cache = load_cache(cache_dir)
    check, trust_meta = None, {}
    if opts.holdout is not None:   # the front is formed on the search part; its rows are checked on the rest
        cache, check, trust_meta = trust.split_cache(cache, opts.holdout, opts.holdout_by, opts.seed)
    cached_space = space_from_text(cache.meta["space_text"],
                                   cache.meta.get("space_source") or f"{cache_dir} (space of the cache)")
    space, policy, conversion = cached_space, cached_space.policy, ""
    if space_path:
        space = load_space(space_path)
        policy, conversion = reconcile_space(space, cached_space, cache_dir)
    latencies, device_names = {}, {}
    for path in opts.profiles:
        # The file's stem (profiles/<device>.parquet) names the column latency_ms_<device>: short and typeable.
        device_name, table = load_profile(path)
        check_profile_fits(path, space)
        key = Path(path).stem
        if key in latencies:
            raise MessError(f"{path}: two profiles named {key!r}; name each profile file after its device")
        if table.positions != list(space.positions) or table.heads != space.head_names:
            raise MessError(f"{path}: the profile's positions or heads differ from the cache's space")
        latencies[key], device_names[key] = table, device_name
    spec = search_spec_for(space, opts, policy)
    macs = mac_table(space)
    keep_all_dir = Path(out).with_name(Path(out).stem + "_all") if opts.keep_all else None
    t0 = time.perf_counter()
    if opts.local:
        df = search_local(cache, spec, macs, latencies, shards=opts.shards or 1, keep_all_dir=keep_all_dir,
                          force=opts.force, verbose=True)
    else:
        storage = Path(out).resolve().parent / "tune"
        df = run_search(cache, spec, macs, latencies, shards=opts.shards, address=opts.address,
                        keep_all_dir=keep_all_dir, resume=opts.resume, storage_path=str(storage), force=opts.force)
    df, more = trust.annotate(df, cache, spec, macs, latencies, check=check, resamples=opts.bootstrap, seed=opts.seed)
    trust_meta.update(more)
    meta = {
        "space_text": space.text, "space_source": space.source,
        "checkpoint_sha256": cache.meta.get("checkpoint_sha256", ""), "cache_sha256": cache.meta.get("cache_sha256", ""),
        "mode": spec.mode, "thresholds": spec.thresholds_mode, "max_exits": spec.max_exits,
        # what the figures were computed from: the policy read (on the cache's bins), the cache's exits, the grid
        "policy": policy_record(policy), "policy_conversion": conversion, "exits": json.dumps(cache.meta.get("exits")),
        "threshold_grid": json.dumps([float(t) for t in spec.thresholds]),
        "data": cache.meta.get("data", ""), "split": cache.meta.get("split", ""),
        "n_images": cache.n_images, "n_evaluated": df.attrs.get("n_evaluated", ""),
        "seconds": f"{df.attrs.get('seconds', time.perf_counter() - t0):.3f}",
        "profiles": json.dumps(device_names), "keep_all_dir": str(keep_all_dir or ""), **trust_meta,
    }
    write_front(df, out, meta)
    return df
