"""The metrics computed from exact counts: mIoU and pixel accuracy, defined once, for every path that reports
them (the search, the cache's exits, evaluation, training's checks). numpy only, so that the search's trials
start without torch; `stats` re-exports both with the statistics they are computed from."""

from __future__ import annotations

import numpy as np


def miou_from_counts(tp: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """mIoU over the classes with at least one labelled or predicted pixel; counts [..., C] -> float64 [...].

    Classes are summed in a fixed sequential order so that every caller gets the same float for the same integers.
    Integer counts are taken as int64; float counts must hold integers below 2**53 (the evaluator's exact sums),
    for which every step below is exact up to the one division per class, so both give the same floats.
    """
    arrays = [np.asarray(x) for x in (tp, pred, gt)]
    nd = max(a.ndim for a in arrays)
    arrays = [a.reshape((1,) * (nd - a.ndim) + a.shape) for a in arrays]
    kind = np.int64 if all(a.dtype.kind in "biu" for a in arrays) else np.float64
    # class-major views: each class's counts are one contiguous row of `union` and `iou`
    tp, pred, gt = (np.moveaxis(a.astype(kind, copy=False), -1, 0) for a in arrays)
    union = np.subtract(np.add(gt, pred, order="C"), tp, order="C")
    present = union > 0
    iou = np.divide(tp, np.maximum(union, 1), out=np.zeros(union.shape), where=present)
    total = np.zeros(iou.shape[1:], dtype=np.float64)
    for c in range(iou.shape[0]):
        total = total + iou[c]
    n_present = present.sum(axis=0)
    return np.where(n_present > 0, total / np.maximum(n_present, 1), 0.0)


def pixel_accuracy(tp: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Sum of true positives over sum of labelled pixels; counts [..., C] -> float64 [...]."""
    tp_sum = np.asarray(tp, dtype=np.int64).sum(axis=-1)
    gt_sum = np.asarray(gt, dtype=np.int64).sum(axis=-1)
    return np.where(gt_sum > 0, tp_sum / np.maximum(gt_sum, 1), 0.0)
