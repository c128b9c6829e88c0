"""The GPU path in one prepared run, without Ray: train camvid_deeplabv3_resnet50 from random initialisation (both
stages), cache val, search (--local, CPU), export the cheapest row within 0.5 pp and evaluate it at batch 1 on the
device. One JSON file, rewritten after every phase (a run cut short still returns what it measured).

    python benchmarks/gpu_suite.py --device cuda --budget-s 420 --out $OUT/gpu_suite.json     # one H200, ~7 min
    python benchmarks/gpu_suite.py --smoke --device cpu --out /tmp/gpu_suite_smoke.json       # same path, tiny (CI)

Phases: probe (training-step times and the cache/plain pass ratio on a random network, which also size the
epochs), train (both stages; epochs sized to the budget, a stage ends early and cleanly when its time is spent),
cache (batch 1: the exact one the search reads; and batch B: the fast one, compared with it), profile, search,
export, evaluate (batch 1; batch B with compare-batch1). See benchmarks/README.md for the device command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path


class _RayWatch:
    """Remembers every attempt to import ray (the suite must never make one)."""

    seen: list = []

    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            self.seen.append(name)
        return None


sys.meta_path.insert(0, _RayWatch())

import torch  # noqa: E402
import yaml  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]   # messearch from this checkout; the sibling benchmarks' functions

from cache_ratio import measure as cache_ratio  # noqa: E402
from train_stage2_speed import step_times  # noqa: E402

from messearch.data import build_dataset  # noqa: E402
from messearch.model import MESSNetwork  # noqa: E402
from messearch.devices import device_name, exact_numerics  # noqa: E402
from messearch.space import space_from_text  # noqa: E402
from messearch.train_stages import Runtime  # noqa: E402

SPACE = ROOT / "messearch" / "spaces" / "camvid_deeplabv3_resnet50.yaml"
# The shared CamVid copy: ../shared beside the checkout (or beside the folder of worktrees), or shared/ inside it.
CAMVID = next((p for p in (ROOT / "shared", ROOT.parent / "shared", ROOT.parents[1] / "shared")
               if (p / "data" / "camvid" / "val.txt").exists()), ROOT.parent / "shared") / "data" / "camvid"
TOL_PP = 0.5
SMOKE = {"input_size": [32, 32], "heads": ["lin", "c1"], "batch": 2, "train_images": 4, "val_images": 4,
         "positions": ["backbone.layer1.2", "backbone.layer2.3", "backbone.layer3.5", "backbone.layer4.2"],
         "thresholds": {"start": 0.5, "stop": 0.9, "num": 4}, "max_exits": 2, "max_epochs": 1, "max_steps": 2,
         "budget_s": 120.0}


class Report:
    """The JSON file: rewritten atomically after every phase, with the phases' times and the figures so far."""

    def __init__(self, path: Path, head: dict):
        self.path, self.t0 = path, time.perf_counter()
        self.data = {"benchmark": "gpu_suite", **head, "phases": {}, "figures": {}, "complete": False}
        self.write()

    def write(self) -> None:
        self.data["wall_s"] = round(time.perf_counter() - self.t0, 2)
        self.data["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
        self.data["ray_imported"] = bool(_RayWatch.seen) or "ray" in sys.modules
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=float))
        os.replace(tmp, self.path)

    def phase(self, name: str, fn, *args):
        """Run one phase, time it, record what it returns (or its error) and rewrite the file."""
        _say(f"{name} ...")
        t, cpu = time.perf_counter(), time.process_time()
        try:
            out = fn(*args)
        except BaseException as e:
            self.data["phases"][name] = {"seconds": round(time.perf_counter() - t, 2), "error": f"{type(e).__name__}: {e}",
                                         "traceback": traceback.format_exc()[-3000:]}
            self.data["failed_phase"] = name
            self.write()
            raise
        rec, figures = out if isinstance(out, tuple) else (out, {})
        self.data["phases"][name] = {"seconds": round(time.perf_counter() - t, 2),
                                     "cpu_s": round(time.process_time() - cpu, 2), **rec}
        self.data["figures"].update(figures)
        self.write()
        _say(f"{name}: {self.data['phases'][name]['seconds']:.1f} s")
        return rec


def _say(msg: str) -> None:
    print(f"[gpu_suite {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _subset(src: Path, dst: Path, n_train: int, n_val: int) -> Path:
    """A CamVid folder with the first n images of each split (links to the originals): the smoke run's data."""
    dst.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        (dst / f"{split}.txt").write_text("".join((src / f"{split}.txt").read_text().splitlines(True)[:n]))
        for folder in (split, split + "annot"):
            if not (dst / folder).exists():
                (dst / folder).symlink_to(src / folder)
    return dst


def suite_space(args, epochs=(1, 1)):
    """The camvid_deeplabv3_resnet50 space with this run's data, epochs and (smoke) reductions."""
    raw = yaml.safe_load(SPACE.read_text())
    raw["data"] = args.data
    if args.smoke:
        raw.update(input_size=SMOKE["input_size"], positions=SMOKE["positions"], thresholds=SMOKE["thresholds"],
                   max_exits=SMOKE["max_exits"], heads=[h for h in raw["heads"] if h["name"] in SMOKE["heads"]])
    raw["train"] = dict(raw["train"], batch_size=args.batch, epochs_stage1=epochs[0], epochs_stage2=epochs[1],
                        val_images=args.val_images_per_epoch, num_workers=args.workers)
    return space_from_text(yaml.safe_dump(raw, sort_keys=False), f"{SPACE.name} (gpu_suite{' smoke' if args.smoke else ''})")


def _exact_numerics(device: torch.device, exact: bool = True) -> None:
    """Exact: devices.exact_numerics (what the cache and evaluate set themselves); else training's fast settings
    (autotuning on, as `messearch train` sets it, deterministic off)."""
    if exact:
        exact_numerics(device)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False


def probe(args, space, dev):
    """Training-step times (plain, stage 1, stage 2, one head at a time) and the cache/plain pass ratio at the
    cache's batch size, on a random network and real images: figures of the report and the epochs' sizing."""
    rt = Runtime(device=dev, progress=False)
    _exact_numerics(dev, exact=False)   # as training runs
    train_ds = build_dataset(args.data, "train", space.input_size, train=False, num_classes=space.num_classes)
    items = [train_ds[i] for i in range(args.batch)]
    x, y = torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])
    t = time.perf_counter()
    torch.manual_seed(0)
    net = MESSNetwork(space).to(dev, memory_format=rt.memory_format)
    t_build, t = time.perf_counter() - t, time.perf_counter()
    steps = step_times(net, space, x, y, rt, reps=args.reps, stage1=True)
    t_steps, t = time.perf_counter() - t, time.perf_counter()
    _exact_numerics(dev)
    net = net.to(memory_format=torch.contiguous_format).eval()   # the cache's network comes from a checkpoint
    val = build_dataset(args.data, "val", space.input_size, train=False, num_classes=space.num_classes)
    n = min(len(val), args.ratio_batches * args.cache_batch)
    batches = []
    for lo in range(0, n, args.cache_batch):
        its = [val[i] for i in range(lo, min(n, lo + args.cache_batch))]
        batches.append((torch.stack([a for a, _ in its]).to(dev), torch.stack([b for _, b in its]).to(dev)))
    ratio = cache_ratio(net, batches, dev, space.policy.n_bins, repeats=args.reps)
    t_ratio = time.perf_counter() - t
    del net
    _exact_numerics(dev, exact=False)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    rec = {"batch": args.batch, "cache_batch": args.cache_batch, "ratio_images": n, "build_s": round(t_build, 2),
           "steps_timing_s": round(t_steps, 2), "ratio_timing_s": round(t_ratio, 2),
           **{k: round(v, 5) for k, v in steps.items()}, "cache_vs_plain": ratio}
    figures = {"cache_vs_plain_ratio": {"value": ratio["ratio"], "goal": "<= 2", "met": ratio["ratio"] <= 2,
                                        "batch": args.cache_batch, "images": n},
               "stage2_vs_plain_step": {"value": round(steps["stage2_vs_plain_step"], 3), "goal": "<= 3",
                                        "met": steps["stage2_vs_plain_step"] <= 3, "batch": args.batch},
               "stage2_vs_heads_one_at_a_time": {"value": round(steps["one_at_a_time_vs_stage2"], 3), "goal": ">= 10",
                                                 "met": steps["one_at_a_time_vs_stage2"] >= 10, "batch": args.batch}}
    return rec, figures


def plan_training(args, space, steps: dict, elapsed: float, n_val: int) -> dict:
    """Epochs of each stage (and steps per epoch) that fit the budget left once the later phases are reserved."""
    n_train = len(build_dataset(args.data, "train", space.input_size, num_classes=space.num_classes))
    per_epoch = n_train // args.batch
    val_batches = math.ceil(min(n_val, args.val_images_per_epoch or n_val) / args.batch)
    ratio = steps["cache_vs_plain"]
    cache_img = ratio["cache_s"] / max(1, steps["ratio_images"])
    plain_img = ratio["plain_s"] / max(1, steps["ratio_images"])
    n_pieces = len(space.positions) + 2 + len(space.positions) * len(space.heads)
    reserve = (n_val * cache_img * 3                         # cache at batch 1 (about 2x batch B) and at batch B
               + n_pieces * (2.5 * args.profile_min_run_time)  # profile: every segment and head
               + space_configs(space) / 100_000              # search on the CPU (~1e5 configurations/s measured)
               + n_val * plain_img * 12                      # evaluate: two models at batch 1, 3 repeats; batch B
               + 20.0)                                       # model builds, export, files
    left = args.budget_s - elapsed - reserve
    fixed = 1.0 + 0.3 * args.workers   # each epoch starts its loaders' worker processes anew (train and val)
    epoch1 = per_epoch * steps["stage1_step_s"] * 1.15 + val_batches * steps["frozen_forward_s"] * 1.5 + fixed
    epoch2 = per_epoch * steps["stage2_step_s"] * 1.15 + val_batches * steps["stage2_step_s"] * 1.0 + fixed
    t1, t2 = left * (1 - args.stage2_share), left * args.stage2_share
    e1 = max(1, min(args.max_epochs, int(t1 // epoch1)))
    e2 = max(1, min(args.max_epochs, int(t2 // epoch2)))
    max_steps = args.max_steps
    if left < epoch1 + epoch2:   # not even one epoch each: fewer steps per epoch, evenly
        max_steps = max(1, int(per_epoch * max(left, 0) / (epoch1 + epoch2)))
        max_steps = min(max_steps, args.max_steps or max_steps)
    return {"train_images": n_train, "steps_per_epoch": per_epoch, "epochs_planned": [e1, e2], "max_steps": max_steps,
            "train_budget_s": round(left, 1), "reserved_s": round(reserve, 1),
            "epoch_estimate_s": [round(epoch1, 2), round(epoch2, 2)], "stage_budget_s": [round(t1, 1), round(t2, 1)]}


def space_configs(space) -> int:
    """The number of configurations the search evaluates (shared threshold)."""
    from messearch.config import count_configs

    return count_configs(len(space.positions), len(space.heads), len(space.thresholds), space.max_exits, "shared",
                         space.mode)


def train_stages(args, space_for, plan, dev, out: Path):
    """Both stages in this process, epochs as planned; a stage ends after the epoch that would overrun its time."""
    from messearch.checkpoint import read_checkpoint
    from messearch.train import train

    space = space_for(plan["epochs_planned"])
    t_start = time.perf_counter()
    deadlines = {"1": t_start + plan["stage_budget_s"][0], "2": t_start + plan["train_budget_s"]}
    last, ran, stopped = [t_start], {"1": 0, "2": 0}, {"1": False, "2": False}

    def on_epoch_end(kind, epoch, row):
        now = time.perf_counter()
        took, last[0] = now - last[0], now
        ran[kind] = epoch
        _say(f"train stage {kind} epoch {epoch}: {took:.1f} s, loss {row['loss']:.3f}, "
             f"{row['images_per_s']:.1f} images/s, val mIoU (final) {row.get('miou:final', float('nan')):.4f}")
        planned = plan["epochs_planned"][0 if kind == "1" else 1]
        if epoch < planned and now + took > deadlines[kind]:
            stopped[kind] = True
            _say(f"train stage {kind}: its time is spent; ending it after epoch {epoch} of {planned}")
            return True
        return False

    path = train(space, args.data, out, stage="both", device=str(dev), progress=False, max_steps=plan["max_steps"],
                 on_epoch_end=on_epoch_end)
    payload = read_checkpoint(path)
    extra, miou = payload["extra"], payload["exit_miou"]
    rec = {"checkpoint": str(path), "epochs_run": [ran["1"], ran["2"]], "stopped_early": [stopped["1"], stopped["2"]],
           "stage_seconds": {f"stage{k}": round(v, 2) for k, v in extra["seconds"].items()},
           "images_per_s": {f"stage{k}": round(v, 2) for k, v in extra["images_per_s"].items()},
           "val_miou_final_subset": round(miou.get("final", float("nan")), 4)}
    return rec


def cache_phase(args, ckpt, dev, out: Path):
    """The cache at batch 1 (what the exported model measures exactly) and at batch B (the fast pass), compared."""
    import numpy as np

    from messearch.cache import build_cache
    from messearch.cache_format import load_cache

    _exact_numerics(dev)
    rec = {}
    for name, batch in (("batch1", 1), (f"batch{args.cache_batch}", args.cache_batch)):
        t = time.perf_counter()
        m = build_cache(ckpt, args.data, "val", out / f"cache_{name}", batch_size=batch, local=True, device=str(dev),
                        progress=False)
        s = time.perf_counter() - t
        rec[name] = {"seconds": round(s, 2), "images_per_s": round(m.n_images / s, 2), "batch_size": batch,
                     "cache_sha256": m.cache_sha256, "exits": len(m.exits), "images": m.n_images}
    a, b = load_cache(out / "cache_batch1"), load_cache(out / f"cache_batch{args.cache_batch}")
    differ = (a.tp != b.tp).any(-1) | (a.pred != b.pred).any(-1) | (a.conf_mean != b.conf_mean) \
        | (a.n_above != b.n_above).any(-1)
    rec["batched_equals_batch1"] = bool(rec["batch1"]["cache_sha256"] == rec[f"batch{args.cache_batch}"]["cache_sha256"])
    rec["batched_differing_image_exits"] = int(differ.sum())
    rec["batched_differing_images"] = int(np.any(differ, axis=1).sum())
    return rec


def search_phase(args, dev, out: Path):
    """Profile every piece on the device, then the exhaustive search in this process (no Ray)."""
    from messearch.search_driver import SearchOptions, search_to_front
    from messearch.profile import profile_latency

    kind = "cuda" if dev.type == "cuda" else "cpu"
    prof = out / "profiles" / f"{kind}.parquet"
    prof.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    profile_latency(out / "train" / "mess.pt", device=str(dev), out=prof, min_run_time=args.profile_min_run_time,
                    progress=False)
    t_prof = time.perf_counter() - t
    t = time.perf_counter()
    df = search_to_front(out / "cache_batch1", out / "pareto.parquet", SearchOptions(local=True, profiles=[str(prof)]))
    s = time.perf_counter() - t
    n = int(df.attrs.get("n_evaluated", 0))
    return {"profile_seconds": round(t_prof, 2), "search_seconds": round(s, 2), "n_evaluated": n,
            "configs_per_s": round(n / s, 1), "front_rows": int((~df["is_reference"]).sum()), "cpu_count": os.cpu_count()}


def export_evaluate(args, dev, out: Path):
    """Export the cheapest row within 0.5 pp; measure it and the original model at batch 1 (and batch B)."""
    from messearch.evaluate import evaluate
    from messearch.export import export_model
    from messearch.front import cheapest_within, read_front, speedup_at_equal_accuracy

    front, _ = read_front(out / "pareto.parquet")
    ref = front[front["is_reference"]].iloc[0]
    chosen = cheapest_within(front, TOL_PP)
    lat_col = "latency_ms_cuda" if dev.type == "cuda" else "latency_ms_cpu"
    model = out / "model.pt"
    export_model(out / "train" / "mess.pt", out / "pareto.parquet", chosen["config_id"], model)
    _exact_numerics(dev)
    kw = dict(device=str(dev), progress=False, threads=1, warmup=args.warmup, repeat=args.repeat)
    t = time.perf_counter()
    m = evaluate(str(model), args.data, "val", batch_size=1, **kw)
    o = evaluate(str(out / "train" / "mess.pt"), args.data, "val", batch_size=1, **kw)
    mb = evaluate(str(model), args.data, "val", batch_size=args.cache_batch, compare_batch1=True, **kw)
    s = time.perf_counter() - t
    m, o, mb = m.to_json(), o.to_json(), mb.to_json()   # EvaluationResult -> the JSON keys `evaluate --json` prints
    exact = {k: bool(m[k] == chosen[k]) if k != "exit_rates" else list(m[k]) == list(chosen[k])
             for k in ("miou", "pixel_acc", "mean_gmacs", "exit_rates")}
    row = {"config_id": chosen["config_id"], "positions": list(chosen["positions"]), "heads": list(chosen["heads"]),
           "thresholds": [float(v) for v in chosen["thresholds"]], "miou": float(chosen["miou"]),
           "miou_delta_pp": float(chosen["miou_delta_pp"]), "speedup_macs": float(chosen["speedup"]),
           "exit_rates": [float(v) for v in chosen["exit_rates"]]}
    rec = {"seconds_evaluate": round(s, 2), "chosen": row, "measured_batch1": {k: m[k] for k in (
           "miou", "pixel_acc", "mean_gmacs", "exit_rates", "latency_ms_median", "latency_ms_p90")},
           "measured_batchB": {k: mb.get(k) for k in ("batch_size", "miou", "latency_ms_median", "n_pixels_differ",
                                                      "n_exits_differ", "max_abs_logit_diff")},
           "device_name": m["device_name"], "timer": m["timer"],
           "original_batch1": {k: o[k] for k in ("miou", "mean_gmacs", "latency_ms_median", "latency_ms_p90")},
           "images_per_s_batch1": round(1e3 / m["latency_ms_mean"], 2)}
    figures = {
        "original_val_miou": float(ref["miou"]),
        "best_speedup_within_0.5pp": {"value": speedup_at_equal_accuracy(front, TOL_PP), "row": chosen["config_id"],
                                      "exact": all(exact.values()), "exact_fields": exact,
                                      "rule": "cache and evaluation at batch 1, fp32 weights and inputs, on the same "
                                              "device type, deterministic cuDNN without autotuning "
                                              "(devices.exact_numerics); on a CPU with the cache's thread count"},
        "gpu_latency_ms" if dev.type == "cuda" else "latency_ms": {
            "chosen_measured": m["latency_ms_median"], "original_measured": o["latency_ms_median"],
            "measured_speedup": o["latency_ms_median"] / m["latency_ms_median"],
            "chosen_predicted": float(chosen[lat_col]) if lat_col in front else None,
            "original_predicted": float(ref[lat_col]) if lat_col in front else None, "batch": 1},
    }
    return rec, figures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the JSON file to write (e.g. $OUT/gpu_suite.json)")
    ap.add_argument("--work", default=None, help="folder for the run's files (default: beside --out)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default=None, help=f"camvid:PATH (default: {CAMVID})")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for the whole run (default 420; smoke 120)")
    ap.add_argument("--smoke", action="store_true", help="the same path at a tiny size (CPU, about a minute)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 8; smoke 2)")
    ap.add_argument("--cache-batch", type=int, default=None, help="the fast cache pass's batch (default 8; smoke 2)")
    ap.add_argument("--stage2-share", type=float, default=0.35, help="share of the training time for stage 2")
    ap.add_argument("--max-epochs", type=int, default=None, help="cap on each stage's epochs (default 200; smoke 1)")
    ap.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (default none; smoke 2)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default min(8, CPUs - 2); smoke 0)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default torch's; smoke 1: on a busy CPU, threads that wait on each other "
                         "spin, and two threads ran a tiny forward 15x slower than one)")
    a = ap.parse_args(argv)
    if a.threads or a.smoke:
        torch.set_num_threads(a.threads or 1)
    s = SMOKE if a.smoke else {}
    a.budget_s = a.budget_s or s.get("budget_s", 420.0)
    a.batch = a.batch or s.get("batch", 8)
    a.cache_batch = a.cache_batch or s.get("batch", 8)
    a.max_epochs = a.max_epochs or s.get("max_epochs", 200)
    a.max_steps = a.max_steps or s.get("max_steps")
    a.workers = a.workers if a.workers is not None else (0 if a.smoke else max(0, min(8, (os.cpu_count() or 2) - 2)))
    a.reps = 1 if a.smoke else 3
    a.ratio_batches = 1 if a.smoke else 4
    a.profile_min_run_time = 0.002 if a.smoke else 0.05
    a.warmup, a.repeat = (1, 1) if a.smoke else (5, 3)
    a.val_images_per_epoch = 0 if a.smoke else 24   # per-epoch validation on a few images; the cache covers all val
    out_json = Path(a.out).resolve()
    work = Path(a.work) if a.work else out_json.with_name(out_json.stem + "_work")
    if work.exists() and any(work.iterdir()):
        if not (work / ".gpu_suite").exists():
            print(f"error: --work {work}: not empty and not a gpu_suite folder; choose another", file=sys.stderr)
            return 2
        shutil.rmtree(work)   # a fresh run: the last run's checkpoint and caches would be resumed, not measured
    work.mkdir(parents=True, exist_ok=True)
    (work / ".gpu_suite").write_text("files of one benchmarks/gpu_suite.py run; the next run deletes them\n")
    src = Path(a.data.split(":", 1)[1]) if a.data else CAMVID
    if (a.data and not a.data.startswith("camvid:")) or not all((src / f).exists() for f in ("train.txt", "val.txt")):
        print(f"error: --data {a.data or CAMVID}: expected camvid:PATH to a CamVid folder with train.txt and val.txt",
              file=sys.stderr)
        return 2
    if a.smoke:
        src = _subset(src, work / "camvid_subset", SMOKE["train_images"], SMOKE["val_images"])
    a.data = f"camvid:{src}"
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {a.device}: CUDA is not available here", file=sys.stderr)
        return 2
    space = suite_space(a)
    n_val = len(build_dataset(a.data, "val", space.input_size, num_classes=space.num_classes))
    rep = Report(out_json, {
        "smoke": a.smoke, "device": str(dev), "device_name": device_name(dev), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "budget_s": a.budget_s, "space": space.name, "model": space.model, "input_size": list(space.input_size),
        "candidate_exits": len(space.positions) * len(space.heads), "data": a.data, "val_images": n_val,
        "work": str(work)})
    try:
        steps = rep.phase("probe", probe, a, space, dev)
        plan = plan_training(a, space, steps, time.perf_counter() - rep.t0, n_val)
        rep.data["training_plan"] = plan
        rep.phase("train", train_stages, a, lambda e: suite_space(a, e), plan, dev, work / "train")
        rep.phase("cache", cache_phase, a, work / "train" / "mess.pt", dev, work)
        rep.phase("profile_search", search_phase, a, dev, work)
        rep.phase("export_evaluate", export_evaluate, a, dev, work)
    except Exception as e:
        _say(f"failed: {type(e).__name__}: {e}")
        return 1
    rep.data["complete"] = True
    rep.write()
    print(json.dumps({"benchmark": "gpu_suite", "device_name": rep.data["device_name"], "wall_s": rep.data["wall_s"],
                      "ray_imported": rep.data["ray_imported"], **rep.data["figures"]}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
