"""The cache of exact per-exit sufficient statistics over a split, and its in-memory form for the search.

`build_cache` runs a pool of Ray actors over shards (contiguous index ranges) of the split: each actor loads
the checkpoint once, runs the backbone once per batch and every candidate head plus the final head on its
features, and returns the statistics of `messearch.stats`; the driver writes each shard as Parquet and records
it in `manifest.json` (both atomically), so an interrupted run resumes and a dead actor's shard is redone.

Shard layout (one row per image; per-exit arrays flattened exit-major into fixed-size lists):
    index int64 (position in the split), image_id string, n_pixels int64, gt list<int64>[C],
    tp, pred list<int64>[E*C], conf_mean list<double>[E], n_above list<int64>[E*(n_bins+1)],
    and with keep_confusion: confusion list<int64>[E*C*C] (row = label, column = prediction).
E = P*H + 1: candidate exits in net.exits order (position-major, head order), the final head last.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import stats
from .errors import MessError
from .io import atomic_path, atomic_write_text, sha256_file

FORMAT = "messearch/cache-v1"
DEFAULT_SHARD_SIZE = 32
MAX_ATTEMPTS = 4                # a shard that kills this many actors is reported, not retried forever
FUSE_ELEMENTS = 1 << 27         # per-chunk budget of the fused statistics' largest temporary (count_above's bool map)
# Fields a resumed run must share with the manifest it continues: anything else would mix two caches.
_RESUME_KEYS = ("checkpoint_sha256", "space_text", "data", "split", "n_images", "n_bins", "batch_size",
                "shard_size", "keep_confusion")


@dataclass
class CacheArrays:
    """The whole cache as contiguous arrays (the form the search wants).

    Exit index e runs over the candidate exits in space order (position-major, then head variant order),
    and the final head is the last index E-1. Counts are int64; nothing the search sums is rounded.
    """

    image_ids: list[str]            # N
    positions: list[str]            # P candidate positions, in depth order
    heads: list[str]                # H head variant names, in space order
    tp: np.ndarray                  # int64 [N, E, C], E = P*H + 1
    pred: np.ndarray                # int64 [N, E, C]
    gt: np.ndarray                  # int64 [N, C]
    conf_mean: np.ndarray           # float64 [N, E] mean top-1 probability
    n_above: np.ndarray             # int64 [N, E, n_bins+1] pixels with top-1 >= k/n_bins
    n_pixels: np.ndarray            # int64 [N] pixels per image (the confidence denominator)
    meta: dict = field(default_factory=dict)  # checkpoint hash, space text, n_bins, ...

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def n_exits(self) -> int:
        """Number of candidate exits, final head excluded."""
        return len(self.positions) * len(self.heads)

    def exit_index(self, position: str, head: str) -> int:
        """Index of candidate exit (position, head) along the exit axis."""
        return self.positions.index(position) * len(self.heads) + self.heads.index(head)


# ----------------------------------------------------------------------------------------------- one batch

def _check_batch(logits: torch.Tensor, mask: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    # The same checks stats.exit_statistics makes, done once per batch instead of once per exit.
    if logits.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"logits of size {tuple(logits.shape[-2:])} do not match the mask's {tuple(mask.shape[-2:])}")
    bad = (mask != ignore_index) & ((mask < 0) | (mask >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"label values outside 0..{num_classes - 1} (and not the ignore index {ignore_index})")


def _confusion(pred: torch.Tensor, mask: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Per image the C x C confusion counts (row = label, column = prediction), int64 [B, C*C]."""
    b, c2 = pred.shape[0], num_classes * num_classes
    valid = mask != ignore_index
    offset = (torch.arange(b, device=pred.device) * c2).view(b, 1, 1)
    idx = (mask * num_classes + pred + offset)[valid]
    return torch.bincount(idx, minlength=b * c2).view(b, c2)


def _count_above(top1: torch.Tensor, n_bins: int) -> torch.Tensor:
    """stats.count_above, exactly, by one binary search per pixel instead of n_bins+1 comparisons.

    bucketize(right=True) gives i = #{edges <= x} (the same float32 comparisons), so #{x >= edge_k} = #{i > k}.
    """
    if bool(torch.isnan(top1).any()):   # NaN compares false with every edge; keep stats' own path for it
        return stats.count_above(top1, n_bins)
    n, k = top1.shape[0], n_bins + 2
    i = torch.bucketize(top1.reshape(n, -1), stats.bin_edges(n_bins).to(top1.device), right=True)
    hist = torch.bincount((i + (torch.arange(n, device=i.device) * k).view(-1, 1)).view(-1), minlength=n * k).view(n, k)
    return hist.flip(1).cumsum(1).flip(1)[:, 1:]


def _class_counts(pred: torch.Tensor, mask: torch.Tensor, num_classes: int, ignore_index: int):
    """stats.class_counts plus the confusion matrices [B, C, C], from one bincount (ignore pixels in a dump bin)."""
    n, c2 = pred.shape[0], num_classes * num_classes
    idx = torch.where(mask != ignore_index, mask * num_classes + pred, c2)
    idx = idx + (torch.arange(n, device=pred.device) * (c2 + 1)).view(-1, 1, 1)
    conf = torch.bincount(idx.view(-1), minlength=n * (c2 + 1)).view(n, c2 + 1)[:, :c2].view(n, num_classes, num_classes)
    return conf.diagonal(dim1=1, dim2=2), conf.sum(dim=1), conf.sum(dim=2), conf.reshape(n, c2)


def exits_statistics(logits: list[torch.Tensor], mask: torch.Tensor, num_classes: int, ignore_index: int,
                     n_bins: int, fused: bool = True, keep_confusion: bool = False) -> dict[str, torch.Tensor]:
    """Statistics of several exits' logits [B,C,H,W] on one batch: tp/pred [B,E,C], gt [B,C], conf_mean [B,E],
    n_above [B,E,n_bins+1] (confusion [B,E,C*C]); bit-identical to stats.exit_statistics on each exit.

    Fused: the softmax runs per exit on exactly the tensor exit_statistics sees (the one step whose rounding
    could depend on the batch's shape); the rest is exact (max's index = argmax's, both the first maximum;
    float64 sums of float32 values; comparisons; bincounts) and runs once on all exits stacked. The tests
    check bit-equality with stats.exit_statistics.
    """
    e, b = len(logits), mask.shape[0]
    if not fused:
        per = [stats.exit_statistics(x, mask, num_classes, ignore_index, n_bins) for x in logits]
        out = {k: torch.stack([p[k] for p in per], dim=1) for k in ("tp", "pred", "conf_mean", "n_above")}
        out["gt"] = per[0]["gt"]
        if keep_confusion:
            out["confusion"] = torch.stack([_confusion(x.argmax(dim=1), mask, num_classes, ignore_index) for x in logits], 1)
        return out
    _check_batch(logits[0], mask, num_classes, ignore_index)
    top1 = torch.cat([stats.top1_confidence(x) for x in logits])        # [E*B, H, W], exit-major
    pred = torch.cat([x.max(dim=1).indices for x in logits])            # 4x faster than argmax(dim=1) on CPU
    masks = mask.repeat(e, 1, 1)
    confusion = None
    if num_classes * num_classes < mask.shape[1] * mask.shape[2]:
        tp, n_pred, n_gt, confusion = _class_counts(pred, masks, num_classes, ignore_index)
    else:   # many classes, small images: the confusion bins would outnumber the pixels
        tp, n_pred, n_gt = stats.class_counts(pred, masks, num_classes, ignore_index)
    unstack = lambda t: t.reshape(e, b, *t.shape[1:]).transpose(0, 1)  # noqa: E731  [E*B, ...] -> [B, E, ...]
    out = {"tp": unstack(tp), "pred": unstack(n_pred), "gt": n_gt[:b],
           "conf_mean": unstack(stats.mean_confidence(top1)), "n_above": unstack(_count_above(top1, n_bins))}
    if keep_confusion:
        out["confusion"] = unstack(confusion if confusion is not None else _confusion(pred, masks, num_classes, ignore_index))
    return out


@torch.inference_mode()
def cache_batch(net, images: torch.Tensor, masks: torch.Tensor, n_bins: int, fused: bool = True,
                keep_confusion: bool = False) -> dict[str, np.ndarray]:
    """The cache's rows for one batch (what every actor runs): the backbone once, every candidate head and the
    final head on its features at the input size, their statistics as numpy arrays (see exits_statistics)."""
    space = net.space
    size = images.shape[-2:]
    feats, taps = net.forward_features(images)
    n_exits = len(net.exits)
    # Exits in chunks, so that only a few full-resolution logit maps are alive at once.
    per_chunk = max(1, FUSE_ELEMENTS // max(1, images.shape[0] * size[0] * size[1] * (n_bins + 1)))
    parts = []
    for start in range(0, n_exits + 1, per_chunk):
        idx = list(range(start, min(start + per_chunk, n_exits + 1)))
        logits = net.exit_logits(feats, size, [i for i in idx if i < n_exits])
        if idx[-1] == n_exits:
            logits.append(net.final(taps, size))
        parts.append(exits_statistics(logits, masks, space.num_classes, space.ignore_index, n_bins, fused, keep_confusion))
    out = {k: torch.cat([p[k] for p in parts], dim=1).cpu().numpy() for k in parts[0] if k != "gt"}
    out["gt"] = parts[0]["gt"].cpu().numpy()
    out["n_pixels"] = np.full(images.shape[0], size[0] * size[1], dtype=np.int64)
    return out


# ---------------------------------------------------------------------------------------------- the actors

class CacheWorker:
    """One Ray actor: the checkpoint loaded once (from bytes, so no shared disk is needed), the split's data set."""

    def __init__(self, checkpoint_bytes: bytes, data_spec: str, split: str, device: str):
        from .checkpoint import load_checkpoint
        from .data import build_dataset

        self.device = torch.device(device)
        net, space, _ = load_checkpoint(io.BytesIO(checkpoint_bytes))
        self.net = net.to(self.device)
        self.space = space
        self.ds = build_dataset(data_spec, split, space.input_size, train=False, ignore_index=space.ignore_index,
                                num_classes=space.num_classes)

    def info(self) -> dict:
        """Where this actor runs: host, pid, device name, torch threads (CPU rounding depends on them)."""
        from .profile import device_name

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
    import pyarrow as pa

    a = np.ascontiguousarray(a)
    width = int(np.prod(a.shape[1:])) if a.ndim > 1 else 1
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), width)


def shard_table(rows: dict):
    """A shard's rows as a pyarrow Table in the layout of the module docstring."""
    import pyarrow as pa

    cols = {"index": pa.array(rows["index"], pa.int64()), "image_id": pa.array(rows["image_id"], pa.string()),
            "n_pixels": pa.array(rows["n_pixels"], pa.int64())}
    for k in ("gt", "tp", "pred", "conf_mean", "n_above", "confusion"):
        if k in rows:
            cols[k] = _flat_list(rows[k])
    return pa.table(cols)


def _write_shard(path: Path, rows: dict) -> str:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(shard_table(rows), tmp, compression="zstd")
        digest = sha256_file(tmp)
    return digest


def _column(table, name: str, shape: tuple) -> np.ndarray:
    col = table.column(name).combine_chunks()
    values = col.flatten() if hasattr(col, "flatten") else col
    return values.to_numpy(zero_copy_only=False).reshape(shape)


def _cache_sha256(shards: list[dict]) -> str:
    return hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()


def _read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MessError(f"{path}: unreadable cache manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise MessError(f"{path}: not a messearch cache manifest (expected format {FORMAT!r})")
    return manifest


def _shard_ok(out_dir: Path, rec: dict | None) -> bool:
    if not rec:
        return False
    path = out_dir / rec["file"]
    return path.exists() and sha256_file(path) == rec["sha256"]


def _check_expected(meta: dict, where, expect_checkpoint_sha256=None, expect_space_text=None) -> None:
    if expect_checkpoint_sha256 is not None and meta.get("checkpoint_sha256") != expect_checkpoint_sha256:
        raise MessError(f"{where}: this cache was built from checkpoint sha256 {str(meta.get('checkpoint_sha256'))[:16]}..., "
                        f"not the given one ({expect_checkpoint_sha256[:16]}...); rebuild it with `messearch cache`")
    if expect_space_text is not None and meta.get("space_text") != expect_space_text:
        raise MessError(f"{where}: this cache was built for another search space (space_text differs); "
                        f"rebuild it with `messearch cache` from this space's checkpoint")


def load_cache(out_dir, expect_checkpoint_sha256: str | None = None, expect_space_text: str | None = None,
               verify: bool = True) -> CacheArrays:
    """The whole cache in `out_dir` as contiguous arrays; every shard's hash is checked, and a cache of another
    checkpoint or space (when expectations are given) is refused with a MessError."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    if manifest is None:
        raise MessError(f"{out_dir}: no cache here (manifest.json missing); build one with `messearch cache`")
    _check_expected(manifest, out_dir, expect_checkpoint_sha256, expect_space_text)
    if not manifest.get("complete"):
        raise MessError(f"{out_dir}: the cache is incomplete; finish it with `messearch cache ... --resume`")
    n, c, e, k = manifest["n_images"], manifest["num_classes"], len(manifest["exits"]), manifest["n_bins"] + 1
    arrays = {"tp": np.empty((n, e, c), np.int64), "pred": np.empty((n, e, c), np.int64), "gt": np.empty((n, c), np.int64),
              "conf_mean": np.empty((n, e), np.float64), "n_above": np.empty((n, e, k), np.int64),
              "n_pixels": np.empty(n, np.int64)}
    ids: list[str] = []
    for rec in manifest["shards"]:
        path = out_dir / rec["file"]
        if verify and not _shard_ok(out_dir, rec):
            raise MessError(f"{path}: missing or its sha256 does not match the manifest; "
                            f"recompute it with `messearch cache ... --resume`")
        t = pq.read_table(path)
        lo, hi = rec["start"], rec["stop"]
        if t.num_rows != hi - lo or t.column("index").to_pylist() != list(range(lo, hi)):
            raise MessError(f"{path}: rows do not match the manifest's images {lo}..{hi - 1}")
        m = hi - lo
        for name, arr in arrays.items():
            arr[lo:hi] = _column(t, name, (m,) + arr.shape[1:])
        ids.extend(t.column("image_id").to_pylist())
    meta = {k: v for k, v in manifest.items() if k != "shards"}
    meta["cache_dir"] = str(out_dir)
    return CacheArrays(image_ids=ids, positions=list(manifest["positions"]), heads=list(manifest["heads"]), meta=meta,
                       **arrays)


def load_confusion(out_dir) -> np.ndarray:
    """The per-(image, exit) confusion matrices int64 [N, E, C, C] of a cache built with keep_confusion."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    manifest = load_cache(out_dir).meta   # verifies completeness and hashes
    if not manifest.get("keep_confusion"):
        raise MessError(f"{out_dir}: built without --keep-confusion; rebuild with it to get confusion matrices")
    n, c, e = manifest["n_images"], manifest["num_classes"], len(manifest["exits"])
    shards = _read_manifest(out_dir)["shards"]
    return np.concatenate([_column(pq.read_table(out_dir / s["file"]), "confusion", (s["stop"] - s["start"], e, c, c))
                           for s in shards]) if shards else np.empty((n, e, c, c), np.int64)


# -------------------------------------------------------------------------------------------- the driver

def _new_manifest(checkpoint, ckpt_sha, space, net_exits, data_spec, split, ids, n_bins, batch_size, shard_size,
                  keep_confusion) -> dict:
    n = len(ids)
    bounds = [(lo, min(lo + shard_size, n)) for lo in range(0, n, shard_size)]
    return {
        "format": FORMAT, "complete": False, "checkpoint": str(checkpoint), "checkpoint_sha256": ckpt_sha,
        "space_text": space.text, "space_source": space.source, "data": data_spec, "split": split, "n_images": n,
        "num_classes": space.num_classes, "ignore_index": space.ignore_index, "input_size": list(space.input_size),
        "n_bins": n_bins, "policy": {"kind": space.policy.kind, "pixel_threshold": space.policy.pixel_threshold},
        "positions": list(space.positions), "heads": [h.name for h in space.heads],
        "exits": [list(x) for x in net_exits] + [["<final>", "final"]], "batch_size": batch_size,
        "shard_size": shard_size, "keep_confusion": keep_confusion, "layout": __doc__.split("Shard layout", 1)[1].strip(),
        "shards": [None] * len(bounds), "plan": [list(b) for b in bounds],
        "image_ids": [list(ids[lo:hi]) for lo, hi in bounds], "workers": [], "retries": [], "cache_sha256": None,
        "versions": {"torch": str(torch.__version__)},
    }


def _resumable(old: dict, new: dict, out_dir: Path) -> None:
    _check_expected(old, out_dir, new["checkpoint_sha256"], new["space_text"])
    for key in _RESUME_KEYS:
        if old.get(key) != new[key]:
            raise MessError(f"{out_dir}: cannot resume: the cache has {key}={old.get(key)!r} but this run asks for "
                            f"{new[key]!r}; use another --out or the same settings")
    if old["image_ids"] != new["image_ids"]:
        raise MessError(f"{out_dir}: cannot resume: the split's image ids differ from the cache's")


def build_cache(checkpoint, data_spec: str | None, split: str, out_dir, actors: int | None = None,
                gpus_per_actor: float | None = None, batch_size: int = 1, resume: bool = False,
                keep_confusion: bool = False, address: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                progress: bool = True, on_shard=None) -> dict:
    """Cache every image x exit of `split` in `out_dir` with a pool of Ray actors; returns the manifest.

    data_spec None: the checkpoint's own. gpus_per_actor None: 1 when the cluster has GPUs, else CPU actors.
    `on_shard(shard_index, pool)` is called after each shard is written, with [(actor, info, busy)] of the live
    actors (monitoring and fault tests).
    """
    from .checkpoint import read_checkpoint
    from .data import build_dataset
    from .space import space_from_text

    if batch_size < 1 or shard_size < 1:
        raise MessError(f"batch_size={batch_size} and shard_size={shard_size} must be >= 1")
    out_dir = Path(out_dir)
    payload = read_checkpoint(checkpoint)            # a clear error for a missing or foreign file
    ckpt_bytes = Path(checkpoint).read_bytes()      # actors get these bytes: remote nodes need no shared disk
    space = space_from_text(payload["space_text"], payload.get("space_source") or f"{checkpoint}:space")
    data_spec = data_spec or payload.get("data") or space.data
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
    old = _read_manifest(out_dir)
    if old is not None:
        if not resume:
            raise MessError(f"{out_dir} already holds a cache; pass --resume to continue or verify it, or choose another --out")
        _resumable(old, manifest, out_dir)
        manifest["workers"], manifest["retries"] = old.get("workers", []), old.get("retries", [])
        manifest["shards"] = [rec if _shard_ok(out_dir, rec) else None for rec in old["shards"]]
    manifest["recomputed"] = [k for k, rec in enumerate(manifest["shards"]) if rec is None]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest))
    todo = deque(manifest["recomputed"])
    if todo:
        _run_pool(manifest, todo, ckpt_bytes, out_dir, actors, gpus_per_actor, address, progress, on_shard)
    manifest["complete"] = True
    manifest["cache_sha256"] = _cache_sha256(manifest["shards"])
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest))
    return manifest


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
    from ray.exceptions import RayActorError
    from tqdm import tqdm

    from .ray_runtime import connect

    ray = connect(address)
    n_actors, gpus = _pool_size(ray, actors, gpus_per_actor, len(todo))
    opts = {"num_gpus": gpus, "num_cpus": 1} if gpus > 0 else {"num_cpus": 1}
    Worker = ray.remote(max_restarts=0, max_task_retries=0)(CacheWorker).options(**opts)
    ckpt_ref = ray.put(ckpt_bytes)
    args = (ckpt_ref, manifest["data"], manifest["split"], "cuda" if gpus > 0 else "cpu")
    plan, attempts, deaths = manifest["plan"], {}, 0
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
            manifest["retries"].append({"shard": shard, "error": f"{type(err).__name__}: {str(err)[:200]}"})
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
                running[a.run.remote(plan[k][0], plan[k][1], manifest["batch_size"], manifest["n_bins"],
                                     manifest["keep_confusion"])] = (a, k)
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
            if rows["image_id"] != manifest["image_ids"][k]:
                raise MessError(f"shard {k}: the actor's image ids differ from the driver's (data differ between nodes?)")
            path = out_dir / f"shard-{k:05d}.parquet"
            digest = _write_shard(path, rows)
            manifest["shards"][k] = {"index": k, "start": plan[k][0], "stop": plan[k][1], "file": path.name,
                                     "rows": plan[k][1] - plan[k][0], "sha256": digest, "worker": infos.get(a)}
            if infos.get(a) and infos[a] not in manifest["workers"]:
                manifest["workers"].append(infos[a])
            atomic_write_text(out_dir / "manifest.json", json.dumps(manifest))
            bar.update(plan[k][1] - plan[k][0])
            if on_shard is not None:
                busy = {b for b, _ in running.values()}
                on_shard(k, [(b, infos[b], b in busy) for b in alive if b in infos])
            idle.append(a)
    finally:
        bar.close()
        for a in alive:
            ray.kill(a, no_restart=True)
