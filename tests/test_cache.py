"""The Ray cache of per-exit statistics: exact against logits computed directly, resumable, fault tolerant.

A tiny DeepLabV3-ResNet18 space at 32x32 (3 positions x 2 heads + the final head = 7 exits), random weights with
sharpened classifiers (so confidences spread), 8 synthetic validation images in 8 shards of 1, 2 actors.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from messearch import stats
from messearch.cache import build_cache, cache_batch
from messearch.cache_format import load_cache, load_confusion
from messearch.checkpoint import load_checkpoint, save_checkpoint
from messearch.cli import main
from messearch.data import build_dataset
from messearch.errors import MessError
from messearch.files import sha256_file
from messearch.weights import build_mess_network
from messearch.space import space_from_text

DATA = "synthetic:0:8"
SPACE = """
name: tiny
model: deeplabv3_resnet18
num_classes: 4
input_size: [32, 32]
positions: [backbone.layer1.1, backbone.layer2.1, backbone.layer3.1]
heads:
  - {name: lin, reduction: 4, layers: 0}
  - {name: c1, reduction: 8, layers: 1}
policy: {kind: fraction, pixel_threshold: 0.6, n_bins: 10}
thresholds: [0.3, 0.5, 0.7]
max_exits: 2
mode: cascade
"""
ARRAYS = ("tp", "pred", "gt", "conf_mean", "n_above", "n_pixels")


def _checkpoint(path, seed):
    torch.manual_seed(seed)
    net = build_mess_network(space_from_text(SPACE, "tiny.yaml"))
    with torch.no_grad():   # sharpen every classifier so that top-1 probabilities cover the whole range
        for m in list(net.heads) + [net.base.classifier]:
            last = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)][-1]
            last.weight.mul_(30.0)
    save_checkpoint(path, net, DATA)
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """The actors' setting (1 CPU each): convolution rounding depends on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "mess.pt", 0)


@pytest.fixture(scope="module")
def clean(ckpt, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "clean"
    manifest = build_cache(ckpt, DATA, "val", out, actors=2, shard_size=1, keep_confusion=True, progress=False)
    return out, manifest


@pytest.fixture(scope="module")
def direct(ckpt, one_thread):
    """Per image and exit, the statistics written out plainly from the network's own forward at batch 1."""
    net, space, _ = load_checkpoint(ckpt)
    ds = build_dataset(DATA, "val", space.input_size, num_classes=space.num_classes)
    c, nb = space.num_classes, space.policy.n_bins
    rows = []
    for i in range(len(ds)):
        image, mask = ds[i]
        with torch.no_grad():
            exit_logits, final = net(image[None])
        per_exit = []
        for logits in exit_logits + [final]:
            logits = logits[0]
            pred = logits.argmax(dim=0)
            valid = mask != space.ignore_index
            top1 = torch.softmax(logits.float(), dim=0).max(dim=0).values
            per_exit.append({
                "tp": [int(((pred == k) & (mask == k) & valid).sum()) for k in range(c)],
                "pred": [int(((pred == k) & valid).sum()) for k in range(c)],
                "gt": [int(((mask == k) & valid).sum()) for k in range(c)],
                "conf_mean": float(top1.double().sum() / top1.numel()),
                "n_above": [int((top1 >= torch.tensor(k / nb, dtype=torch.float32)).sum()) for k in range(nb + 1)],
                "fraction": float(stats.image_confidence(logits[None], "fraction", space.policy.pixel_threshold_bin, nb)[0]),
            })
        rows.append((ds.image_ids[i], per_exit))
    return rows, space


def _same(a, b):
    for k in ARRAYS:
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)
    assert a.image_ids == b.image_ids


def test_counts_equal_direct_logits(clean, direct):
    out, manifest = clean
    cache = load_cache(out)
    rows, space = direct
    assert cache.image_ids == [r[0] for r in rows]
    assert cache.tp.shape == (8, 7, 4) and cache.n_above.shape == (8, 7, 11) and cache.tp.dtype == np.int64
    assert cache.exit_index("backbone.layer2.1", "c1") == 3 and manifest.exits[3] == ["backbone.layer2.1", "c1"]
    for i, (_, per_exit) in enumerate(rows):
        for e, d in enumerate(per_exit):
            assert cache.tp[i, e].tolist() == d["tp"] and cache.pred[i, e].tolist() == d["pred"]
            assert cache.gt[i].tolist() == d["gt"] and cache.n_above[i, e].tolist() == d["n_above"]
            assert cache.conf_mean[i, e] == d["conf_mean"]
            # the 'fraction' policy's statistic read from the histogram equals the deployed computation
            b = space.policy.pixel_threshold_bin
            assert cache.n_above[i, e, b] / cache.n_pixels[i] == d["fraction"]
    assert cache.n_pixels.tolist() == [32 * 32] * 8
    # predictions are not constant: confidences spread over the bins, and exits disagree
    assert len(np.unique(cache.conf_mean)) > 20 and (cache.n_above[:, :, 5] > 0).any()
    assert (cache.n_above[:, :, 5] < cache.n_pixels[:, None]).any()


def test_single_exit_miou_equals_direct_evaluation(clean, direct):
    cache = load_cache(clean[0])
    rows, _ = direct
    for e in range(cache.tp.shape[1]):
        tp = np.sum([r[1][e]["tp"] for r in rows], axis=0)
        pred = np.sum([r[1][e]["pred"] for r in rows], axis=0)
        gt = np.sum([r[1][e]["gt"] for r in rows], axis=0)
        union = gt + pred - tp
        iou = [tp[k] / union[k] for k in range(len(tp)) if union[k] > 0]
        want = sum(iou) / len(iou)
        got = stats.miou_from_counts(cache.tp[:, e].sum(0), cache.pred[:, e].sum(0), cache.gt.sum(0))
        assert got == pytest.approx(want, abs=1e-15)
        assert got == stats.miou_from_counts(tp, pred, gt)   # the one mIoU function: equal integers, equal floats


def test_confusion_matches_counts(clean):
    cache, conf = load_cache(clean[0]), load_confusion(clean[0])
    assert conf.shape == (8, 7, 4, 4)
    np.testing.assert_array_equal(np.diagonal(conf, axis1=2, axis2=3), cache.tp)
    np.testing.assert_array_equal(conf.sum(axis=2), cache.pred)
    np.testing.assert_array_equal(conf.sum(axis=3), cache.gt[:, None, :].repeat(7, axis=1))


def test_larger_batches_differ_from_batch_one_by_few_pixels(ckpt, one_thread):
    """Batch 1 defines fidelity; batch 4 may round convolutions differently. Report how many counts move."""
    net, space, _ = load_checkpoint(ckpt)
    ds = build_dataset(DATA, "val", space.input_size, num_classes=space.num_classes)
    images = torch.stack([ds[i][0] for i in range(4)])
    masks = torch.stack([ds[i][1] for i in range(4)])
    batched = cache_batch(net, images, masks, space.policy.n_bins)
    single = [cache_batch(net, images[i:i + 1], masks[i:i + 1], space.policy.n_bins) for i in range(4)]
    one = {k: np.concatenate([s[k] for s in single]) for k in batched}
    np.testing.assert_array_equal(batched["gt"], one["gt"])
    moved = int(np.abs(batched["pred"] - one["pred"]).sum()) // 2
    total = int(one["pred"].sum())
    print(f"batch 4 vs batch 1: {moved} of {total} predicted pixels moved class")
    assert moved <= total * 1e-3


def test_killed_actor_shard_is_redone_once(ckpt, clean, tmp_path):
    import ray

    killed, calls = [], []

    def kill_all(shard, pool):
        # Kill every live actor for real (ray.kill ends its process): a busy one mid-shard as soon as one is busy
        # (actors start at different times), and the one that just finished before its next shard.
        calls.append(shard)
        if not killed and (any(busy for _, _, busy in pool) or len(calls) == 4):
            for actor, info, busy in pool:
                ray.kill(actor, no_restart=True)
                killed.append((info["pid"], busy))

    out = tmp_path / "killed"
    manifest = build_cache(ckpt, DATA, "val", out, actors=2, shard_size=1, keep_confusion=True, progress=False,
                           on_shard=kill_all)
    assert killed and manifest.retries, (killed, manifest.retries)
    print(f"killed {killed} (pid, busy); retried shards {[r['shard'] for r in manifest.retries]}")
    assert all("Actor" in r["error"] for r in manifest.retries)
    cache = load_cache(out)
    assert len(cache.image_ids) == 8 and len(set(cache.image_ids)) == 8   # every image exactly once
    assert manifest.image_ids == clean[1].image_ids
    _same(cache, load_cache(clean[0]))
    np.testing.assert_array_equal(load_confusion(out), load_confusion(clean[0]))
    assert manifest.cache_sha256 == clean[1].cache_sha256
    assert len({w["pid"] for w in manifest.workers}) >= 2


def test_resume_recomputes_corrupt_and_missing_shards(ckpt, clean, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(clean[0], out)
    shard1 = out / "shard-00001.parquet"
    data = bytearray(shard1.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard1.write_bytes(bytes(data))
    with pytest.raises(MessError, match="sha256 does not match"):
        load_cache(out)                                           # never silently used
    manifest = json.loads((out / "manifest.json").read_text())   # as if killed before shard 3 was recorded
    manifest["shards"][3], manifest["complete"] = None, False
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "shard-00003.parquet").unlink()
    with pytest.raises(MessError, match="incomplete"):
        load_cache(out)
    with pytest.raises(MessError, match="already holds a cache"):
        build_cache(ckpt, DATA, "val", out, actors=2, shard_size=1, keep_confusion=True, progress=False)
    resumed = build_cache(ckpt, DATA, "val", out, actors=1, shard_size=1, keep_confusion=True, resume=True,
                          progress=False)
    assert resumed.recomputed == [1, 3]
    assert sha256_file(shard1) == clean[1].shards[1]["sha256"]
    _same(load_cache(out), load_cache(clean[0]))
    again = build_cache(ckpt, DATA, "val", out, actors=2, shard_size=1, keep_confusion=True, resume=True,
                        progress=False)
    assert again.recomputed == [] and again.cache_sha256 == clean[1].cache_sha256


REFUSED = {   # case -> (what is tried, given the clean cache folder, its manifest and another checkpoint; message)
    "resume with another checkpoint": (lambda out, m, other: build_cache(
        other, DATA, "val", out, actors=2, shard_size=1, keep_confusion=True, resume=True, progress=False),
        "checkpoint sha256"),
    "load expecting another checkpoint": (lambda out, m, other: load_cache(
        out, expect_checkpoint_sha256=sha256_file(other)), "checkpoint sha256"),
    "load expecting another space": (lambda out, m, other: load_cache(
        out, expect_space_text=SPACE.replace("c1", "c2")), "another search space"),
    "resume with another batch size": (lambda out, m, other: build_cache(
        m.checkpoint, DATA, "val", out, batch_size=2, shard_size=1, keep_confusion=True, resume=True,
        progress=False), "batch_size"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_cache_of_another_checkpoint_or_space_is_refused(clean, tmp_path, case):
    out, manifest = clean
    attempt, message = REFUSED[case]
    with pytest.raises(MessError, match=message):
        attempt(out, manifest, _checkpoint(tmp_path / "other.pt", 1))


def test_cache_of_the_expected_checkpoint_and_space_loads(clean):
    out, manifest = clean
    ok = load_cache(out, expect_checkpoint_sha256=manifest.checkpoint_sha256, expect_space_text=manifest.space_text)
    assert ok.meta["checkpoint_sha256"] == sha256_file(manifest.checkpoint) and ok.meta["n_bins"] == 10
    assert ok.meta["cache_sha256"] == manifest.cache_sha256 and ok.meta["data"] == DATA


def test_cli_cache(clean, tmp_path, capsys):
    out = tmp_path / "cli"
    shutil.copytree(clean[0], out)
    ckpt = clean[1].checkpoint
    assert main(["cache", "--checkpoint", ckpt, "--data", DATA, "--out", str(out), "--shard-size", "1",
                 "--keep-confusion", "--resume", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "8 images" in text and "7 exits" in text and clean[1].cache_sha256[:12] in text
    assert main(["cache", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
