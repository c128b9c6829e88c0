"""The statistics' one home: the fused statistics of every exit of a batch (what the cache actors run) equal the
per-exit definition bit for bit."""

import pytest
import torch

from messearch import stats


def test_fused_statistics_bit_identical_to_per_exit():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(3, 5, 17, 13, generator=g) * s for s in (0.5, 2.0, 8.0, 30.0)]
    logits.append(torch.randint(-1, 2, (3, 5, 17, 13), generator=g).float())   # ties: the first maximum wins
    logits.append(torch.full((3, 5, 17, 13), 3.0))                               # top-1 exactly 1/C (= bin edge 0.2)
    mask = torch.randint(0, 5, (3, 17, 13), generator=g)
    mask[:, :2] = 255
    fused = stats.batch_statistics(logits, mask, 5, 255, 20, fused=True, keep_confusion=True)
    plain = stats.batch_statistics(logits, mask, 5, 255, 20, fused=False, keep_confusion=True)
    for k in plain:
        assert torch.equal(fused[k], plain[k]), k
    for e, x in enumerate(logits):
        ref = stats.exit_statistics(x, mask, 5, 255, 20)
        for k in ("tp", "pred", "conf_mean", "n_above"):
            assert torch.equal(fused[k][:, e], ref[k]), k
        assert torch.equal(fused["gt"], ref["gt"])
    with pytest.raises(ValueError, match="label values"):
        stats.batch_statistics(logits, mask.clamp(max=6) + 1, 5, 255, 20)
    small = [x[:, :, :3, :4] for x in logits]   # C*C > pixels: the stats.class_counts branch
    fused = stats.batch_statistics(small, mask[:, :3, :4], 5, 255, 20, keep_confusion=True)
    plain = stats.batch_statistics(small, mask[:, :3, :4], 5, 255, 20, fused=False, keep_confusion=True)
    assert all(torch.equal(fused[k], plain[k]) for k in plain)


def test_bucketized_count_above_equals_comparisons_with_nan_and_edges_without_a_host_sync():
    """The device-side count (no NaN check on the host) equals count_above, NaN pixels and exact bin edges included."""
    g = torch.Generator().manual_seed(2)
    top1 = torch.rand(4, 9, 11, generator=g)
    top1[0, :3] = torch.tensor([k / 20 for k in range(21)], dtype=torch.float32)[:11]   # values on the edges
    top1[1, 2, 5] = float("nan")
    top1[2] = float("nan")
    top1[3, 0] = 1.0
    for n_bins in (1, 10, 20):
        assert torch.equal(stats.count_above_bucketized(top1, n_bins), stats.count_above(top1, n_bins)), n_bins
