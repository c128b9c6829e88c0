"""A real multi-node run on one machine (issue 9): a local Ray cluster with a 0-CPU head and two 1-CPU workers.

Builds a cache with a worker node removed mid-run (the shard its actor is handed next is lost and retried
elsewhere), checks the cache equals the statistics computed in this process without Ray, then searches across the
cluster (in-process and through the `ray submit` entry script cluster/run.py) and checks both fronts equal the local
front. Prints ONE JSON line;
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


def actor_location(ray, actor) -> tuple[str, int]:
    """The node id (hex, as `ray.nodes()` and `Node.node_id` spell it) and the process id of an actor, from the
    GCS actor table (a private layout: if it changes, the scenario fails with the KeyError, it does not guess)."""
    rec = ray._private.state.actors(actor_id=actor._actor_id.hex())
    return rec["Address"]["NodeID"], int(rec["Pid"])


def wait_actor_gone(ray, actor, pid: int, timeout: float = 60.0) -> float:
    """Wait until the actor's process has exited and the GCS marks the actor DEAD; the seconds it took."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if not process_alive(pid) and ray._private.state.actors(actor_id=actor._actor_id.hex())["State"] == "DEAD":
            return time.perf_counter() - t0
        time.sleep(0.1)
    raise RuntimeError(f"the removed node's actor (pid {pid}) was still alive {timeout:g} s after the removal")


def process_alive(pid: int) -> bool:
    """Whether a process runs (a zombie left by the killed raylet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:   # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


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

        # --- cache, with the node of the actor that just wrote the first shard removed
        removed: dict = {}
        t_cache = time.perf_counter()

        def on_shard(k, pool):
            if removed:
                return
            # The actor that just wrote shard k is the idle one, and the pool hands it the next shard as soon as this
            # callback returns. Remove its node and wait until its process is gone: that next shard is then lost with
            # the node, and the pool must retry it on another actor. Deterministic, unlike removing a busy actor's
            # node, whose 2-image shard may finish first. Match `Node.node_id`: `Node.unique_id` is "ip:plasma-socket".
            actor = next(a for a, _, busy in pool if not busy)
            node_id, pid = actor_location(ray, actor)
            victim = next(n for n in workers if n.node_id == node_id)
            cluster.remove_node(victim)
            gone_s = wait_actor_gone(ray, actor, pid)
            removed.update(after_shard=k, at_s=round(time.perf_counter() - t_cache, 2), pid=pid,
                           actor_gone_s=round(gone_s, 2))
            workers.remove(victim)
            workers.append(cluster.add_node(num_cpus=1))   # keep two CPUs: the replacement actor lands here

        manifest = build_cache(ckpt, DATA, "val", out / "cache", actors=2, shard_size=2, batch_size=1,
                               progress=False, on_shard=on_shard)
        cache_s = time.perf_counter() - t_cache
        cache = load_cache(out / "cache")
        retried = sorted({r["shard"] for r in manifest.retries})
        if not removed:
            problems.append("no node was removed")
        if len(retried) != 1:
            problems.append(f"expected exactly the one shard handed to the removed node's actor to be retried "
                            f"(retries={manifest.retries})")
        redone_by = {manifest.shards[s]["worker"]["pid"] for s in retried}
        if removed and removed["pid"] in redone_by:
            problems.append(f"a retried shard is recorded as written by the removed actor (pid {removed['pid']})")
        if removed and removed["pid"] not in {w["pid"] for w in manifest.workers}:
            problems.append(f"the removed actor (pid {removed['pid']}) is not among the cache's workers")

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
        # the compiled kernels across the cluster; the local front below is searched plain (auto, a small space)
        search_to_front(out / "cache", out / "pareto_cluster.parquet", SearchOptions(shards=2, evaluator="kernel"))
        search_s = time.perf_counter() - t_search
        (out / "run").mkdir(exist_ok=True)
        t_run = time.perf_counter()
        env = dict(os.environ, RAY_ADDRESS=cluster.address, PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, str(REPO / "cluster" / "run.py"), "search", "--cache", str(out / "cache"),
                               "--out", str(out / "run" / "pareto_run.parquet"), "--shards", "2", "--evaluator", "kernel"],
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
                      removed_actor_gone_s=removed.get("actor_gone_s"),
                      workers=len({(w["host"], w["pid"]) for w in manifest.workers}),
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
