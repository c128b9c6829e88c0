"""Scaling of the per-exit search across Ray nodes: one JSON line.

A local multi-node Ray cluster (ray.cluster_utils.Cluster): a head with no CPU and 1, 2 and 4 worker nodes of
one CPU each run the per-exit reference search (benchmarks/search_throughput.py's random cache, 10 thresholds
per exit, 287,489,280 configurations) through Ray Tune. For each node count: the search time (cluster start
apart), the number of shards, the shards' evaluation times and their balance (slowest / mean), and whether
the front equals the one-node front. On a two-core machine the 4-node point runs four one-CPU nodes on two
cores: it shows that more shards than cores cost little, not more compute.

    PYTHONPATH=$PWD python benchmarks/search_scaling.py [--thresholds 10] [--nodes 1,2,4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import numpy as np

from search_throughput import HEADS, POSITIONS, random_cache, reference_macs

from messearch.search_spec import SearchSpec


def run_on_nodes(n_nodes: int, cache, spec, macs, workdir: str):
    """One search on a fresh cluster of n_nodes one-CPU workers: (figures, front)."""
    import ray
    from ray.cluster_utils import Cluster

    from messearch.search_driver import run_search
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(n_nodes):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    start_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            df = run_search(cache, spec, macs, storage_path=os.path.join(workdir, f"tune{n_nodes}"), verbose=False)
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
        cluster.shutdown()
    shard_s = np.array(df.attrs["shard_eval_s"])
    return {"nodes": n_nodes, "cluster_start_s": round(start_s, 1), "search_s": round(seconds, 1),
            "shards": len(shard_s), "shard_eval_s_max": round(float(shard_s.max()), 1),
            "shard_eval_s_mean": round(float(shard_s.mean()), 1),
            "shard_balance_slowest_over_mean": round(float(shard_s.max() / shard_s.mean()), 2),
            "evaluator_configs_per_cpu_s": round(df.attrs["n_evaluated"] / df.attrs["shard_cpu_s"]),
            "load_average_1min_after": round(os.getloadavg()[0], 1)}, df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--thresholds", type=int, default=10, help="thresholds per exit (10: 287,489,280 configurations)")
    ap.add_argument("--nodes", default="1,2,4", help="comma-separated worker node counts")
    args = ap.parse_args()
    cache, macs = random_cache(), reference_macs()
    spec = SearchSpec(positions=POSITIONS, heads=HEADS, max_exits=3, thresholds_mode="per-exit",
                      thresholds=tuple(np.round(np.linspace(0.5, 0.95, args.thresholds), 4)))
    out = {"n_configs": spec.n_configs(), "load_average_1_5_15_before": [round(x, 1) for x in os.getloadavg()],
           "cpu_count": os.cpu_count(), "runs": []}
    first = None
    with tempfile.TemporaryDirectory() as d:
        for n in [int(x) for x in args.nodes.split(",")]:
            figures, df = run_on_nodes(n, cache, spec, macs, d)
            first = df if first is None else first
            figures["front_equals_first"] = bool(df.equals(first))
            out["runs"].append(figures)
            print(json.dumps(figures), file=sys.stderr, flush=True)   # kept if a later run is cut short
    base = out["runs"][0]["search_s"]
    for r in out["runs"]:
        r["speedup_vs_first"] = round(base / r["search_s"], 2)
    out["load_average_1_5_15_after"] = [round(x, 1) for x in os.getloadavg()]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
