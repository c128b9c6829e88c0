"""A real multi-node run on one machine (issue 9): a local Ray cluster with a 0-CPU head and two 1-CPU workers.

Builds a cache with a worker node removed mid-run (its shard is retried elsewhere), checks the cache equals the
statistics computed in this process without Ray, then searches across the cluster (in-process and through the
`ray submit` entry script cluster/run.py) and checks both fronts equal the local front. Prints ONE JSON line;
exit status 0 only if every check holds. Run by tests/test_multinode.py in a subprocess (its own Ray).

    python tests/multinode_scenario.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SPACE = """
name: multinode
model: deeplabv3_resnet18
num_classes: 8
input_size: [32, 32]
data: synthetic:seed=0,train=8,val=24
positions: [backbone.layer1.1, backbone.layer2.1, backbone.layer3.1]
heads:
  - {name: lin, reduction: 4, layers: 0}
  - {name: c1, reduction: 4, layers: 1}
thresholds: {start: 0.5, stop: 0.9, num: 5}
max_exits: 2
train: {batch_size: 4, epochs_stage1: 1, epochs_stage2: 1, train_images: 8, val_images: 24}
"""
DATA = "synthetic:seed=0,train=8,val=24"
ARRAYS = ("tp", "pred", "gt", "conf_mean", "n_above", "n_pixels")


def make_checkpoint(out: Path) -> Path:
    """A random-weight MESS network of the tiny space, saved as a checkpoint (weights do not matter here)."""
    import torch

    from messearch.checkpoint import save_checkpoint
    from messearch.weights import build_mess_network
    from messearch.space import space_from_text

    torch.manual_seed(0)
    net = build_mess_network(space_from_text(SPACE, "<multinode>"))
    with torch.no_grad():
        # Random heads are nearly uniform over 8 classes; sharpen them so confidences cross the thresholds
        # and the front has more than one point.
        for name, p in net.named_parameters():
            if name.startswith("heads.") and ".classifier." in name:
                p.mul_(8.0)
    path = out / "mess.pt"
    save_checkpoint(path, net.eval(), DATA)
    return path


def node_of(ray, actor) -> str | None:
    """The node id (hex) an actor lives on, from the GCS actor table."""
    try:
        rec = ray._private.state.actors(actor_id=actor._actor_id.hex())
        return rec["Address"]["NodeID"]
    except Exception:   # the table's layout is private; fall back to any worker node
        return None


def single_node_reference(ckpt: Path) -> dict:
    """The cache's rows computed in this process, without Ray: the actors' own code, at 1 thread like them."""
    import torch

    from messearch.cache import CacheWorker

    torch.set_num_threads(1)
    worker = CacheWorker(ckpt.read_bytes(), DATA, "val", "cpu")
    return worker.run(0, len(worker.ds), 1, worker.space.policy.n_bins, False), [str(i) for i in worker.ds.image_ids]


def fronts_equal(paths: list[Path]) -> tuple[bool, str]:
    """Whether every front file holds the same rows (exact, every column)."""
    import pandas.testing as pdt

    from messearch.front import read_front

    ref = read_front(paths[0])[0]
    for p in paths[1:]:
        try:
            pdt.assert_frame_equal(ref, read_front(p)[0], check_exact=True)
        except AssertionError as e:
            return False, f"{p.name} differs from {paths[0].name}: {str(e)[:400]}"
    return True, ""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    from messearch.cache import build_cache
    from messearch.cache_format import load_cache
    from messearch.search_driver import SearchOptions, search_to_front

    ckpt = make_checkpoint(out)
    result: dict = {"ok": False}
    problems: list[str] = []
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        result["cluster_up_s"] = round(time.perf_counter() - t_start, 2)

        # --- cache, with the node of a live actor removed after the first shard is written
        removed: dict = {}
        t_cache = time.perf_counter()

        def on_shard(k, pool):
            if removed:
                return
            # The actor that just wrote shard k is the idle one: it gets the next shard, which must then fail
            # and be retried on another actor (deterministic, unlike racing a running shard).
            idle = [a for a, _, busy in pool if not busy] or [a for a, _, _ in pool]
            node_id = node_of(ray, idle[0])
            victim = next((n for n in workers if n.unique_id == node_id), workers[0])
            cluster.remove_node(victim)
            removed.update(after_shard=k, at_s=round(time.perf_counter() - t_cache, 2),
                           node_found=node_id is not None)
            workers.remove(victim)
            workers.append(cluster.add_node(num_cpus=1))   # keep two CPUs: the replacement actor lands here

        manifest = build_cache(ckpt, DATA, "val", out / "cache", actors=2, shard_size=2, batch_size=1,
                               progress=False, on_shard=on_shard)
        cache_s = time.perf_counter() - t_cache
        cache = load_cache(out / "cache")
        retried = sorted({r["shard"] for r in manifest.retries})
        if not removed:
            problems.append("no node was removed")
        if not retried:
            problems.append(f"no shard was retried after the node removal (retries={manifest.retries})")

        # --- single-node reference: the same statistics without Ray
        rows, ids = single_node_reference(ckpt)
        if len(set(cache.image_ids)) != len(cache.image_ids) or cache.image_ids != ids or rows["image_id"] != ids:
            problems.append("image ids of the cache differ from the data set's (missing, duplicated or reordered)")
        cache_equal = all(np.array_equal(getattr(cache, k), rows[k]) for k in ARRAYS) and all(
            getattr(cache, k).dtype == rows[k].dtype for k in ARRAYS)
        if not cache_equal:
            problems.append("cluster cache != single-node statistics: " + ", ".join(
                k for k in ARRAYS if not np.array_equal(getattr(cache, k), rows[k])))

        # --- search across the cluster: in this driver, and through the `ray submit` entry script
        t_search = time.perf_counter()
        search_to_front(out / "cache", out / "pareto_cluster.parquet", SearchOptions(shards=2))
        search_s = time.perf_counter() - t_search
        (out / "run").mkdir(exist_ok=True)
        t_run = time.perf_counter()
        env = dict(os.environ, RAY_ADDRESS=cluster.address, PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, str(REPO / "cluster" / "run.py"), "search", "--cache", str(out / "cache"),
                               "--out", str(out / "run" / "pareto_run.parquet"), "--shards", "2"],
                              env=env, capture_output=True, text=True, timeout=180)
        run_s = time.perf_counter() - t_run
        if proc.returncode != 0:
            problems.append(f"cluster/run.py search exited {proc.returncode}: {proc.stderr[-1500:]}")
        search_to_front(out / "cache", out / "pareto_local.parquet", SearchOptions(local=True))
        paths = [out / "pareto_local.parquet", out / "pareto_cluster.parquet", out / "run" / "pareto_run.parquet"]
        equal, why = fronts_equal(paths) if proc.returncode == 0 else (False, "run.py failed")
        if not equal:
            problems.append(why)
        from messearch.front import read_front

        result.update(images=cache.n_images, retried_shards=len(retried), retries=manifest.retries,
                      node_removed_at_s=removed.get("at_s"), node_removed_after_shard=removed.get("after_shard"),
                      node_found=removed.get("node_found"), workers=len({(w["host"], w["pid"]) for w in manifest.workers}),
                      cache_s=round(cache_s, 2), search_s=round(search_s, 2), run_py_s=round(run_s, 2),
                      front_rows=len(read_front(paths[0])[0]), fronts_equal=equal, cache_equal_single_node=cache_equal)
    except Exception as e:   # report, do not hide: the JSON line says what broke
        problems.append(f"{type(e).__name__}: {e}")
    finally:
        ray.shutdown()
        cluster.shutdown()
    result["problems"] = problems
    result["ok"] = not problems
    result["total_s"] = round(time.perf_counter() - t_start, 2)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
