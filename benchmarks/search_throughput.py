"""Search throughput on the reference spaces, shared and per-exit thresholds: one JSON line.

Reference cache: 500 images, deeplabv3_resnet50 at 520x520 (16 candidate positions: every Bottleneck block),
8 head variants, up to 3 early exits, 21 classes. Shared mode: 20 thresholds (5,890,560 configurations);
per-exit mode: 10 thresholds per exit (287,489,280 configurations). For each mode: the whole search through
Ray Tune (Ray start and the driver's import of Ray Tune timed apart, then search to Parquet written), the
evaluator's configurations per CPU-second (summed over the trials), each shard's evaluation time and its trial's
load of the compiled kernel before it, and peak memory (driver and largest trial process).
--baselines adds a plain per-architecture numpy loop and one-configuration-per-trial Tune (shared mode only).
`kernels_first_call_s` is the driver's first search of a tiny cache: loading the compiled kernels from numba's
cache (or compiling them, once per machine and source version); the trials load them from that cache too.
BLAS and OpenMP run one thread in this process and the Ray workers it starts (the kernels use neither).

    PYTHONPATH=$PWD python benchmarks/search_throughput.py            # both modes, ~1-3 min on two cores
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):   # before numpy; Ray workers inherit
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from messearch.cache_format import CacheArrays  # noqa: E402
from messearch.front import write_front  # noqa: E402
from messearch.costs import CostTable as Costs  # noqa: E402
from messearch.search_spec import SearchSpec  # noqa: E402
from messearch.search_driver import run_search, search_local  # noqa: E402

POSITIONS = [f"backbone.layer{l}.{b}" for l, n in ((1, 3), (2, 4), (3, 6), (4, 3)) for b in range(n)]
HEADS = [f"head{j}" for j in range(8)]
SIZE = 520


def random_cache(seed: int = 0, n: int = 500, c: int = 21, n_bins: int = 20) -> CacheArrays:
    """A consistent random cache: tp <= pred, tp <= gt, gt sums to the labelled pixels, n_above non-increasing
    with n_above[..., 0] = n_pixels, conf_mean in [1/C, 1], deeper exits more accurate on average."""
    rng = np.random.default_rng(seed)
    e = len(POSITIONS) * len(HEADS) + 1
    n_pixels = np.full(n, SIZE * SIZE, dtype=np.int64)
    valid = n_pixels - rng.integers(0, SIZE * SIZE // 20, n)                     # ignore-index pixels removed
    present = rng.random((n, c)) < 0.15
    present[:, 0] = True                                                          # background everywhere
    share = rng.dirichlet(np.ones(c), n) * present
    share /= share.sum(axis=1, keepdims=True)
    gt = np.floor(share * valid[:, None]).astype(np.int64)
    gt[:, 0] += valid - gt.sum(axis=1)
    depth = np.concatenate([np.repeat(np.linspace(0.0, 0.85, len(POSITIONS)), len(HEADS)), [1.0]])
    head_q = np.concatenate([np.tile(np.linspace(0.0, 0.05, len(HEADS)), len(POSITIONS)), [0.05]])
    difficulty = rng.beta(2, 5, n)[:, None]
    acc = np.clip(0.55 + 0.35 * depth[None, :] + head_q[None, :] - 0.3 * difficulty
                  + rng.normal(0, 0.05, (n, e)), 0.05, 0.99)
    tp = rng.binomial(gt[:, None, :], acc[:, :, None])                            # [n, e, c]
    errors = gt[:, None, :] - tp
    to_other = np.ones((c, c)) - np.eye(c)
    to_other /= to_other.sum(axis=1, keepdims=True)
    moved = rng.multinomial(errors, to_other)                                     # [n, e, c_from, c_to]
    pred = tp + moved.sum(axis=2)
    conf = np.clip(acc + rng.normal(0, 0.05, (n, e)), 1.0 / c, 1.0)
    lo = np.clip(2 * conf - 1, 1.0 / c, None)                                     # pixel conf ~ U[lo, 1], mean ~ conf
    edges = np.arange(n_bins + 1) / n_bins
    frac = np.clip((1 - np.maximum(edges[None, None, :], lo[..., None])) / (1 - lo[..., None] + 1e-12), 0, 1)
    n_above = np.minimum.accumulate(np.floor(frac * n_pixels[:, None, None]).astype(np.int64), axis=2)
    n_above[..., 0] = n_pixels[:, None]
    return CacheArrays(image_ids=[f"img{i:04d}" for i in range(n)], positions=POSITIONS, heads=HEADS, tp=tp,
                       pred=pred, gt=gt, conf_mean=conf, n_above=n_above, n_pixels=n_pixels, meta={"n_bins": n_bins})


def reference_macs() -> Costs:
    """Plausible MACs of deeplabv3_resnet50 at 520x520 (output stride 8): ~178 GMACs with the ASPP head."""
    g = 10 ** 9
    per_block = [3.3] * 3 + [4.4, 3.7, 3.7, 3.7] + [15.5] + [14.9] * 5 + [16.0, 14.6, 14.6]
    bb = (np.cumsum(per_block) + 2.4) * g
    width = np.array([1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 4, 4, 4, 8, 8, 8], dtype=float)
    head = (0.4 + 0.35 * width[:, None] * np.linspace(0.5, 2.0, len(HEADS))[None, :]) * g
    return Costs(POSITIONS, HEADS, bb.astype(np.int64), int(bb[-1]), head.astype(np.int64), int(15.3 * g), "macs")


def plain_numpy_rate(cache: CacheArrays, spec: SearchSpec, n_arch: int = 200, seed: int = 0) -> float:
    """Configurations/s of a plain loop: one architecture at a time, all thresholds, numpy inside."""
    rng = np.random.default_rng(seed)
    thr = np.asarray(spec.thresholds)
    x = np.concatenate([cache.tp, cache.pred], axis=2)
    gt = cache.gt.sum(axis=0)
    from messearch import stats
    archs = [tuple(sorted(rng.choice(len(POSITIONS), 3, replace=False))) for _ in range(n_arch)]
    t0 = time.perf_counter()
    for pos in archs:
        hs = rng.integers(0, len(HEADS), 3)
        ex = [p * len(HEADS) + h for p, h in zip(pos, hs)] + [x.shape[1] - 1]
        passed = cache.conf_mean[:, ex[:-1], None] >= thr[None, None, :]          # [N, k, T]
        passed = np.concatenate([passed, np.ones((cache.n_images, 1, len(thr)), bool)], axis=1)
        taken = np.argmax(passed, axis=1)                                         # [N, T]
        counts = np.stack([x[np.arange(cache.n_images), np.asarray(ex)[taken[:, t]]].sum(axis=0)
                           for t in range(len(thr))])
        c = cache.gt.shape[1]
        stats.miou_from_counts(counts[:, :c], counts[:, c:], gt)
    return n_arch * len(thr) / (time.perf_counter() - t0)


def per_trial_tune_rate(cache: CacheArrays, trials: int = 10) -> float:
    """Configurations/s when every Tune trial evaluates one configuration (default Tune settings)."""
    from ray import tune
    x = np.concatenate([cache.tp, cache.pred], axis=2)

    def one(config, x=None, conf=None):
        ex = [config["e"], x.shape[1] - 1]
        taken = np.where(conf[:, ex[0]] >= 0.7, ex[0], ex[1])
        tune.report({"tp0": int(x[np.arange(len(taken)), taken, 0].sum())})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        grid = tune.Tuner(tune.with_parameters(one, x=x, conf=cache.conf_mean),
                          param_space={"e": tune.grid_search(list(range(trials)))},
                          run_config=tune.RunConfig(storage_path=d, verbose=0)).fit()
        assert not grid.errors
    return trials / (time.perf_counter() - t0)


SPECS = {
    "shared": dict(thresholds=tuple(np.round(np.linspace(0.5, 0.975, 20), 4)), thresholds_mode="shared"),
    "per-exit": dict(thresholds=tuple(np.round(np.linspace(0.5, 0.95, 10), 4)), thresholds_mode="per-exit"),
}


def search_once(cache: CacheArrays, spec: SearchSpec, macs: Costs, shards: int, workdir: str) -> dict:
    """One search through Ray Tune (Ray already started) to Parquet written: its figures."""
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):   # Tune's tables; stdout keeps the one JSON line
        df = run_search(cache, spec, macs, shards=shards, storage_path=os.path.join(workdir, "tune"), verbose=False)
    write_front(df, os.path.join(workdir, "pareto.parquet"), {"mode": spec.mode, "thresholds": spec.thresholds_mode})
    seconds = time.perf_counter() - t0
    n = df.attrs["n_evaluated"]
    assert n == spec.n_configs(), (n, spec.n_configs())
    return {"n_configs": n, "shards": len(df.attrs["shard_eval_s"]), "front_size": len(df), "search_s": round(seconds, 2), "configs_per_s": round(n / seconds),
            "evaluator_configs_per_cpu_s": round(n / df.attrs["shard_cpu_s"]),
            "evaluator_configs_per_thread_cpu_s": round(n / df.attrs["shard_thread_cpu_s"]),
            "shard_eval_s": [round(x, 2) for x in sorted(df.attrs["shard_eval_s"])],
            "trial_kernels_s": [round(x, 2) for x in sorted(df.attrs["shard_kernels_s"])],
            "trial_peak_rss_mb": round(df.attrs["trial_max_rss_mb"]),
            "best_speedup_at_0.5pp": round(float(df[df.miou_delta_pp >= -0.5].speedup.max()), 3),
            "load_average_1min_after": round(os.getloadavg()[0], 1)}, df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="shared,per-exit", help="comma-separated: shared, per-exit")
    ap.add_argument("--shards", type=int, default=None, help="default: sized from the measured rate, as `messearch search` does")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--baselines", action="store_true", help="also time a numpy loop and one-config-per-trial Tune")
    ap.add_argument("--per-exit-thresholds", type=int, default=10,
                    help="thresholds per exit of the per-exit space (10: the reference's 287,489,280 configurations)")
    args = ap.parse_args()
    import ray
    load0 = os.getloadavg()
    cache = random_cache()
    macs = reference_macs()
    out = {"num_cpus": args.num_cpus, "shards_asked": args.shards, "load_average_1_5_15_before": [round(x, 1) for x in load0]}
    t0 = time.perf_counter()
    tiny = random_cache(n=20)
    for mode in args.modes.split(","):
        search_local(tiny, SearchSpec(positions=POSITIONS[-3:], heads=HEADS[:2], max_exits=3, **SPECS[mode]), macs)
    out["kernels_first_call_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    out["ray_start_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    from ray import tune  # noqa: F401  (the driver's first import of Ray Tune, timed apart as the Ray start is)
    out["tune_import_s"] = round(time.perf_counter() - t0, 2)
    for mode in args.modes.split(","):
        grid = dict(SPECS[mode])
        if mode == "per-exit" and args.per_exit_thresholds != 10:
            grid["thresholds"] = tuple(np.round(np.linspace(0.5, 0.95, args.per_exit_thresholds), 4))
        spec = SearchSpec(positions=POSITIONS, heads=HEADS, max_exits=3, **grid)
        with tempfile.TemporaryDirectory() as d:
            out[mode], df = search_once(cache, spec, macs, args.shards, d)
        print(f"{mode}: {json.dumps(out[mode])}", file=sys.stderr, flush=True)   # kept if a later mode is cut short
        if args.baselines and mode == "shared":
            numpy_rate, trial_rate = plain_numpy_rate(cache, spec), per_trial_tune_rate(cache)
            rate = out[mode]["configs_per_s"]
            out[mode].update({"numpy_loop_configs_per_s": round(numpy_rate),
                              "tune_per_trial_configs_per_s": round(trial_rate, 2),
                              "speedup_vs_numpy_loop": round(rate / numpy_rate, 1),
                              "speedup_vs_per_trial_tune": round(rate / trial_rate)})
    ray.shutdown()
    out["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out["load_average_1_5_15_after"] = [round(x, 1) for x in os.getloadavg()]
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
