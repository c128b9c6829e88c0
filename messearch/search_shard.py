"""One shard's evaluation: in this process (`evaluate_shard`) and as a Ray Tune trial (`_shard_trial`). It imports
no torch (nor the cost model), so that a trial's process starts in a fraction of a second, not seconds."""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from .front import rows_to_frame
from .search import Prepared, evaluate_items, reference_rows
from .shard_front import FrontSink


def fresh_keep_all(keep_all_dir) -> None:
    """Empty the --keep-all folder before a search that is not resumed: its files must be this run's only."""
    if keep_all_dir is not None:
        shutil.rmtree(keep_all_dir, ignore_errors=True)


def _keep_all_writer(prep: Prepared, keep_all_dir, tag: str):
    """A function writing rows to a Parquet dataset partitioned by n_exits (files named by shard), each file
    atomically: written in a hidden folder (which readers skip), then moved into its partition."""
    counter = [0]
    ref = reference_rows(prep)

    def write(rows: dict) -> None:
        df = rows_to_frame(prep, rows, ref)
        tmp = Path(keep_all_dir) / f".{tag}-{counter[0]}.tmp"
        ds.write_dataset(pa.Table.from_pandas(df, preserve_index=False), str(tmp), format="parquet",
                         partitioning=["n_exits"], partitioning_flavor="hive",
                         basename_template=f"{tag}-{counter[0]}-{{i}}.parquet", existing_data_behavior="overwrite_or_ignore")
        for f in sorted(tmp.rglob("*.parquet")):
            dest = Path(keep_all_dir) / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
        shutil.rmtree(tmp)
        counter[0] += 1
    return write


def load_kernels(prep: Prepared, items) -> None:
    """A process's first call of the compiled kernel the items need (loaded from numba's cache, or compiled once per
    machine), on their smallest tree, so that the clocks of the evaluation proper start after it; none for the plain
    evaluator (search_plain)."""
    trees = [it for it in items if it[0] == "tree"]
    if trees and not prep.plain:
        evaluate_items(prep, [min(trees, key=lambda it: it[-1])], FrontSink(prep))


def evaluate_shard(prep: Prepared, items, keep_all_dir=None, tag: str = "shard0", progress=None) -> tuple[dict, int]:
    """Evaluate one shard's items: its non-dominated rows (ties kept) and the number of configurations evaluated."""
    sink = FrontSink(prep, _keep_all_writer(prep, keep_all_dir, tag) if keep_all_dir is not None else None)
    evaluate_items(prep, items, sink, progress)
    if sink.keep_all:
        sink.flush()
    return sink.rows(), sink.n_evaluated



def for_trials(prep: Prepared) -> Prepared:
    """The driver's Prepared as the trials receive it (through the object store): no tables a kernel memoised."""
    return dataclasses.replace(prep, memo={})


def _shard_trial(config, prep=None, keep_all_dir=None):
    """One Tune trial: evaluate the work items of config["shard"] ({index, items}) of the driver's Prepared (its
    arrays arrive read-only from the object store, so not prepared again: 0.1-0.3 s a trial), send its front
    candidates back in a checkpoint."""
    from ray import tune
    shard, items = int(config["shard"]["index"]), [tuple(it) for it in config["shard"]["items"]]
    # the kernels take a writeable copy of their rows: numba compiles a read-only array as another type
    prep = dataclasses.replace(prep, xt=np.array(prep.xt))
    last = [0.0]

    def progress(sink):
        if time.monotonic() - last[0] > 1.0:   # a report costs a round trip: at most one a second
            last[0] = time.monotonic()
            tune.report({"n_evaluated": sink.n_evaluated, "front_size": sink.size, "done": False})
    wall0 = time.perf_counter()
    load_kernels(prep, items)
    cpu0, thread0, wall1 = time.process_time(), time.thread_time(), time.perf_counter()
    rows, n = evaluate_shard(prep, items, keep_all_dir, f"shard{shard}", progress)
    with tempfile.TemporaryDirectory() as d:
        np.savez(os.path.join(d, "rows.npz"), **(rows or {}))
        # cpu_s and eval_s: the evaluation proper; kernels_s: the process's one load of the compiled kernel
        tune.report({"n_evaluated": n, "front_size": len(rows.get("miou", [])), "done": True,
                     "cpu_s": time.process_time() - cpu0, "thread_cpu_s": time.thread_time() - thread0,
                     "eval_s": time.perf_counter() - wall1,
                     "kernels_s": wall1 - wall0,
                     "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
                    checkpoint=tune.Checkpoint.from_directory(d))
