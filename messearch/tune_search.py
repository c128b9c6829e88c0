"""Drivers of the search: Ray Tune over coarse shards (run_search) or the same shards in-process (search_local),
then the global merge into the Pareto front DataFrame of DESIGN.md."""

from __future__ import annotations

import hashlib
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .cache import CacheArrays
from .errors import MessError
from .pareto import config_id, pareto_select
from .search import (ASSUMED_RATE_PER_CORE, KIND_NAMES, KIND_REFERENCE, KIND_STATIC, FrontSink, Prepared,
                     SearchSpec, block_rows, concat_rows, evaluate_items, objectives, prepare, reference_rows,
                     take_rows)


# ------------------------------------------------------------------------------------------ size and shards

def plan_items(spec: SearchSpec) -> list[tuple]:
    """Work items with their size: ("tree", t_root, first_position, n_configs), plus ("static", n) in single mode."""
    p, h, t, k = len(spec.positions), len(spec.heads), len(spec.thresholds), int(spec.max_exits)
    per_t = 1 if spec.thresholds_mode == "shared" else t
    items = []
    for t_root in range(t):
        for p1 in range(p):
            size = h * sum(math.comb(p - 1 - p1, j) * (h * per_t) ** j for j in range(k))
            items.append(("tree", t_root, p1, size))
    if spec.mode == "single":
        items.append(("static", p * h))
    return items


def assign_shards(items: list[tuple], n_shards: int) -> list[list[tuple]]:
    """Longest-processing-time assignment of items to n_shards (deterministic)."""
    n_shards = max(1, int(n_shards))
    shards = [[] for _ in range(n_shards)]
    load = [0] * n_shards
    for item in sorted(items, key=lambda it: (-it[-1], it)):
        i = min(range(n_shards), key=lambda j: (load[j], j))
        shards[i].append(item)
        load[i] += item[-1]
    return shards


def estimate(spec: SearchSpec, n_images: int, n_classes: int, cores: int = 1) -> dict:
    """Size of the search: configurations, expected seconds on `cores`, and peak bytes of one shard."""
    n_cfg = spec.n_configs()
    p, h, t = len(spec.positions), len(spec.heads), len(spec.thresholds)
    tc = 1 if spec.thresholds_mode == "shared" else t
    w = 2 * n_classes + 1
    d_bytes = n_images * p * h * tc * w * 8 * 2
    # the largest prefix group: prefixes of max_exits-1 exits ending at one position, all threshold choices
    k1 = max(0, int(spec.max_exits) - 1)
    rows = max((math.comb(q, k1 - 1) if k1 else 1) * h ** k1 * tc ** k1 for q in range(p)) if k1 else 1
    s_bytes = rows * n_images * 9 + 4_000_000 * 8 * 6
    return {"n_configs": n_cfg, "seconds": n_cfg / (ASSUMED_RATE_PER_CORE * max(1, cores)),
            "bytes": int(d_bytes + s_bytes)}


def check_size(spec: SearchSpec, n_images: int, n_classes: int, cores: int, force: bool,
               max_seconds: float = 3600.0, max_bytes: int | None = None) -> dict:
    """Refuse (MessError with the estimate) a space that would take too long or too much memory, unless force."""
    est = estimate(spec, n_images, n_classes, cores)
    if max_bytes is None:
        try:
            max_bytes = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") * 0.5)
        except (ValueError, OSError):
            max_bytes = 8 << 30
    if not force and (est["seconds"] > max_seconds or est["bytes"] > max_bytes):
        raise MessError(
            f"the space has {est['n_configs']:,} configurations: about {est['seconds']:.0f} s on {cores} core(s) and "
            f"{est['bytes'] / 2**30:.1f} GiB per shard (limits {max_seconds:.0f} s, {max_bytes / 2**30:.1f} GiB); "
            "shrink it (fewer exits, positions, heads or thresholds; shared thresholds) or pass --force")
    return est



# ------------------------------------------------------------------------------------------ rows -> frame

def _row_parts(prep: Prepared, rows: dict, i: int):
    k, kind = int(rows["n_exits"][i]), int(rows["kind"][i])
    h = len(prep.heads)
    ex = rows["exits"][i, :k]
    positions = [prep.positions[e // h] for e in ex]
    heads = [prep.heads[e % h] for e in ex]
    if kind == KIND_STATIC:
        thresholds = [0.0]
    else:
        thresholds = [float(prep.thresholds[t]) for t in rows["tidx"][i, :k]]
    return KIND_NAMES[kind], positions, heads, thresholds


def row_ids(prep: Prepared, rows: dict, idx) -> list[str]:
    """config_id of the rows at idx."""
    return [config_id(*_row_parts(prep, rows, int(i))) for i in idx]


def rows_to_frame(prep: Prepared, rows: dict, ref: dict) -> pd.DataFrame:
    """The DESIGN.md columns (plus kind and latency_ms_<device>) for rows, relative to the reference row `ref`."""
    n = prep.n
    recs = []
    for i in range(len(rows["miou"])):
        kind, positions, heads, thresholds = _row_parts(prep, rows, i)
        k = len(positions)
        rates = [int(x) / n for x in rows["n_at"][i, :k]] + [int(rows["n_final"][i]) / n]
        recs.append((config_id(kind, positions, heads, thresholds), kind, k, positions, heads, thresholds, rates))
    df = pd.DataFrame(recs, columns=["config_id", "kind", "n_exits", "positions", "heads", "thresholds", "exit_rates"])
    df["miou"] = rows["miou"]
    df["pixel_acc"] = rows["pixel_acc"]
    df["mean_gmacs"] = rows["mean_gmacs"]
    df["speedup"] = ref["macsum"][0] / rows["macsum"]
    df["miou_delta_pp"] = (rows["miou"] - ref["miou"][0]) * 100
    df["is_reference"] = rows["kind"] == KIND_REFERENCE
    for dev in prep.devices:
        df[f"latency_ms_{dev}"] = rows[f"lat_{dev}"]
    cols = ["config_id", "kind", "n_exits", "positions", "heads", "thresholds", "miou", "pixel_acc", "mean_gmacs",
            "exit_rates", "speedup", "miou_delta_pp", "is_reference"] + [f"latency_ms_{d}" for d in prep.devices]
    return df[cols]


def _feasible(rows: dict, spec: SearchSpec, ref_miou: float) -> np.ndarray:
    ok = np.ones(len(rows["miou"]), dtype=bool)
    if spec.max_gmacs is not None:
        ok &= rows["mean_gmacs"] <= spec.max_gmacs
    for dev, ms in (spec.max_latency_ms or {}).items():
        ok &= rows[f"lat_{dev}"] <= ms
    if spec.min_miou is not None:
        ok &= rows["miou"] >= spec.min_miou
    if spec.max_miou_drop_pp is not None:
        ok &= (rows["miou"] - ref_miou) * 100 >= -spec.max_miou_drop_pp
    return ok


def _violation(df: pd.DataFrame, spec: SearchSpec) -> np.ndarray:
    """Sum of relative constraint violations of each row (0 when feasible), to show the nearest rows."""
    v = np.zeros(len(df))
    if spec.max_gmacs is not None:
        v += np.maximum(0, df["mean_gmacs"] - spec.max_gmacs) / max(spec.max_gmacs, 1e-12)
    for dev, ms in (spec.max_latency_ms or {}).items():
        v += np.maximum(0, df[f"latency_ms_{dev}"] - ms) / max(ms, 1e-12)
    if spec.min_miou is not None:
        v += np.maximum(0, spec.min_miou - df["miou"]) / max(spec.min_miou, 1e-12)
    if spec.max_miou_drop_pp is not None:
        v += np.maximum(0, -spec.max_miou_drop_pp - df["miou_delta_pp"]) / 100
    return np.asarray(v)


def finish_front(prep: Prepared, spec: SearchSpec, parts: list[dict]) -> pd.DataFrame:
    """Merge shard candidates into the global front (deterministic ties), apply the constraints, add the reference."""
    ref = reference_rows(prep)
    rows = concat_rows([ref] + [p for p in parts if p and len(p["miou"])])
    win = pareto_select(objectives(rows, prep.devices), rows["n_exits"], lambda idx: row_ids(prep, rows, idx))
    sel = win[(rows["kind"][win] != KIND_REFERENCE) & _feasible(take_rows(rows, win), spec, ref["miou"][0])]
    if spec.has_constraints and len(sel) == 0:
        near = rows_to_frame(prep, take_rows(rows, win), ref)
        near = near.assign(_v=_violation(near, spec)).sort_values(["_v", "mean_gmacs"]).drop(columns="_v").head(5)
        shown = ["config_id", "n_exits", "miou", "miou_delta_pp", "mean_gmacs"] + [c for c in near if c.startswith("latency_ms_")]
        raise MessError("no configuration meets the constraints "
                        f"(max_gmacs={spec.max_gmacs}, max_latency_ms={spec.max_latency_ms or None}, "
                        f"min_miou={spec.min_miou}, max_miou_drop_pp={spec.max_miou_drop_pp}); nearest rows of the "
                        f"unconstrained front:\n{near[shown].to_string(index=False)}")
    df = rows_to_frame(prep, take_rows(rows, np.concatenate([[0], sel]).astype(np.int64)), ref)
    df = df.sort_values(["mean_gmacs", "miou", "n_exits", "config_id"], ascending=[True, False, True, True])
    return df.reset_index(drop=True)


# -------------------------------------------------------------------------------------------- in-process

def _keep_all_writer(prep: Prepared, keep_all_dir, tag: str):
    """A function writing rows to a Parquet dataset partitioned by n_exits (files named by shard)."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    counter = [0]
    ref = reference_rows(prep)

    def write(rows: dict) -> None:
        df = rows_to_frame(prep, rows, ref)
        ds.write_dataset(pa.Table.from_pandas(df, preserve_index=False), str(keep_all_dir), format="parquet",
                         partitioning=["n_exits"], partitioning_flavor="hive",
                         basename_template=f"{tag}-{counter[0]}-{{i}}.parquet", existing_data_behavior="overwrite_or_ignore")
        counter[0] += 1
    return write


def evaluate_shard(prep: Prepared, items, keep_all_dir=None, tag: str = "shard0", progress=None) -> tuple[dict, int]:
    """Evaluate one shard's items: its non-dominated rows (ties kept) and the number of configurations evaluated."""
    sink = FrontSink(prep, keep_all=keep_all_dir is not None)
    writer = _keep_all_writer(prep, keep_all_dir, tag) if keep_all_dir is not None else None

    def flush(s):
        if writer is not None and s.all_parts:
            writer(concat_rows(s.all_parts))
            s.all_parts = []
        if progress is not None:
            progress(s)
    evaluate_items(prep, items, sink, flush)
    flush(sink)
    return sink.rows(), sink.n_evaluated


def evaluate_configs(cache: CacheArrays, spec: SearchSpec, macs, latencies=None) -> pd.DataFrame:
    """Every configuration of the space (reference row first) with all front columns; for small spaces and checks."""
    prep = prepare(cache, spec, macs, latencies)
    parts = []

    class _All(FrontSink):
        def add(self, rows):
            parts.append(rows)

        def block(self, b):
            parts.append(block_rows(prep, b, np.arange(b.size)))
    sink = _All(prep)
    evaluate_items(prep, plan_items(spec), sink)
    ref = reference_rows(prep)
    return rows_to_frame(prep, concat_rows([ref] + parts), ref)


def search_local(cache: CacheArrays, spec: SearchSpec, macs, latencies=None, shards: int = 1, keep_all_dir=None,
                 force: bool = False) -> pd.DataFrame:
    """The search without Ray: the same shards and merge, run one after another in this process."""
    t0 = time.perf_counter()
    check_size(spec, cache.n_images, cache.gt.shape[1], 1, force)
    prep = prepare(cache, spec, macs, latencies)
    parts, total = [], 0
    for i, items in enumerate(assign_shards(plan_items(spec), shards)):
        rows, n = evaluate_shard(prep, items, keep_all_dir, f"shard{i}")
        parts.append(rows)
        total += n
    df = finish_front(prep, spec, parts)
    df.attrs.update(n_evaluated=total, seconds=time.perf_counter() - t0)
    return df


# ------------------------------------------------------------------------------------------------- Ray Tune

def _shard_trial(config, cache=None, spec=None, macs=None, latencies=None, plan=None, keep_all_dir=None):
    """One Tune trial: evaluate shard config["shard"], send its front candidates back in a checkpoint."""
    from ray import tune
    shard = int(config["shard"])
    prep = prepare(cache, spec, macs, latencies)
    last = [0.0]

    def progress(sink):
        if time.monotonic() - last[0] > 1.0:   # a report costs a round trip: at most one a second
            last[0] = time.monotonic()
            tune.report({"n_evaluated": sink.n_evaluated, "front_size": sink.size, "done": False})
    cpu0, wall0 = time.process_time(), time.perf_counter()
    rows, n = evaluate_shard(prep, plan[shard], keep_all_dir, f"shard{shard}", progress)
    with tempfile.TemporaryDirectory() as d:
        np.savez(os.path.join(d, "rows.npz"), **(rows or {}))
        tune.report({"n_evaluated": n, "front_size": len(rows.get("miou", [])), "done": True,
                     "cpu_s": time.process_time() - cpu0, "eval_s": time.perf_counter() - wall0,
                     "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
                    checkpoint=tune.Checkpoint.from_directory(d))


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


def _plan_key(spec: SearchSpec, n_shards: int, cache: CacheArrays) -> str:
    text = repr((spec, n_shards, cache.n_images, cache.image_ids[:3], cache.image_ids[-3:]))
    return hashlib.sha256(text.encode()).hexdigest()


def run_search(cache: CacheArrays, spec: SearchSpec, macs, latencies=None, shards: int | None = None,
               address: str | None = None, keep_all_dir=None, resume: bool = False, storage_path=None,
               force: bool = False, name: str = "messearch_search", verbose: bool = True) -> pd.DataFrame:
    """Search with Ray Tune: one trial per shard, the cache shared once through the object store, merged front out.

    Reuses a running Ray; otherwise joins `address` / RAY_ADDRESS, or starts a local Ray. df.attrs holds
    n_evaluated and seconds. resume=True continues the run stored at storage_path/name (Tuner.restore).
    """
    import ray
    from ray import tune
    t0 = time.perf_counter()
    from .ray_runtime import connect
    connect(address)
    cores = int(ray.cluster_resources().get("CPU", 1))
    est = check_size(spec, cache.n_images, cache.gt.shape[1], cores, force)
    prep = prepare(cache, spec, macs, latencies)   # validates everything before any trial starts
    n_shards = int(shards or cores)
    plan = assign_shards(plan_items(spec), n_shards)
    if keep_all_dir is not None:
        keep_all_dir = os.path.abspath(keep_all_dir)
        print(f"warning: --keep-all writes all {est['n_configs']:,} configurations (about "
              f"{est['n_configs'] * 150 / 2**20:,.0f} MiB) to {keep_all_dir}", file=sys.stderr)
    storage_path = os.path.abspath(storage_path or tempfile.mkdtemp(prefix="messearch-tune-"))
    exp = os.path.join(storage_path, name)
    key_file = Path(storage_path) / f"{name}.plan"
    key = _plan_key(spec, n_shards, cache)
    trainable = tune.with_resources(
        tune.with_parameters(_shard_trial, cache=cache, spec=spec, macs=macs, latencies=latencies, plan=plan,
                             keep_all_dir=keep_all_dir), {"cpu": 1})
    if resume and tune.Tuner.can_restore(exp):
        if not key_file.exists() or key_file.read_text() != key:
            raise MessError(f"cannot resume {exp}: it was started with another space, cache or shard count")
        tuner = tune.Tuner.restore(exp, trainable=trainable, resume_errored=False, restart_errored=True)
    else:
        Path(storage_path).mkdir(parents=True, exist_ok=True)
        key_file.write_text(key)
        tuner = tune.Tuner(
            trainable, param_space={"shard": tune.grid_search(list(range(n_shards)))},
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=2),
                                      callbacks=[_progress_callback(est["n_configs"])] if verbose else None))
    grid = tuner.fit()
    if grid.errors:
        raise MessError(f"{len(grid.errors)} search shard(s) failed after retries: {grid.errors[0]}")
    parts, total, cpu_s, rss, eval_s = [], 0, 0.0, 0.0, []
    for result in grid:
        if result.checkpoint is None:
            raise MessError(f"search shard {result.config.get('shard')} finished without its result")
        with result.checkpoint.as_directory() as d:
            with np.load(os.path.join(d, "rows.npz"), allow_pickle=False) as z:
                parts.append({k: z[k] for k in z.files})
        total += int(result.metrics.get("n_evaluated", 0))
        cpu_s += float(result.metrics.get("cpu_s", 0.0))
        rss = max(rss, float(result.metrics.get("max_rss_mb", 0.0)))
        eval_s.append(float(result.metrics.get("eval_s", 0.0)))
    df = finish_front(prep, spec, parts)
    # shard_cpu_s: CPU seconds the shards spent evaluating (configurations per CPU second = per-core speed);
    # shard_eval_s: each shard's evaluation wall time; trial_max_rss_mb: the largest trial process's peak memory
    df.attrs.update(n_evaluated=total, seconds=time.perf_counter() - t0, shard_cpu_s=cpu_s, shard_eval_s=eval_s,
                    trial_max_rss_mb=rss)
    return df
