"""How good the trained exits are, read from a cache: each candidate exit's single-exit mIoU (every image
leaves there), the mean per backbone stage, and per difficulty level of the synthetic scenes.

These are the figures that say whether a front means something: the final head should not be beaten by
any single exit, and exits should get better with depth.
"""

from __future__ import annotations

import re

import numpy as np

from .stats import miou_from_counts

_STAGE = re.compile(r"^(?:backbone\.)?(layer\d+|features|\d+)")


def stage_of(position: str) -> str:
    """The backbone stage of a candidate position: 'backbone.layer3.1' -> 'layer3' (ResNets); else the position."""
    m = _STAGE.match(position)
    return m.group(1) if m and m.group(1).startswith("layer") else position


def single_exit_miou(cache, images=None) -> dict[str, float]:
    """mIoU of every candidate exit ('position/head') and of the final head ('final') when every image
    (or every image in the index array `images`) leaves there; exact, from the cached counts."""
    sel = slice(None) if images is None else np.asarray(images)
    tp, pred, gt = cache.tp[sel].sum(axis=0), cache.pred[sel].sum(axis=0), cache.gt[sel].sum(axis=0)
    names = [f"{p}/{h}" for p in cache.positions for h in cache.heads] + ["final"]
    return {n: float(miou_from_counts(tp[e], pred[e], gt)) for e, n in enumerate(names)}


def stage_means(miou: dict[str, float]) -> dict[str, float]:
    """Mean single-exit mIoU per backbone stage, in depth order (the final head left out)."""
    groups: dict[str, list[float]] = {}
    for name, v in miou.items():
        if name != "final":
            groups.setdefault(stage_of(name.split("/")[0]), []).append(v)
    return {s: float(np.mean(v)) for s, v in groups.items()}


def structure_report(miou: dict[str, float], positions: list[str]) -> dict:
    """What the quickstart's design promises, as figures: the final head's mIoU, the best exit at the shallowest
    position and at every stage before the last, the best exit overall, and whether stage means rise with depth."""
    final = miou["final"]
    stages = stage_means(miou)
    order = list(stages)
    last = order[-1]
    best = lambda names: max((miou[n] for n in names), default=float("nan"))  # noqa: E731
    exits = [n for n in miou if n != "final"]
    before_last = [n for n in exits if stage_of(n.split("/")[0]) != last]
    shallowest = [n for n in exits if n.split("/")[0] == positions[0]]
    return {"final": final, "best_shallowest": best(shallowest), "best_before_last_stage": best(before_last),
            "best_exit": best(exits), "stage_means": stages,
            "stage_means_rise": all(stages[a] < stages[b] for a, b in zip(order, order[1:]))}
