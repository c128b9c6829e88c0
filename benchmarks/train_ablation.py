"""The training ablation at an equal backbone budget: E epochs of backbone training for every scheme, S epochs
of stage 2 where a scheme has one, over several seeds.

- joint:      E epochs end to end, every candidate exit attached (no freeze, no distillation);
- two-stage:  E epochs of stage 1 (exit-aware backbone), then S epochs of stage 2 (frozen backbone, every head,
              positive-filtering distillation);
- no-stage1:  E epochs of the original model alone (final head only), then the same S epochs of stage 2;
- no-distill: two-stage with cross-entropy only in stage 2 (shares the seed's stage 1 with two-stage);
- with --distill-variants, more two-stage runs on the same stage 1 with other distillation settings, to find out
  why distillation helps or hurts: `T=1` (temperature), `w=0.25` (weight of the distillation term), `T=4;w=0.5`.

For each run: the val cache (Ray actors), then every configuration searched (in process), and the figures a
user cares about, all exact from the cache: the final head's mIoU, the mean single-exit mIoU overall and per
backbone stage, the best speed-up within 0.5 pp, and the front's hypervolume in (MAC saving, mIoU) above the
reference point (saving 0, mIoU 0). Reported as mean and sample standard deviation over the seeds. Writes
OUT/ablation.csv (one row per scheme and seed) and OUT/ablation.md (the table), prints the table to stderr and
one JSON line to stdout. Every run resumes: a rerun skips what is complete.

    python benchmarks/train_ablation.py [--space quickstart] [--epochs E] [--stage2-epochs S] [--seeds 0,1,2]
        [--data SPEC] [--out results/ablation] [--max-steps N] [--device cpu] [--distill-variants "T=1,w=0.25"]
        [--local] [--procs N] [--design NAME | --design pick:SUMMARY.json]

--local caches in process on --device (no Ray: a GPU machine without Ray); --procs runs seeds in parallel
processes; --design applies a candidate design of benchmarks/quickstart_design.py (scenes, model, recipe) to the
quickstart space, or the one that run picked.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from messearch.cache import build_cache
from messearch.cache_format import load_cache
from messearch.errors import MessError
from messearch.exit_quality import single_exit_miou, stage_means
from messearch.files import atomic_write_text
from messearch.front import hypervolume, speedup_at_equal_accuracy
from messearch.search_driver import SearchOptions, search_to_front
from messearch.space import load_space, space_from_text
from messearch.train import train

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ("joint", "two-stage", "no-stage1", "no-distill")


def space_with(space, seed: int, e: int, s: int, **train):
    """The space with train.seed, epochs_stage1 = E, epochs_stage2 = S and any other train fields given."""
    raw = yaml.safe_load(space.text)
    raw.setdefault("train", {}).update({"seed": seed, "epochs_stage1": e, "epochs_stage2": s, **train})
    return space_from_text(yaml.safe_dump(raw, sort_keys=False), f"{space.source} (seed {seed}, E={e}, S={s})")


def _curve(run_dir: Path) -> list[float]:
    """The final head's val mIoU after each backbone-training epoch (stage 1, plain or joint)."""
    path = run_dir / "train_log.csv"
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    return [round(float(r["miou:final"]), 4) for r in rows if r["stage"] != "2"]


def parse_variant(text: str) -> dict:
    """'T=1;w=0.25' -> {'temperature': 1.0, 'distill_weight': 0.25}."""
    keys = {"T": "temperature", "w": "distill_weight"}
    out = {}
    for part in text.split(";"):
        k, _, v = part.partition("=")
        if k.strip() not in keys:
            raise SystemExit(f"--distill-variants: {part!r}: allowed keys T (temperature), w (distillation weight)")
        out[keys[k.strip()]] = float(v)
    return out


def train_runs(space, data, out: Path, kw: dict, seconds: dict, variants=(), seed=0, e=1, s=1) -> dict[str, Path]:
    """Train the four schemes of one seed, and any distillation variants (each skipped when its mess.pt exists);
    returns scheme -> mess.pt."""

    def run(name, space=space, **extra):
        path = out / name / "mess.pt"
        if not path.exists():
            t = time.perf_counter()
            train(space, data, out / name, **kw, **extra)
            seconds[name] = seconds.get(name, 0.0) + round(time.perf_counter() - t, 1)
        return path

    stage1 = str(run("stage1", stage="1"))
    runs = {"two-stage": run("two-stage", stage="2", init_checkpoint=stage1),
            "no-distill": run("no-distill", stage="2", init_checkpoint=stage1, baseline="no-distill"),
            "no-stage1": run("no-stage1", stage="both", baseline="no-stage1"),
            "joint": run("joint", stage="both", baseline="joint")}
    for v in variants:
        runs[f"two-stage[{v}]"] = run(f"two-stage[{v}]", space=space_with(space, seed, e, s, **parse_variant(v)),
                                      stage="2", init_checkpoint=stage1)
    return runs


def measure(ckpt: Path, data, tol_pp: float = 0.5, local: bool = False, device: str | None = None) -> dict:
    """Cache the val split for one checkpoint, search it, and return the run's figures."""
    cache_dir = ckpt.parent / "cache"
    try:
        cache = load_cache(cache_dir)
    except MessError:
        build_cache(ckpt, data, "val", cache_dir, resume=(cache_dir / "manifest.json").exists(), progress=False,
                    local=local, device=device if local else None)
        cache = load_cache(cache_dir)
    front = search_to_front(cache_dir, ckpt.parent / "pareto.parquet", SearchOptions(local=True, bootstrap=0))
    miou = single_exit_miou(cache)
    exits = [v for k, v in miou.items() if k != "final"]
    return {"final": miou["final"], "mean_exit": float(np.mean(exits)),
            **{f"mean_{s}": v for s, v in stage_means(miou).items()},
            "speedup_0.5pp": speedup_at_equal_accuracy(front, tol_pp), "hypervolume": hypervolume(front, 0.0)}


def apply_design(design: str | None, space):
    """The space with a quickstart_design variant's model/recipe overrides, and that variant's scenes made the
    synthetic default in this process; `pick:PATH` takes the variant that run picked. None: unchanged."""
    if not design:
        return space
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quickstart_design import VARIANTS, use_scenes  # noqa: PLC0415 - a sibling benchmark's candidates

    if design.startswith("pick:"):
        design = json.loads(Path(design[5:]).read_text())["pick"]
    _, space_kw, train_kw = VARIANTS[design]
    use_scenes(design)
    raw = yaml.safe_load(space.text)
    raw.update(space_kw)
    raw.setdefault("train", {}).update(train_kw)
    return space_from_text(yaml.safe_dump(raw, sort_keys=False), f"{space.source} [design {design}]")


def seed_rows(args, seed: int, e: int, s: int) -> tuple[list[dict], dict, dict]:
    """Train and measure every scheme of one seed: (rows, final-mIoU curves, training seconds)."""
    base = apply_design(args.design, load_space(args.space))
    data = args.data or base.data
    variants = [v for v in args.distill_variants.split(",") if v]
    out = Path(args.out)
    kw = dict(device=args.device, progress=False, max_steps=args.max_steps)
    seconds: dict[str, float] = {}
    rows, curves = [], {}
    space = space_with(base, seed, e, s)
    ckpts = train_runs(space, data, out / f"seed{seed}", kw, seconds, variants, seed, e, s)
    for scheme in SCHEMES + tuple(f"two-stage[{v}]" for v in variants):
        print(f"[ablation] seed {seed} {scheme}: cache and search", file=sys.stderr, flush=True)
        rows.append({"scheme": scheme, "seed": seed, **measure(ckpts[scheme], data, local=args.local, device=args.device)})
    for name in ("stage1", "no-stage1", "joint"):
        curves[name] = _curve(out / f"seed{seed}" / name)
    return rows, curves, seconds


def _fmt(values: list[float], scale: float, digits: int) -> str:
    mean = float(np.mean(values)) * scale
    sd = float(np.std(values, ddof=1)) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=str(ROOT / "messearch" / "spaces" / "quickstart.yaml"))
    ap.add_argument("--data", default=None, help="default: the space's data spec")
    ap.add_argument("--out", default=str(ROOT / "results" / "ablation"))
    ap.add_argument("--epochs", type=int, default=None, help="E, backbone epochs of every scheme (default: the "
                    "space's epochs_stage1)")
    ap.add_argument("--stage2-epochs", type=int, default=None, help="S (default: the space's epochs_stage2)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-steps", type=int, default=None, help="at most this many steps per epoch (smoke runs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--distill-variants", default="", help="comma-separated, e.g. 'T=1,w=0.25,T=4;w=0.5'")
    ap.add_argument("--local", action="store_true", help="cache in this process on --device (no Ray)")
    ap.add_argument("--procs", type=int, default=1, help="seeds trained at once, one process each")
    ap.add_argument("--design", default=None, help="a benchmarks/quickstart_design.py variant, or pick:SUMMARY.json")
    args = ap.parse_args()
    variants = [v for v in args.distill_variants.split(",") if v]
    schemes = SCHEMES + tuple(f"two-stage[{v}]" for v in variants)
    base = apply_design(args.design, load_space(args.space))
    e = args.epochs or base.train.epochs_stage1
    s = args.stage2_epochs or base.train.epochs_stage2
    seeds = [int(x) for x in args.seeds.split(",")]
    data = args.data or base.data
    out = Path(args.out)
    seconds: dict[str, float] = {}
    rows, curves = [], {}
    if args.procs > 1:
        with mp.get_context("spawn").Pool(min(args.procs, len(seeds))) as pool:
            parts = pool.starmap(seed_rows, [(args, seed, e, s) for seed in seeds])
    else:
        parts = [seed_rows(args, seed, e, s) for seed in seeds]
    for r, c, sec in parts:
        rows += r
        for name, curve in c.items():
            curves.setdefault(name, []).append(curve)
        for name, v in sec.items():
            seconds[name] = round(seconds.get(name, 0.0) + v, 1)
    keys = [k for k in rows[0] if k not in ("scheme", "seed")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["scheme", "seed"] + keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "ablation.csv", buf.getvalue())
    stage_keys = [k for k in keys if k.startswith("mean_") and k != "mean_exit"]
    head = ["scheme", "final head mIoU (%)", "mean exit mIoU (%)"] + [f"{k[5:]} (%)" for k in stage_keys] \
        + ["speed-up within 0.5 pp", "hypervolume"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary = {}
    for scheme in schemes:
        mine = [r for r in rows if r["scheme"] == scheme]
        col = lambda k: [r[k] for r in mine]  # noqa: E731
        summary[scheme] = {k: {"mean": round(float(np.mean(col(k))), 4),
                               "sd": round(float(np.std(col(k), ddof=1)) if len(mine) > 1 else 0.0, 4)} for k in keys}
        lines.append("| " + " | ".join([scheme, _fmt(col("final"), 100, 2), _fmt(col("mean_exit"), 100, 2)]
                                       + [_fmt(col(k), 100, 2) for k in stage_keys]
                                       + [_fmt(col("speedup_0.5pp"), 1, 2), _fmt(col("hypervolume"), 1, 4)]) + " |")
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "ablation.md", table)
    print(table, file=sys.stderr)
    print(json.dumps({"benchmark": "train_ablation", "space": base.name, "design": args.design, "device": args.device,
                      "data": data, "E": e, "S": s, "seeds": seeds,
                      "max_steps": args.max_steps, "hypervolume_reference": {"mac_saving": 0.0, "miou": 0.0},
                      "csv": str(out / "ablation.csv"), "summary": summary, "final_miou_curves": curves,
                      "train_seconds": seconds}))


if __name__ == "__main__":
    main()
