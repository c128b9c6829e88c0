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
