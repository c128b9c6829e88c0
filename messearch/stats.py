"""Exact per-image statistics of one exit's logits, and the metrics computed from them.

Every path that produces a figure (the cache, the search, the exported model's evaluation) goes
through these few functions, so that equal logits give equal integers and equal floats. `exit_statistics`
defines the statistics of one exit; `batch_statistics` computes them for every exit of a batch at once (what
the cache actors run) and must equal it bit for bit (tests/test_stats.py checks).
"""

from __future__ import annotations

import torch

from .metrics import miou_from_counts, pixel_accuracy  # noqa: F401  (defined once there: the search imports no torch)

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


def check_batch(logits: torch.Tensor, mask: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """ValueError when the logits are not at the mask's size or a label is outside 0..C-1 and not the ignore index."""
    if logits.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"logits of size {tuple(logits.shape[-2:])} do not match the mask's {tuple(mask.shape[-2:])}")
    bad = (mask != ignore_index) & ((mask < 0) | (mask >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"label values outside 0..{num_classes - 1} (and not the ignore index {ignore_index})")


def exit_statistics(logits: torch.Tensor, mask: torch.Tensor, num_classes: int, ignore_index: int, n_bins: int) -> dict:
    """The sufficient statistics of one exit for a batch: tp, pred, gt [B, C]; conf_mean [B]; n_above [B, n_bins+1].

    `logits` must already be at the mask's size (every head upsamples to the input size).
    """
    check_batch(logits, mask, num_classes, ignore_index)
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


# ------------------------------------------------------------------------- several exits of one batch, fused

def confusion_counts(pred: torch.Tensor, mask: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Per image the C x C confusion counts (row = label, column = prediction), int64 [B, C*C]."""
    b, c2 = pred.shape[0], num_classes * num_classes
    valid = mask != ignore_index
    offset = (torch.arange(b, device=pred.device) * c2).view(b, 1, 1)
    idx = (mask * num_classes + pred + offset)[valid]
    return torch.bincount(idx, minlength=b * c2).view(b, c2)


def count_above_bucketized(top1: torch.Tensor, n_bins: int) -> torch.Tensor:
    """count_above, exactly, by one binary search per pixel instead of n_bins+1 comparisons.

    bucketize(right=True) gives i = #{edges <= x} (the same float32 comparisons), so #{x >= edge_k} = #{i > k}.
    A NaN compares false with every edge, so it goes to bucket 0 (counted nowhere), on the device: no host sync.
    """
    n, k = top1.shape[0], n_bins + 2
    flat = top1.reshape(n, -1)
    i = torch.bucketize(flat, bin_edges(n_bins).to(top1.device), right=True)
    i = torch.where(torch.isnan(flat), 0, i)
    hist = torch.bincount((i + (torch.arange(n, device=i.device) * k).view(-1, 1)).view(-1), minlength=n * k).view(n, k)
    return hist.flip(1).cumsum(1).flip(1)[:, 1:]


def class_counts_with_confusion(pred: torch.Tensor, mask: torch.Tensor, num_classes: int, ignore_index: int):
    """class_counts plus the confusion matrices [B, C*C], from one bincount (ignore pixels in a dump bin)."""
    n, c2 = pred.shape[0], num_classes * num_classes
    idx = torch.where(mask != ignore_index, mask * num_classes + pred, c2)
    idx = idx + (torch.arange(n, device=pred.device) * (c2 + 1)).view(-1, 1, 1)
    conf = torch.bincount(idx.view(-1), minlength=n * (c2 + 1)).view(n, c2 + 1)[:, :c2].view(n, num_classes, num_classes)
    return conf.diagonal(dim1=1, dim2=2), conf.sum(dim=1), conf.sum(dim=2), conf.reshape(n, c2)


def batch_statistics(logits: list[torch.Tensor], mask: torch.Tensor, num_classes: int, ignore_index: int,
                     n_bins: int, fused: bool = True, keep_confusion: bool = False,
                     check: bool = True) -> dict[str, torch.Tensor]:
    """Statistics of several exits' logits [B,C,H,W] on one batch: tp/pred [B,E,C], gt [B,C], conf_mean [B,E],
    n_above [B,E,n_bins+1] (confusion [B,E,C*C]); bit-identical to exit_statistics on each exit.

    Fused: the softmax runs per exit on exactly the tensor exit_statistics sees (the one step whose rounding
    could depend on the batch's shape); the rest is exact (max's index = argmax's, both the first maximum;
    float64 sums of float32 values; comparisons; bincounts) and runs once on all exits stacked. The tests
    check bit-equality with exit_statistics. Fused, everything stays on the logits' device: no host copy or sync
    (check=False skips check_batch's one sync, for a caller that checked the mask already).
    """
    e, b = len(logits), mask.shape[0]
    if not fused:
        per = [exit_statistics(x, mask, num_classes, ignore_index, n_bins) for x in logits]
        out = {k: torch.stack([p[k] for p in per], dim=1) for k in ("tp", "pred", "conf_mean", "n_above")}
        out["gt"] = per[0]["gt"]
        if keep_confusion:
            out["confusion"] = torch.stack([confusion_counts(x.argmax(dim=1), mask, num_classes, ignore_index)
                                            for x in logits], 1)
        return out
    if check:
        check_batch(logits[0], mask, num_classes, ignore_index)
    top1 = torch.cat([top1_confidence(x) for x in logits])              # [E*B, H, W], exit-major
    pred = torch.cat([x.max(dim=1).indices for x in logits])            # 4x faster than argmax(dim=1) on CPU
    masks = mask.repeat(e, 1, 1)
    confusion = None
    if num_classes * num_classes < mask.shape[1] * mask.shape[2]:
        tp, n_pred, n_gt, confusion = class_counts_with_confusion(pred, masks, num_classes, ignore_index)
    else:   # many classes, small images: the confusion bins would outnumber the pixels
        tp, n_pred, n_gt = class_counts(pred, masks, num_classes, ignore_index)
    unstack = lambda t: t.reshape(e, b, *t.shape[1:]).transpose(0, 1)  # noqa: E731  [E*B, ...] -> [B, E, ...]
    out = {"tp": unstack(tp), "pred": unstack(n_pred), "gt": n_gt[:b],
           "conf_mean": unstack(mean_confidence(top1)), "n_above": unstack(count_above_bucketized(top1, n_bins))}
    if keep_confusion:
        out["confusion"] = unstack(confusion if confusion is not None
                                   else confusion_counts(pred, masks, num_classes, ignore_index))
    return out
