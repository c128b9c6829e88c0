"""The whole journey on real images: CamVid, thresholds and configurations chosen on val.

CPU (from scratch; the space's 24 + 4 epochs: stage 1 about 45 minutes on two cores, results/README.md):
                nice -n 10 python benchmarks/camvid_journey.py --space camvid_lraspp_resnet18 --out results/camvid_cpu
GPU (full):     python benchmarks/camvid_journey.py --space messearch/spaces/camvid_deeplabv3_resnet50.yaml --device cuda --out results/camvid_r50

Prints one JSON line: the original model's val mIoU after each stage-1 epoch (the learning curve), the
reference's mIoU, the front's best speed-up at <= 0.5 pp mIoU loss, the best mIoU gain at no more than the
reference's cost, the single exits' mIoU per stage, the chosen row's measured figures and the stage times. Uses the same pipeline
as `messearch pipeline` (Ray for the cache and the search).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from messearch.front import best_under, speedup_at_equal_accuracy
from messearch.front import read_front
from messearch.pipeline import run_pipeline

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="camvid_lraspp_resnet18")
    ap.add_argument("--data", default=f"camvid:{CAMVID}")
    ap.add_argument("--out", default="results/camvid_cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, help="epochs of each training stage (default: the space's)")
    args = ap.parse_args()
    summary = run_pipeline(args.space, args.data, args.out, device=args.device, epochs=args.epochs)
    front, _ = read_front(Path(args.out) / "pareto.parquet")
    ref = front[front["is_reference"]].iloc[0]
    best = best_under(front, max_gmacs=float(ref["mean_gmacs"]))
    print(json.dumps({
        "space": args.space, "data": args.data, "device": args.device,
        "reference_miou": float(ref["miou"]), "reference_gmacs": float(ref["mean_gmacs"]),
        "front_rows": int((~front["is_reference"]).sum()),
        "best_speedup_within_0.5pp": speedup_at_equal_accuracy(front, 0.5),
        "best_miou_gain_pp_at_reference_cost": float(best["miou_delta_pp"]) if best is not None else 0.0,
        "chosen": summary["chosen"], "measured": summary.get("measured"), "exact": summary.get("exact"),
        "learning_curve": summary.get("learning_curve"), "exits": summary.get("exits"),
        "timings_s": summary["timings_s"],
    }))


if __name__ == "__main__":
    main()
