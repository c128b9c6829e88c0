"""Candidate designs of the embedded quickstart (scenes x model x recipe), each trained as the quickstart trains it,
over several seeds, and judged by issue 17's figures, on one device without Ray (a GPU runs many at once).

For each (variant, seed): both training stages of the quickstart space with the variant's overrides, the val cache
(in process), every configuration searched (in process), then: the original model's val mIoU and learning curve,
the best single exit at the shallowest position, before the last stage and overall, the mean single-exit mIoU per
stage, the best MACs speed-up within 0.5 pp on the front, the same per difficulty level, the model's GMACs and the
training time. One JSON line per job in OUT/jobs.jsonl (a rerun skips finished jobs); OUT/summary.json holds the
mean and spread per variant; one JSON line on stdout.

    python benchmarks/quickstart_design.py --device cuda --procs 6 --seeds 0,1,2 --budget-s 300 --out OUT
    python benchmarks/quickstart_design.py --smoke --device cpu --out /tmp/qd_smoke      # same path, tiny
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT)]

# name -> (scene design overrides, space overrides, train overrides); the first is the shipped default.
FAST = {"train_images": 160, "epochs_stage1": 5, "epochs_stage2": 2}   # ~1,100 image passes: the 3-minute budget
CAST = {"cast_sigma": 0.25, "cast_ramp": [1 / 3, 1 / 2]}
OS8 = {"model": "lraspp_resnet18_os8"}
ODD3, ODD5 = {"odd_until": 1 / 3}, {"odd_until": 0.5}
ODD5_KEPT = {**ODD5, "colour_kept_until": 1.0, "texture_kept_until": 1.0}
VARIANTS: dict[str, tuple[dict, dict, dict]] = {
    "shipped": ({}, {}, {}),
    "shipped_fast": ({}, {}, FAST),
    "cast_fast": (CAST, {}, FAST),
    "cast15_fast": ({**CAST, "cast_sigma": 0.15}, {}, FAST),
    "cast_big_fast": ({**CAST, "radius": [0.25, 0.35]}, {}, FAST),
    "cast_blocks_fast": ({**CAST, "camo_block": 0.25, "camo_ramp": [1 / 3, 2 / 3]}, {}, FAST),
    "cast_112_fast": (CAST, {"input_size": [112, 112]}, FAST),
    "os8_80_cast_fast": (CAST, {**OS8, "input_size": [80, 80]}, FAST),
    "os8_80_cast_big_fast": ({**CAST, "radius": [0.25, 0.35]}, {**OS8, "input_size": [80, 80]}, FAST),
    # Round 2 (after round 1: a cast on medium scenes costs the original model 7-19 pp; output stride 8 makes
    # the stage means rise): output stride 8 on the shipped scenes, with milder or hard-only context cues.
    "os8_80_fast": ({}, {**OS8, "input_size": [80, 80]}, FAST),
    "os8_80_6ep": ({}, {**OS8, "input_size": [80, 80]}, {**FAST, "epochs_stage1": 6}),
    "os8_80_hardcast_fast": ({"cast_sigma": 0.2, "cast_ramp": [2 / 3, 1.0]}, {**OS8, "input_size": [80, 80]}, FAST),
    "os8_80_mildcast_fast": ({"cast_sigma": 0.1, "cast_ramp": [1 / 3, 2 / 3]}, {**OS8, "input_size": [80, 80]}, FAST),
    "os8_80_bigblocks_fast": ({"camo_block": 0.25}, {**OS8, "input_size": [80, 80]}, FAST),
    "os8_80_mixhard_fast": ({}, {**OS8, "input_size": [80, 80], "data": "synthetic:mix=1/1/2"}, FAST),
    "os8_96_128img": ({}, {**OS8, "input_size": [96, 96]}, {**FAST, "train_images": 128}),
    "hardcast_fast": ({"cast_sigma": 0.2, "cast_ramp": [2 / 3, 1.0]}, {}, FAST),
    # Round 3 (eighth session, CPU): from medium scenes on, the class hue only on a rim; the inside neutral
    # or in another class's hue (a decoy), so a pixel inside needs a view that reaches the rim.
    "rim": ({"rim_from": 1 / 3}, {}, {}),
    "rim_decoy": ({"rim_from": 1 / 3, "rim_decoy": True}, {}, {}),
    "rim_big": ({"rim_from": 1 / 3, "radius": [0.3, 0.4], "rim_width": 0.05}, {}, {}),
    "shape_medium": ({"colour_kept_until": 1 / 3, "texture_kept_until": 1 / 3}, {}, {}),
    # Round 4 (tenth session, CPU): context. From medium scenes on, an object may be anonymous (neutral grey, a random
    # shape and texture), and only a frame at the image border, in its class's hue, names its class; LR-ASPP's
    # global pooling reads the frame, a layer1 view (27-67 px) mostly does not.
    "context": ({"frame_width": 0.05}, {}, {}),
    "context_p1": ({"frame_width": 0.05, "anon_p": 1.0}, {}, {}),
    "context_12ep": ({"frame_width": 0.05}, {}, {"epochs_stage1": 12}),
    "shipped_12ep": ({}, {}, {"epochs_stage1": 12}),
    "shipped_s2x6": ({}, {}, {"epochs_stage2": 6}),
    # Closer hues (8 object classes), or full camouflage from the medium scenes on: a local view's colour misleads more.
    "classes9": ({}, {"num_classes": 9}, {}),
    "camo_medium": ({"camo_ramp": [1 / 3, 2 / 3]}, {}, {}),
    "classes7": ({}, {"num_classes": 7}, {}),
    "classes9_9ep": ({}, {"num_classes": 9}, {"epochs_stage1": 9}),
    # Look-alike classes: with 8 object classes the even ones' hues lie between the odd ones', and the scenes below
    # h = odd_until hold only the odd ones, so that easy scenes can leave early and the look-alikes come with clutter.
    "classes9_easyodd": (ODD3, {"num_classes": 9}, {}),
    "classes9_easyodd_9ep": (ODD3, {"num_classes": 9}, {"epochs_stage1": 9}),
    "classes9_easyodd_tex": ({**ODD3, "texture_kept_until": 1.0}, {"num_classes": 9}, {}),
    "classes9_easyodd_col": ({**ODD3, "colour_kept_until": 1.0}, {"num_classes": 9}, {}),
    "classes9_odd05_col": ({**ODD5, "colour_kept_until": 1.0}, {"num_classes": 9}, {}),
    "classes9_odd05_col_9ep": ({**ODD5, "colour_kept_until": 1.0}, {"num_classes": 9}, {"epochs_stage1": 9}),
    "classes9_odd05_coltex": (ODD5_KEPT, {"num_classes": 9}, {}),
    "classes9_odd05_coltex_9ep": (ODD5_KEPT, {"num_classes": 9}, {"epochs_stage1": 9}),
    "classes9_odd05_coltex_s2x6": (ODD5_KEPT, {"num_classes": 9}, {"epochs_stage2": 6}),
    # Stage 1's eight auxiliary exits weigh 0.5 each against the final head's 1: lighter exit losses
    "exitw_025": ({}, {}, {"exit_loss_weight": 0.25}),
    "exitw_01": ({}, {}, {"exit_loss_weight": 0.1}),
}
SMOKE = {"space": {"input_size": [32, 32], "positions": ["backbone.layer1.0", "backbone.layer3.1", "backbone.layer4.1"]},
         "train": {"train_images": 8, "val_images": 4, "epochs_stage1": 1, "epochs_stage2": 1, "batch_size": 4},
         "data": "synthetic:seed=0,train=8,val=8"}


def use_scenes(variant: str) -> None:
    """Make the variant's scene design the synthetic data's default in this process (workers render with it)."""
    import dataclasses

    from messearch import data_synthetic

    scene = {k: tuple(v) if isinstance(v, list) else v for k, v in VARIANTS[variant][0].items()}
    data_synthetic.DESIGN = dataclasses.replace(data_synthetic.SceneDesign(), **scene)


def _space(variant: str, seed: int, smoke: bool):
    import yaml

    from messearch.pipeline import QUICKSTART_SPACE
    from messearch.space import load_space, space_from_text

    _, space_kw, train_kw = VARIANTS[variant]
    raw = yaml.safe_load(load_space(QUICKSTART_SPACE).text)
    raw.update(space_kw)
    raw["train"].update(train_kw, seed=seed)
    if smoke:
        raw.update(SMOKE["space"], data=SMOKE["data"])
        raw["train"].update(SMOKE["train"])
    return space_from_text(yaml.safe_dump(raw, sort_keys=False), f"quickstart[{variant}, seed {seed}]")


def _levels(space, cache):
    """Val image indices per difficulty level (from the generator's own record)."""
    import numpy as np

    from messearch.data import build_dataset

    ds = build_dataset(space.data, "val", space.input_size, num_classes=space.num_classes)
    where = {i: k for k, i in enumerate(ds.image_ids)}
    lv = np.array([ds.level[where[i]] for i in cache.image_ids])
    return {name: np.flatnonzero(lv == k) for k, name in enumerate(("easy", "medium", "hard"))}


def run_job(variant: str, seed: int, device: str, out: str, smoke: bool) -> dict:
    """Train, cache and search one (variant, seed); returns its figures (also on error: the error)."""
    import torch

    torch.set_num_threads(2)
    use_scenes(variant)
    from messearch.cache import build_cache
    from messearch.cache_format import load_cache
    from messearch.exit_quality import single_exit_miou, stage_means, structure_report
    from messearch.front import speedup_at_equal_accuracy
    from messearch.search_driver import SearchOptions, search_to_front
    from messearch.train import train

    run = Path(out) / f"{variant}-s{seed}"
    t0 = time.perf_counter()
    try:
        space = _space(variant, seed, smoke)
        torch.manual_seed(seed)
        ckpt = train(space, None, run, device=device, progress=False)
        t_train = time.perf_counter() - t0
        build_cache(ckpt, space.data, "val", run / "cache", local=True, device=device, progress=False)
        cache = load_cache(run / "cache")
        front = search_to_front(run / "cache", run / "pareto.parquet", SearchOptions(local=True, bootstrap=0))
        miou = single_exit_miou(cache)
        rep = structure_report(miou, cache.positions)
        levels = {}
        for name, idx in _levels(space, cache).items():
            if len(idx):
                m = single_exit_miou(cache, images=idx)
                r = structure_report(m, cache.positions)
                levels[name] = {"n": int(len(idx)), "final": r["final"], "best_shallowest": r["best_shallowest"],
                                "stage_means": stage_means(m)}
        rows = list(csv.DictReader((run / "train_log.csv").open()))
        ref = front[front["is_reference"]].iloc[0]
        return {"variant": variant, "seed": seed, "final": rep["final"], "best_shallowest_exit": rep["best_shallowest"],
                "gap_shallowest_pp": 100 * (rep["final"] - rep["best_shallowest"]), "best_before_last": rep["best_before_last_stage"],
                "best_exit": rep["best_exit"], "stage_means": rep["stage_means"], "rise": rep["stage_means_rise"],
                "speedup": speedup_at_equal_accuracy(front, 0.5), "levels": levels, "gmacs": float(ref["mean_gmacs"]),
                "curve": [round(float(r["miou:final"]), 4) for r in rows if r["stage"] != "2"],
                "train_s": round(t_train, 1), "total_s": round(time.perf_counter() - t0, 1)}
    except Exception as e:  # noqa: BLE001 - one bad job must not stop the sweep
        return {"variant": variant, "seed": seed, "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc()[-1500:]}


def _meets(r: dict) -> dict:
    """Issue 17's figures for one job: which hold."""
    return {"final>=70": r["final"] >= 0.70, "gap>=10pp": r["gap_shallowest_pp"] >= 10.0,
            "before_last<final": r["best_before_last"] < r["final"], "best<=final+0.5pp": r["best_exit"] <= r["final"] + 0.005,
            "rise": bool(r["rise"]), "speedup>=2": r["speedup"] >= 2.0}


def summarise(rows: list[dict]) -> dict:
    """Mean (and min, max) of each figure per variant, and how many seeds meet each criterion."""
    import numpy as np

    out = {}
    for v in dict.fromkeys(r["variant"] for r in rows if "variant" in r):
        mine = [r for r in rows if r["variant"] == v and "error" not in r]
        if not mine:
            out[v] = {"errors": [r["error"] for r in rows if r["variant"] == v]}
            continue
        fig = lambda k: [float(r[k]) for r in mine]  # noqa: E731
        s = {k: {"mean": round(float(np.mean(fig(k))), 4), "min": round(min(fig(k)), 4), "max": round(max(fig(k)), 4)}
             for k in ("final", "gap_shallowest_pp", "best_before_last", "best_exit", "speedup", "gmacs", "train_s")}
        s["seeds"] = len(mine)
        s["meets"] = {k: sum(_meets(r)[k] for r in mine) for k in _meets(mine[0])}
        s["all_met_seeds"] = sum(all(_meets(r).values()) for r in mine)
        out[v] = s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--procs", type=int, default=1, help="jobs at once (one process each)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no job after this many seconds")
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "jobs.jsonl"
    done = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    have = {(r["variant"], r["seed"]) for r in done if "error" not in r}
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    jobs = [(v, int(s)) for s in args.seeds.split(",") for v in variants if (v, int(s)) not in have]  # seed-major
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    # SIGTERM (kill, pkill) unwinds through the `with` below, which terminates the jobs: none outlives this process
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with ctx.Pool(args.procs, maxtasksperchild=1) as pool:
        pending = []
        for job in jobs:
            pending.append(pool.apply_async(run_job, (*job, args.device, str(out), args.smoke)))
        for p, job in zip(pending, jobs):
            left = args.budget_s - (time.perf_counter() - t0)
            try:
                r = p.get(timeout=max(left, 1.0))
            except mp.TimeoutError:
                print(f"[design] budget spent; {job} and later jobs not finished", file=sys.stderr, flush=True)
                pool.terminate()
                break
            done.append(r)
            with log.open("a") as f:
                f.write(json.dumps(r, default=float) + "\n")
            brief = r.get("error") or (f"final {100 * r['final']:.1f}% gap {r['gap_shallowest_pp']:.1f} pp "
                                       f"rise {r['rise']} speed-up {r['speedup']:.2f}x train {r['train_s']}s")
            print(f"[design] {time.perf_counter() - t0:6.0f}s {job[0]} seed {job[1]}: {brief}", file=sys.stderr, flush=True)
    summary = summarise(done)
    # The pick (for the ablation that follows on the same machine): the variant, other than the shipped recipe,
    # whose seeds meet the most of issue 17's figures; ties go to the larger mean speed-up.
    ranked = sorted((v for v, s in summary.items() if v != "shipped" and "meets" in s),
                    key=lambda v: (summary[v]["all_met_seeds"], sum(summary[v]["meets"].values()),
                                   summary[v]["speedup"]["mean"]), reverse=True)
    summary["pick"] = ranked[0] if ranked else "shipped"
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    print(json.dumps({"benchmark": "quickstart_design", "device": args.device, "seconds": round(time.perf_counter() - t0, 1),
                      "load_avg": os.getloadavg(), "summary": summary}, default=float))


if __name__ == "__main__":
    main()
