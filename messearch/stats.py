"""Exact per-image statistics of one exit's logits, and the metrics computed from them.

Every path that produces a figure (the cache, the search, the exported model's evaluation) goes
through these few functions, so that equal logits give equal integers and equal floats.
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_BINS = 20


def bin_edges(n_bins: int) -> torch.Tensor:
    """Pixel-confidence thresholds k/n_bins for k = 0..n_bins, as float32 (the dtype pixels are compared in)."""
    return torch.tensor([k / n_bins for k in range(n_bins + 1)], dtype=torch.float32)


def top1_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel top-1 softmax probability, float32, [B, H, W]."""
    return logits.float().softmax(dim=1).amax(dim=1)


def mean_confidence(top1: torch.Tensor) -> torch.Tensor:
    """Per-image mean of top-1 probabilities, float64 [B].

    The float64 sum of float32 values in [1/C, 1] is exact for C < 256 and up to 2**22 pixels, so the
    result does not depend on reduction order: the cache and the deployed model agree bit for bit.
    """
    return top1.double().sum(dim=(1, 2)) / (top1.shape[1] * top1.shape[2])


def count_above(top1: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Per image, the number of pixels whose top-1 probability is >= k/n_bins, int64 [B, n_bins + 1]."""
    edges = bin_edges(n_bins).to(top1.device)
    flat = top1.reshape(top1.shape[0], 1, -1)
    return (flat >= edges.view(1, -1, 1)).sum(dim=2)


def image_confidence(logits: torch.Tensor, policy_kind: str, pixel_threshold_bin: int | None, n_bins: int) -> torch.Tensor:
    """Image-level confidence of an exit, float64 [B]: mean top-1 probability, or the fraction of pixels above a bin edge."""
    top1 = top1_confidence(logits)
    if policy_kind == "mean":
        return mean_confidence(top1)
    if policy_kind == "fraction":
        above = count_above(top1, n_bins)[:, pixel_threshold_bin]
        return above.double() / (top1.shape[1] * top1.shape[2])
    raise ValueError(f"unknown exit policy kind {policy_kind!r}; allowed: 'mean', 'fraction'")


def class_counts(pred: torch.Tensor, mask: torch.Tensor, num_classes: int, ignore_index: int):
    """Per image and class: true positives, predicted pixels and labelled pixels (ignore pixels excluded), int64 [B, C] each."""
    b = pred.shape[0]
    valid = mask != ignore_index
    offset = (torch.arange(b, device=pred.device) * num_classes).view(b, 1, 1)
    size = b * num_classes
    pred_idx = (pred + offset)[valid]
    gt_idx = (mask + offset)[valid]
    correct = valid & (pred == mask)
    tp = torch.bincount((mask + offset)[correct], minlength=size).view(b, num_classes)
    n_pred = torch.bincount(pred_idx, minlength=size).view(b, num_classes)
    n_gt = torch.bincount(gt_idx, minlength=size).view(b, num_classes)
    return tp, n_pred, n_gt


def exit_statistics(logits: torch.Tensor, mask: torch.Tensor, num_classes: int, ignore_index: int, n_bins: int) -> dict:
    """The sufficient statistics of one exit for a batch: tp, pred, gt [B, C]; conf_mean [B]; n_above [B, n_bins+1].

    `logits` must already be at the mask's size (every head upsamples to the input size).
    """
    if logits.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"logits of size {tuple(logits.shape[-2:])} do not match the mask's {tuple(mask.shape[-2:])}")
    bad = (mask != ignore_index) & ((mask < 0) | (mask >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"label values outside 0..{num_classes - 1} (and not the ignore index {ignore_index})")
    pred = logits.argmax(dim=1)
    tp, n_pred, n_gt = class_counts(pred, mask, num_classes, ignore_index)
    top1 = top1_confidence(logits)
    return {
        "tp": tp,
        "pred": n_pred,
        "gt": n_gt,
        "conf_mean": mean_confidence(top1),
        "n_above": count_above(top1, n_bins),
    }


def miou_from_counts(tp: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """mIoU over the classes with at least one labelled or predicted pixel; counts [..., C] -> float64 [...].

    Classes are summed in a fixed sequential order so that every caller gets the same float for the same integers.
    """
    tp = np.asarray(tp, dtype=np.int64)
    union = np.asarray(gt, dtype=np.int64) + np.asarray(pred, dtype=np.int64) - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), 0.0)
    total = np.zeros(iou.shape[:-1], dtype=np.float64)
    for c in range(iou.shape[-1]):
        total = total + iou[..., c]
    n_present = present.sum(axis=-1)
    return np.where(n_present > 0, total / np.maximum(n_present, 1), 0.0)


def pixel_accuracy(tp: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Sum of true positives over sum of labelled pixels; counts [..., C] -> float64 [...]."""
    tp_sum = np.asarray(tp, dtype=np.int64).sum(axis=-1)
    gt_sum = np.asarray(gt, dtype=np.int64).sum(axis=-1)
    return np.where(gt_sum > 0, tp_sum / np.maximum(gt_sum, 1), 0.0)
