"""Building the cache of exact per-exit sufficient statistics over a split: the Ray actor pool and the storage writer.

`build_cache` runs a pool of Ray actors over shards (contiguous index ranges) of the split: each actor loads
the checkpoint once, runs the backbone once per batch and every candidate head plus the final head on its
features, and returns `stats.batch_statistics`; the driver writes each shard as Parquet and records it in
`manifest.json` (both atomically), so an interrupted run resumes and a dead actor's shard is redone.
What a cache holds (the Manifest, the shard layout) and how it is read (`load_cache`) is `cache_format`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import socket
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from . import stats
from .cache_format import Manifest, cache_sha256, check_expected, read_manifest, shard_ok
from .checkpoint import load_checkpoint, read_checkpoint
from .data import build_dataset, check_dataset
from .devices import device_name, exact_numerics, parse_device
from .errors import MessError
from .files import atomic_path, atomic_write_text, sha256_file
from .ray_runtime import connect
from .space import space_from_text

DEFAULT_SHARD_SIZE = 32
MAX_ATTEMPTS = 4                # a shard that kills this many actors is reported, not retried forever
FUSE_ELEMENTS = 1 << 27         # per-chunk budget of the fused statistics' largest temporary (count_above's bool map)
# Fields a resumed run must share with the manifest it continues: anything else would mix two caches.
_RESUME_KEYS = ("checkpoint_sha256", "space_text", "data", "split", "n_images", "n_bins", "batch_size",
                "shard_size", "keep_confusion")


# ----------------------------------------------------------------------------------------------- one batch

@torch.inference_mode()
def cache_batch(net, images: torch.Tensor, masks: torch.Tensor, n_bins: int, fused: bool = True,
                keep_confusion: bool = False) -> dict[str, np.ndarray]:
    """The cache's rows for one batch (what every actor runs): the backbone once, every candidate head and the
    final head on its features at the input size, their statistics as numpy arrays (see stats.batch_statistics)."""
    space = net.space
    size = images.shape[-2:]
    feats, taps = net.forward_features(images)
    n_exits = len(net.exits)
    if fused:   # the mask's one check (a host sync); the chunks' statistics then stay on the device
        stats.check_batch(images, masks, space.num_classes, space.ignore_index)
    # Exits in chunks, so that only a few full-resolution logit maps are alive at once.
    per_chunk = max(1, FUSE_ELEMENTS // max(1, images.shape[0] * size[0] * size[1] * (n_bins + 1)))
    parts = []
    for start in range(0, n_exits + 1, per_chunk):
        idx = list(range(start, min(start + per_chunk, n_exits + 1)))
        logits = net.exit_logits(feats, size, [i for i in idx if i < n_exits])
        if idx[-1] == n_exits:
            logits.append(net.final(taps, size))
        parts.append(stats.batch_statistics(logits, masks, space.num_classes, space.ignore_index, n_bins, fused,
                                           keep_confusion, check=not fused))
    # One host copy per statistic per batch (not per exit or chunk).
    out = {k: torch.cat([p[k] for p in parts], dim=1).cpu().numpy() for k in parts[0] if k != "gt"}
    out["gt"] = parts[0]["gt"].cpu().numpy()
    out["n_pixels"] = np.full(images.shape[0], size[0] * size[1], dtype=np.int64)
    return out


# ---------------------------------------------------------------------------------------------- the actors

class CacheWorker:
    """One Ray actor: the checkpoint loaded once (from bytes, so no shared disk is needed), the split's data set."""

    def __init__(self, checkpoint_bytes: bytes, data_spec: str, split: str, device: str):
        self.device = torch.device(device)
        exact_numerics(self.device)
        net, space, _ = load_checkpoint(io.BytesIO(checkpoint_bytes))
        self.net = net.to(self.device)
        self.space = space
        self.ds = build_dataset(data_spec, split, space.input_size, train=False, ignore_index=space.ignore_index,
                                num_classes=space.num_classes)

    def info(self) -> dict:
        """Where this actor runs: host, pid, device name, torch threads (CPU rounding depends on them)."""
        name = device_name(self.device)
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": name, "threads": torch.get_num_threads()}

    def run(self, start: int, stop: int, batch_size: int, n_bins: int, keep_confusion: bool) -> dict:
        """Statistics of images start..stop-1, in index order, as numpy arrays plus their ids."""
        parts = []
        for lo in range(start, stop, batch_size):
            items = [self.ds[i] for i in range(lo, min(lo + batch_size, stop))]
            images = torch.stack([x for x, _ in items]).to(self.device)
            masks = torch.stack([m for _, m in items]).to(self.device)
            parts.append(cache_batch(self.net, images, masks, n_bins, keep_confusion=keep_confusion))
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        out["image_id"] = [str(self.ds.image_ids[i]) for i in range(start, stop)]
        out["index"] = np.arange(start, stop, dtype=np.int64)
        return out


# ----------------------------------------------------------------------------------------------- storage

def _flat_list(a: np.ndarray):
    a = np.ascontiguousarray(a)
    width = int(np.prod(a.shape[1:])) if a.ndim > 1 else 1
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), width)


def shard_table(rows: dict):
    """A shard's rows as a pyarrow Table in the layout of cache_format.SHARD_COLUMNS."""
    cols = {"index": pa.array(rows["index"], pa.int64()), "image_id": pa.array(rows["image_id"], pa.string()),
            "n_pixels": pa.array(rows["n_pixels"], pa.int64())}
    for k in ("gt", "tp", "pred", "conf_mean", "n_above", "confusion"):
        if k in rows:
            cols[k] = _flat_list(rows[k])
    return pa.table(cols)


def _write_shard(path: Path, rows: dict) -> str:
    with atomic_path(path) as tmp:
        pq.write_table(shard_table(rows), tmp, compression="zstd")
        digest = sha256_file(tmp)
    return digest


# -------------------------------------------------------------------------------------------- the driver

def _new_manifest(checkpoint, ckpt_sha, space, net_exits, data_spec, split, ids, n_bins, batch_size, shard_size,
                  keep_confusion) -> Manifest:
    n = len(ids)
    bounds = [(lo, min(lo + shard_size, n)) for lo in range(0, n, shard_size)]
    return Manifest(
        checkpoint=str(checkpoint), checkpoint_sha256=ckpt_sha, space_text=space.text, space_source=space.source,
        data=data_spec, split=split, n_images=n, num_classes=space.num_classes, ignore_index=space.ignore_index,
        input_size=list(space.input_size), n_bins=n_bins,
        policy={"kind": space.policy.kind, "pixel_threshold": space.policy.pixel_threshold},
        positions=list(space.positions), heads=[h.name for h in space.heads],
        exits=[list(x) for x in net_exits] + [["<final>", "final"]], batch_size=batch_size, shard_size=shard_size,
        keep_confusion=keep_confusion, plan=[list(b) for b in bounds], image_ids=[list(ids[lo:hi]) for lo, hi in bounds],
        shards=[None] * len(bounds), versions={"torch": str(torch.__version__)})


def _resumable(old: Manifest, new: Manifest, out_dir: Path) -> None:
    check_expected(old, out_dir, new.checkpoint_sha256, new.space_text)
    for key in _RESUME_KEYS:
        if getattr(old, key) != getattr(new, key):
            raise MessError(f"{out_dir}: cannot resume: the cache has {key}={getattr(old, key)!r} but this run asks for "
                            f"{getattr(new, key)!r}; use another --out or the same settings")
    if old.image_ids != new.image_ids:
        raise MessError(f"{out_dir}: cannot resume: the split's image ids differ from the cache's")


def build_cache(checkpoint, data_spec: str | None, split: str, out_dir, actors: int | None = None,
                gpus_per_actor: float | None = None, batch_size: int = 1, resume: bool = False,
                keep_confusion: bool = False, address: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                progress: bool = True, on_shard=None, local: bool = False, device: str | None = None,
                threads: int = 1) -> Manifest:
    """Cache every image x exit of `split` in `out_dir` with a pool of Ray actors; returns the manifest.

    data_spec None: the checkpoint's own. gpus_per_actor None: 1 when the cluster has GPUs, else CPU actors.
    `on_shard(shard_index, pool)` is called after each shard is written, with [(actor, info, busy)] of the live
    actors (monitoring and fault tests).
    local: no Ray; the same CacheWorker runs the same shards in this process on `device` (default: cuda when
    available, else cpu) with `threads` torch CPU threads (1, as a one-CPU Ray actor has: the same CPU rounding),
    so the manifest, resume and hashes are the same and cache_sha256 equals a Ray-built cache's.
    """
    for flag, value in (("--batch-size", batch_size), ("--shard-size", shard_size), ("--threads", threads),
                        ("--actors", actors)):   # actors None: one per CPU (or GPU) of the cluster
        if value is not None and value < 1:
            raise MessError(f"{flag} {value}: allowed an integer >= 1")
    if gpus_per_actor is not None and not (math.isfinite(gpus_per_actor) and gpus_per_actor >= 0):
        raise MessError(f"--gpus-per-actor {gpus_per_actor:g}: allowed a number >= 0 (0: CPU actors)")
    out_dir = Path(out_dir)
    payload = read_checkpoint(checkpoint)            # a clear error for a missing or foreign file
    ckpt_bytes = Path(checkpoint).read_bytes()      # actors get these bytes: remote nodes need no shared disk
    space = space_from_text(payload["space_text"], payload.get("space_source") or f"{checkpoint}:space")
    data_spec = data_spec or payload.get("data") or space.data
    # Every file's header before Ray starts (as train does): a missing, unreadable or mis-sized file is named now,
    # not as a remote error from an actor minutes later.
    check_dataset(data_spec, split, space.num_classes)
    ds = build_dataset(data_spec, split, space.input_size, train=False, ignore_index=space.ignore_index,
                       num_classes=space.num_classes)
    if len(ds) == 0:
        raise MessError(f"data {data_spec!r} split {split!r} has no images")
    exits = [tuple(x) for x in payload["exits"]]
    if exits != [(p, h.name) for p in space.positions for h in space.heads]:
        raise MessError(f"{checkpoint}: its exits are not every candidate (position, head) of its space; "
                        f"the cache needs the full stage-2 checkpoint")
    manifest = _new_manifest(checkpoint, hashlib.sha256(ckpt_bytes).hexdigest(), space, exits, data_spec, split,
                             [str(i) for i in ds.image_ids], space.policy.n_bins, batch_size, shard_size, keep_confusion)
    old = read_manifest(out_dir)
    if old is not None:
        if not resume:
            raise MessError(f"{out_dir} already holds a cache; pass --resume to continue or verify it, or choose another --out")
        _resumable(old, manifest, out_dir)
        manifest.workers, manifest.retries = old.workers, old.retries
        manifest.shards = [rec if shard_ok(out_dir, rec) else None for rec in old.shards]
    manifest.recomputed = [k for k, rec in enumerate(manifest.shards) if rec is None]
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_manifest(out_dir, manifest)
    todo = deque(manifest.recomputed)
    if todo and local:
        _run_local(manifest, todo, ckpt_bytes, out_dir, device, threads, progress, on_shard)
    elif todo:
        _run_pool(manifest, todo, ckpt_bytes, out_dir, actors, gpus_per_actor, address, progress, on_shard)
    manifest.complete = True
    manifest.cache_sha256 = cache_sha256(manifest)
    _write_manifest(out_dir, manifest)
    return manifest


def _write_manifest(out_dir: Path, manifest: Manifest) -> None:
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest.to_dict()))


def _record_shard(manifest: Manifest, k: int, rows: dict, info: dict | None, out_dir: Path) -> None:
    """Write shard k's rows (Parquet, atomically) and record it in the manifest on disk."""
    plan = manifest.plan
    if rows["image_id"] != manifest.image_ids[k]:
        raise MessError(f"shard {k}: the worker's image ids differ from the driver's (data differ between nodes?)")
    path = out_dir / f"shard-{k:05d}.parquet"
    digest = _write_shard(path, rows)
    manifest.shards[k] = {"index": k, "start": plan[k][0], "stop": plan[k][1], "file": path.name,
                          "rows": plan[k][1] - plan[k][0], "sha256": digest, "worker": info}
    if info and info not in manifest.workers:
        manifest.workers.append(info)
    _write_manifest(out_dir, manifest)


def _run_local(manifest: Manifest, todo, ckpt_bytes, out_dir, device, threads, progress, on_shard) -> None:
    """The shards one after another in this process: one CacheWorker, as a Ray actor would run them."""
    dev = parse_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        worker = CacheWorker(ckpt_bytes, manifest.data, manifest.split, str(dev))
        info = worker.info()
        plan = manifest.plan
        with tqdm(total=sum(plan[k][1] - plan[k][0] for k in todo), unit="img", desc=f"cache ({dev}, local)",
                  disable=not progress, file=sys.stderr) as bar:
            for k in todo:
                rows = worker.run(plan[k][0], plan[k][1], manifest.batch_size, manifest.n_bins, manifest.keep_confusion)
                _record_shard(manifest, k, rows, info, out_dir)
                bar.update(plan[k][1] - plan[k][0])
                if on_shard is not None:
                    on_shard(k, [(worker, info, False)])
    finally:
        torch.set_num_threads(before)


def _pool_size(ray, actors, gpus_per_actor, n_todo) -> tuple[int, float]:
    res = ray.cluster_resources()
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if res.get("GPU", 0) > 0 else 0.0
    if gpus_per_actor > 0 and res.get("GPU", 0) < gpus_per_actor:
        raise MessError(f"--gpus-per-actor {gpus_per_actor:g}: the Ray cluster has {res.get('GPU', 0):g} GPUs")
    if actors is None:
        actors = int(res.get("GPU", 0) // gpus_per_actor) if gpus_per_actor > 0 else int(res.get("CPU", 1))
    if actors < 1:
        raise MessError(f"actors={actors}: need at least one")
    return max(1, min(actors, n_todo)), gpus_per_actor


def _run_pool(manifest, todo, ckpt_bytes, out_dir, actors, gpus_per_actor, address, progress, on_shard) -> None:
    ray = connect(address, what="`messearch cache` (Ray actors)", instead="cache in this process with --local")
    from ray.exceptions import RayActorError
    n_actors, gpus = _pool_size(ray, actors, gpus_per_actor, len(todo))
    opts = {"num_gpus": gpus, "num_cpus": 1} if gpus > 0 else {"num_cpus": 1}
    Worker = ray.remote(max_restarts=0, max_task_retries=0)(CacheWorker).options(**opts)
    ckpt_ref = ray.put(ckpt_bytes)
    args = (ckpt_ref, manifest.data, manifest.split, "cuda" if gpus > 0 else "cpu")
    plan, attempts, deaths = manifest.plan, {}, 0
    idle, starting, running, infos, alive = deque(), {}, {}, {}, []

    def spawn():
        a = Worker.remote(*args)
        alive.append(a)
        starting[a.info.remote()] = a

    def died(a, err, shard=None):
        nonlocal deaths
        deaths += 1
        ray.kill(a, no_restart=True)
        alive.remove(a)
        if shard is not None:
            attempts[shard] = attempts.get(shard, 0) + 1
            manifest.retries.append({"shard": shard, "error": f"{type(err).__name__}: {str(err)[:200]}"})
            if attempts[shard] >= MAX_ATTEMPTS:
                raise MessError(f"shard {shard} (images {plan[shard][0]}..{plan[shard][1] - 1}) lost {MAX_ATTEMPTS} actors; "
                                f"last error: {err}")
            todo.appendleft(shard)
        if deaths > 2 * n_actors + MAX_ATTEMPTS:
            raise MessError(f"{deaths} cache actors died; last error: {err}")
        if todo or running:
            spawn()

    bar = tqdm(total=sum(plan[k][1] - plan[k][0] for k in todo), unit="img", desc="cache", disable=not progress,
               file=sys.stderr)
    try:
        for _ in range(n_actors):
            spawn()
        while todo or running:
            while todo and idle:
                a, k = idle.popleft(), todo.popleft()
                running[a.run.remote(plan[k][0], plan[k][1], manifest.batch_size, manifest.n_bins,
                                     manifest.keep_confusion)] = (a, k)
            ready, _ = ray.wait(list(running) + list(starting), num_returns=1)
            ref = ready[0]
            if ref in starting:
                a = starting.pop(ref)
                try:
                    infos[a] = ray.get(ref)
                    idle.append(a)
                except RayActorError as err:
                    died(a, err)
                continue
            a, k = running.pop(ref)
            try:
                rows = ray.get(ref)
            except RayActorError as err:   # the actor (its process or node) died mid-shard: redo it elsewhere
                died(a, err, k)
                continue
            _record_shard(manifest, k, rows, infos.get(a), out_dir)
            bar.update(plan[k][1] - plan[k][0])
            if on_shard is not None:
                busy = {b for b, _ in running.values()}
                on_shard(k, [(b, infos[b], b in busy) for b in alive if b in infos])
            idle.append(a)
    finally:
        bar.close()
        for a in alive:
            ray.kill(a, no_restart=True)
