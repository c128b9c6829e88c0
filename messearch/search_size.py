"""How long a search takes on this machine, measured, not assumed: the evaluator's rate over a few seconds of
sampled work, the time on the cores at hand, the shard count that keeps every trial short, and the refusal of
a space estimated over an hour unless forced or sent to a cluster."""

from __future__ import annotations

import math
import os
import time

import numpy as np

from .cache_format import CacheArrays
from .errors import MessError
from .search import Prepared, evaluate_items, prepare
from .search_kernel import OUT_ROWS
from .search_plain import plain_bytes
from .search_shared import pair_table_bytes
from .search_shard import load_kernels
from .search_spec import SearchSpec, plan_items
from .shard_front import FrontSink

TRIAL_SECONDS = 30.0        # evaluation time a shard aims at: a failed trial is retried cheaply, none nears a minute
MAX_LOCAL_SECONDS = 3600.0  # a longer search asks for --force or a cluster address
MEASURE_SECONDS = 0.5   # CPU seconds of sampled work at most: the compiled kernels run steadily from the first tree
MEASURE_SHARE = 0.02    # ... and once MIN_MEASURE_SECONDS have passed, no more than this share of the space
MIN_MEASURE_SECONDS = 0.05
# Peak bytes of the estimate's synthetic cache per (image, exit, class + 4): measured 82-134 on the quickstart space
SYNTHETIC_BYTES = 96


def synthetic_cache(positions, heads, n_images: int, n_classes: int, seed: int = 0) -> CacheArrays:
    """A consistent random cache of a space's shape (deeper exits more accurate and confident), for the rate."""
    rng = np.random.default_rng(seed)
    e = len(positions) * len(heads) + 1
    gt = rng.multinomial(10_000, rng.dirichlet(np.ones(n_classes)), n_images).astype(np.int64)
    acc = np.clip(np.linspace(0.5, 0.95, e)[None, :] + rng.normal(0, 0.1, (n_images, e)), 0.05, 1.0)
    tp = rng.binomial(gt[:, None, :], acc[:, :, None])
    pred = tp + rng.binomial(gt[:, None, :] - tp, 0.5)
    conf = np.clip(acc + rng.normal(0, 0.05, acc.shape), 1.0 / n_classes, 1.0)
    n_pixels = gt.sum(axis=1)
    n_above = np.repeat(n_pixels[:, None, None], e, axis=1)[..., None].repeat(2, axis=2)
    return CacheArrays(image_ids=[f"s{i}" for i in range(n_images)], positions=list(positions), heads=list(heads),
                       tp=tp, pred=pred, gt=gt, conf_mean=conf, n_above=n_above, n_pixels=n_pixels, meta={"n_bins": 1})


def measure_rate(prep: Prepared, items: list[tuple], seconds: float = MEASURE_SECONDS, seed: int = 0) -> dict:
    """The evaluator's configurations per CPU-second on this machine, from work sampled by size.

    The samples are evaluated as the shards evaluate them: with shared thresholds a first position's trees
    together (one pass over the images serves all their thresholds; search_spec.assign_shards keeps them
    whole), with per-exit thresholds one item at a time. Samples are drawn with probability proportional to
    their size (where the search spends its time) among those the budget can finish, and evaluated until
    `seconds` of CPU time have passed, or sooner once they hold MEASURE_SHARE of the space (after
    MIN_MEASURE_SECONDS): the estimate of a space that takes seconds costs a few percent of it.
    """
    trees = [it for it in items if it[0] == "tree"]
    sink = FrontSink(prep)
    load_kernels(prep, trees)   # outside the measured time
    if prep.shared:
        by_position = {}
        for it in trees:
            by_position.setdefault(it[2], []).append(it)
        units = list(by_position.values())
    else:
        units = [[it] for it in trees]
    t0 = time.process_time()
    if units:
        sizes = np.array([float(sum(it[-1] for it in u)) for u in units])
        enough = MEASURE_SHARE * sizes.sum()
        pool = np.flatnonzero(sizes <= max(sizes.min(), min(seconds * 2e6, enough)))
        rng = np.random.default_rng(seed)
        for i in rng.choice(pool, size=len(pool), replace=False, p=sizes[pool] / sizes[pool].sum()):
            evaluate_items(prep, units[i], sink)
            cpu = time.process_time() - t0
            if cpu >= seconds or (cpu >= min(seconds, MIN_MEASURE_SECONDS) and sink.n_evaluated >= enough):
                break
    cpu = max(time.process_time() - t0, 1e-6)
    return {"configs_per_cpu_s": sink.n_evaluated / cpu, "sampled": sink.n_evaluated, "cpu_s": cpu}


def estimate(prep: Prepared, spec: SearchSpec, items: list[tuple], cores: int, seconds: float = MEASURE_SECONDS) -> dict:
    """Configurations, the evaluator's measured configurations per CPU-second, expected seconds on `cores`,
    and peak bytes of one shard."""
    m = measure_rate(prep, items, seconds)
    rate = max(m["configs_per_cpu_s"], 1.0)
    n = spec.n_configs()
    # the cache's rows twice (image-major for static rows, exit-major for the kernels) and the threshold bins; then
    # the plain evaluator's copy and block, or the kernels' output buffer and the shared kernel's pair table (the
    # kernels' own state is a few prefixes' counts)
    if prep.plain:
        own = plain_bytes(prep)
    else:
        own = 8 * OUT_ROWS * (prep.width + 3 * prep.max_exits + 8)
        own += pair_table_bytes(prep, len(prep.thresholds)) if prep.shared else 0
    return {"n_configs": n, "configs_per_cpu_s": rate, "cores": int(cores), "cpu_seconds": n / rate,
            "seconds": n / rate / max(1, int(cores)), "measured_configs": m["sampled"],
            "bytes": int(2 * prep.xd.nbytes + 9 * prep.fail.nbytes + own)}


def n_shards(est: dict, cores: int) -> int:
    """Enough shards for no shard to evaluate for more than about TRIAL_SECONDS, in whole rounds of the cores
    (3 equal shards on 2 cores take 2 rounds, as 4 do)."""
    cores = max(1, int(cores))
    return cores * math.ceil(max(1, math.ceil(est["cpu_seconds"] / TRIAL_SECONDS)) / cores)


def human_seconds(s: float) -> str:
    """3 s, 4.2 min, 1.5 h."""
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def describe(est: dict) -> str:
    """One line: the size of the search and its expected time here."""
    return (f"{est['n_configs']:,} configurations: about {human_seconds(est['seconds'])} on {est['cores']} core(s) "
            f"(evaluator measured here at {est['configs_per_cpu_s'] / 1e6:.2f}M configurations per CPU-second)")


def available_bytes() -> int:
    """Half of the memory available now (8 GiB where the system does not say): what one search may take."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") * 0.5)
    except (ValueError, OSError):
        return 8 << 30


def check(est: dict, force: bool, address: str | None, max_bytes: int | None = None) -> None:
    """Refuse (MessError) a search estimated over an hour on this machine without --force or a cluster address,
    or one whose shard would not fit in memory without --force."""
    max_bytes = available_bytes() if max_bytes is None else max_bytes
    if force:
        return
    if est["seconds"] > MAX_LOCAL_SECONDS and not address:
        raise MessError(f"the space has {describe(est)}, over {human_seconds(MAX_LOCAL_SECONDS)}: pass --force to "
                        "run it here, or --address of a Ray cluster with more cores; or shrink it (fewer exits, "
                        "positions, heads or thresholds; shared thresholds)")
    if est["bytes"] > max_bytes:
        raise MessError(f"a shard of the space needs about {est['bytes'] / 2**30:.1f} GiB, over the "
                        f"{max_bytes / 2**30:.1f} GiB available: shrink it or pass --force")


def space_estimates(space, macs, n_images: int, cores: int, seconds: float = MEASURE_SECONDS) -> dict:
    """Estimated search time of a space on `cores` of this machine, shared and per-exit thresholds, from the
    evaluator's rate measured on a synthetic cache of n_images images (its exit statistics only)."""
    per_image = (len(space.positions) * len(space.heads) + 1) * (space.num_classes + 4) * SYNTHETIC_BYTES
    free = available_bytes()
    if n_images * per_image > free:   # refused, not left to fill the machine's memory
        raise MessError(f"--images {n_images}: the search-time estimate would hold a synthetic cache of about "
                        f"{n_images * per_image / 2**30:.1f} GiB, over the {free / 2**30:.1f} GiB available; allowed "
                        f"up to {free // per_image} images here, or --no-estimate")
    cache = synthetic_cache(space.positions, space.head_names, n_images, space.num_classes)
    out = {}
    for mode in ("shared", "per-exit"):
        spec = SearchSpec(positions=list(space.positions), heads=list(space.head_names),
                          thresholds=tuple(space.thresholds), max_exits=space.max_exits, thresholds_mode=mode,
                          mode=space.mode)
        est = estimate(prepare(cache, spec, macs), spec, plan_items(spec), cores, seconds / 2)
        out[mode] = {k: est[k] for k in ("n_configs", "configs_per_cpu_s", "cores", "seconds")}
    out["n_images"] = n_images
    return out
