"""Does the robust choice hold up better than the plain one on images the choice never saw?

For each split seed: the cache's images are split into a search part and a check part (`--holdout-by`); the front
is formed on the search part with intervals and sensitivity (never the check part); the plain rule (cheapest row
within TOL pp of the reference) and the robust rule (lower bound within TOL pp, cost holding under a 0.05 shift) each
choose a row; both rows are then evaluated exactly on the check part. Prints one JSON line per seed and a summary:
how often each choice stays within TOL pp of the reference on the check part, and how far its check-part cost
exceeds the cost its front promised.

    python benchmarks/trust_choice.py --cache results/quickstart/cache --seeds 5
    python benchmarks/trust_choice.py --cache RUN/cache --holdout-by group
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from messearch import trust
from messearch.cache_format import load_cache
from messearch.costs import mac_table
from messearch.search_driver import SearchOptions, search_local, search_spec_for
from messearch.space import space_from_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--holdout", type=float, default=0.3)
    ap.add_argument("--holdout-by", default="image", choices=trust.HOLDOUT_BY)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--tol", type=float, default=0.5)
    ap.add_argument("--bootstrap", type=int, default=200)
    args = ap.parse_args()
    cache = load_cache(args.cache)
    space = space_from_text(cache.meta["space_text"], "cache")
    spec = search_spec_for(space, SearchOptions())
    macs = mac_table(space)
    per = []
    # with groups, a seed only changes which groups are checked; a two-group cache has two distinct splits
    for seed in range(args.seeds):
        search, check, meta = trust.split_cache(cache, args.holdout, args.holdout_by, seed)
        front = search_local(search, spec, macs)
        df, _ = trust.annotate(front, search, spec, macs, check=check, resamples=args.bootstrap, seed=seed)
        ref = df[df["is_reference"]].iloc[0]
        rec = {"seed": seed, "n_search": search.n_images, "n_check": check.n_images,
               "check_groups": json.loads(meta["holdout"])["check_groups"], "front_rows": len(df) - 1}
        for rule, robust in (("plain", False), ("robust", True)):
            row = trust.choose(df, args.tol, robust=robust)
            rec[rule] = {"config_id": row["config_id"], "search_drop_pp": float(row["miou_delta_pp"]),
                         "delta_pp_lo": float(row["delta_pp_lo"]),
                         "search_speedup": float(ref["mean_gmacs"] / row["mean_gmacs"]),
                         "check_drop_pp": float((row["holdout_miou"] - ref["holdout_miou"]) * 100),
                         "check_speedup": float(ref["holdout_mean_gmacs"] / row["holdout_mean_gmacs"]),
                         "cost_overrun": float(row["holdout_mean_gmacs"] / row["mean_gmacs"]),
                         "fragile": bool(row["fragile"])}
        print(json.dumps(rec))
        per.append(rec)
    summary = {"cache": args.cache, "holdout": args.holdout, "by": args.holdout_by, "tol_pp": args.tol,
               "seeds": args.seeds, "load_average": os.getloadavg()[0]}
    for rule in ("plain", "robust"):
        r = [p[rule] for p in per]
        summary[rule] = {"held_within_tol": sum(x["check_drop_pp"] >= -args.tol for x in r) / len(r),
                         "mean_check_drop_pp": float(np.mean([x["check_drop_pp"] for x in r])),
                         "mean_search_speedup": float(np.mean([x["search_speedup"] for x in r])),
                         "mean_check_speedup": float(np.mean([x["check_speedup"] for x in r])),
                         "worst_cost_overrun": float(max(x["cost_overrun"] for x in r))}
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
