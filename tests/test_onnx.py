"""ONNX deployment: one graph per stage and cascade.json, run by messearch.runtime (numpy + onnxruntime, no torch)
with real early exit; the same exits, MACs and classes as the PyTorch export, and the metadata a deployer needs.

The tiny DeepLabV3-ResNet18 checkpoint and configurations of test_export.py (thresholds at the median
confidence, so every cascade really splits the images).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from messearch.cli import main
from messearch.data import class_names
from messearch.errors import MessError
from messearch.dataset import IMAGENET_MEAN, IMAGENET_STD, normalise_image
from messearch.evaluate import EvaluationResult, evaluate
from messearch.config import Config
from messearch.export import export_config, load_exported, save_exported
from messearch.export_meta import ExportMeta
from messearch.onnx_export import compare_with_onnx, export_onnx
from messearch.runtime import Cascade, read_cascade
from test_export import DATA, _configs, _front, _space, one_thread, run  # noqa: F401  (fixtures)


def _between(run, cfg: Config, policy) -> Config:
    """`cfg` with each threshold moved from the median image's confidence to halfway between two neighbouring
    confidences of the split: still splitting the images, but no image sits exactly on a threshold (there, any
    rounding difference between two runtimes may flip the decision; see compare_with_onnx)."""
    if cfg.kind != "cascade":
        return cfg
    cache, thr = run["cache"], []
    for p, h in zip(cfg.positions, cfg.heads):
        e = cache.exit_index(p, h)
        c = np.unique(cache.conf_mean[:, e] if policy.kind == "mean"
                      else cache.n_above[:, e, policy.pixel_threshold_bin] / cache.n_pixels)
        thr.append(float((c[len(c) // 2 - 1] + c[len(c) // 2]) / 2))
    return Config("cascade", cfg.positions, cfg.heads, tuple(thr))


@pytest.mark.parametrize("policy,which", [("mean", (0, 1, 4)), ("fraction, pixel_threshold: 0.5", (4,))])
def test_onnx_cascade_takes_the_same_exits(run, tmp_path, policy, which):
    space = _space(policy)
    for k in which:
        cfg = _between(run, _configs(run, space.policy)[k], space.policy)
        model = export_config(run["net"], space, cfg, {"config_id": cfg.config_id}, space.policy)
        folder = export_onnx(model, tmp_path / f"c{k}")
        meta = read_cascade(folder)
        assert len(meta["stages"]) == cfg.n_exits + (cfg.kind != "static")
        want = evaluate(model, DATA, "val", warmup=0, progress=False, threads=1)
        got = evaluate(str(folder), DATA, "val", warmup=0, progress=False, threads=1)
        assert isinstance(got, EvaluationResult) and got.kind == cfg.kind
        assert got.exits == want.exits and got.macs == want.macs, cfg
        for key in ("exit_rates", "mean_gmacs", "tp", "pred", "gt", "miou", "pixel_acc"):
            assert getattr(got, key) == getattr(want, key), (cfg, key)
        cmp = compare_with_onnx(model, Cascade(folder, threads=1), (run["ds"][i][0] for i in range(len(run["ds"]))))
        assert cmp["n_exits_differ"] == 0 and cmp["n_pixels_differ"] == 0, cmp
        assert cmp["max_abs_logit_diff"] < 1e-3 and cmp["max_confidence_diff"] < 1e-5, cmp
        if cfg.kind == "cascade":
            # every PyTorch confidence is farther from its threshold than any confidence difference seen
            assert 0 < got.exit_counts[-1] < len(run["ds"]) and cmp["decisions_robust"], (cfg, cmp)


def test_runtime_stops_early_and_needs_no_torch(run, tmp_path):
    space = run["space"]
    cfg = _between(run, _configs(run, space.policy)[4], space.policy)   # no image exactly on a threshold
    model = export_config(run["net"], space, cfg)
    folder = export_onnx(model, tmp_path / "onnx")
    x = torch.stack([run["ds"][i][0] for i in range(len(run["ds"]))])
    np.save(tmp_path / "x.npy", x.numpy())
    # a fresh interpreter: the runtime alone, on a batch; torch must never be imported
    code = ("import sys, json, numpy as np; from messearch.runtime import Cascade;"
            "c = Cascade(sys.argv[1], threads=1); r = c.run(np.load(sys.argv[2]));"
            " np.save(sys.argv[3], r['logits']);"
            "print(json.dumps({'exits': r['exits'].tolist(), 'macs': r['macs'].tolist(), 'torch': 'torch' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "x.npy"), str(tmp_path / "l.npy")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["torch"] is False
    with torch.inference_mode():
        logits, ex, macs = model(x)
    assert res["exits"] == ex.tolist() and res["macs"] == macs.tolist()
    assert np.abs(np.load(tmp_path / "l.npy") - logits.numpy()).max() < 1e-3
    # real early exit: each stage graph runs only on the images still in the batch
    cascade = Cascade(folder, threads=1)
    sizes = []
    for k, sess in enumerate(cascade.sessions):
        sess.run = (lambda f, k: lambda names, feeds: (sizes.append((k, next(iter(feeds.values())).shape[0])),
                                                         f(names, feeds))[1])(sess.run, k)
    r = cascade.run(x.numpy())
    exits = r["exits"].tolist()
    assert sizes == [(k, sum(1 for e in exits if e >= k)) for k in range(len(sizes))]
    assert sizes[-1][1] < len(exits) and len(set(exits)) > 1
    labels, ex1 = cascade.predict(x[:1].numpy())
    assert labels.shape == (1, *space.input_size) and ex1.tolist() == exits[:1]
    # the README's deployment snippet runs as written on this folder
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "messearch.runtime" in b]
    out = subprocess.run([sys.executable, "-c", snippet.replace("results/quickstart/onnx", str(folder))],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "left at exit" in out.stdout, out.stderr


def test_metadata_feeds_the_model_from_the_file_alone(run, tmp_path):
    space = run["space"]
    cfg = _configs(run, space.policy)[2]
    names = class_names(DATA, space.num_classes)
    assert names[0] == "background" and len(names) == space.num_classes
    assert class_names("camvid:/nowhere", 11)[:2] == ["Sky", "Building"]   # fixed by the format
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "classes.yaml").write_text("classes: [sky, road, car, bike]\n")
    assert class_names(f"folder:{tmp_path / 'mine'}", 4) == ["sky", "road", "car", "bike"]
    assert class_names(f"folder:{tmp_path / 'gone'}", 4) == ["class_0", "class_1", "class_2", "class_3"]
    model = export_config(run["net"], space, cfg, {"config_id": cfg.config_id}, class_names=names)
    pre = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "input_size": list(space.input_size),
           "pixel_max": 255.0, "class_names": names}
    save_exported(model, tmp_path / "m.pt")
    save_exported(model, tmp_path / "m.ts", torchscript=True)
    folder = export_onnx(model, tmp_path / "onnx")
    cascade = read_cascade(folder)
    for meta in (torch.load(tmp_path / "m.pt", weights_only=True), load_exported(tmp_path / "m.pt").meta.to_dict(),
                 load_exported(tmp_path / "m.ts").meta.to_dict(), cascade):
        assert {k: meta[k] for k in pre} == pre
    # cascade.json is the ExportMeta record plus the stages: thresholds, policy and per-stage MACs included
    assert ExportMeta.from_dict(cascade) == model.meta
    assert [s["threshold"] for s in cascade["stages"] if s["exit"] is not None] == list(cfg.thresholds)
    assert cascade["policy"] == model.meta.policy and all("segment_macs" in s for s in cascade["stages"])
    # the runtime's preprocessing, from cascade.json alone, gives the training pipeline's tensor bit for bit
    rgb = np.random.default_rng(0).integers(0, 256, size=(*space.input_size, 3), dtype=np.uint8)
    x = Cascade(folder, threads=1).preprocess(rgb)
    assert np.array_equal(x[0], normalise_image(rgb).numpy())


def test_cli_export_onnx_and_evaluate_folder(run, tmp_path, capsys):
    policy = run["space"].policy   # thresholds off the images' confidences: the front's figures are exact for ONNX too
    front, recs = _front(run, tmp_path, configs=[_between(run, c, policy) for c in _configs(run, policy)])
    row = recs[4]
    folder = tmp_path / "onnx"
    assert main(["export", "--checkpoint", run["ckpt"], "--front", front, "--config-id", row["config_id"],
                 "--onnx", str(folder)]) == 0
    assert "ONNX, 4 stage graphs" in capsys.readouterr().out
    assert read_cascade(folder)["class_names"] == class_names(DATA, run["space"].num_classes)
    assert main(["evaluate", "--model", str(folder), "--data", DATA, "--json", "--warmup", "0", "--threads", "1"]) == 0
    got = json.loads(capsys.readouterr().out)
    for key in ("miou", "pixel_acc", "exit_rates", "mean_gmacs"):
        assert got[key] == row[key], key
    # bad inputs: one line, status 2
    (tmp_path / "empty").mkdir()
    cases = [(["evaluate", "--model", str(tmp_path / "empty"), "--data", DATA], "no cascade.json"),
             (["export", "--checkpoint", run["ckpt"], "--front", front, "--config-id", row["config_id"]], "--onnx DIR")]
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err, err


def test_lraspp_final_head_reads_a_feature_from_an_earlier_graph(tmp_path):
    """LR-ASPP's final head reads a low-level feature computed before the last exit: the graph that computes it
    passes it on, and the runtime drops the rows of images that leave in between."""
    from messearch import stats
    from messearch.backbones import candidate_positions
    from messearch.weights import build_mess_network
    from messearch.space import space_from_text

    cp = candidate_positions("lraspp_mobilenet_v3_large")
    space = space_from_text(f"model: lraspp_mobilenet_v3_large\nnum_classes: 3\ninput_size: [64, 64]\n"
                            f"positions: {[cp[1], cp[6], cp[-1]]}\nheads: [{{name: lin, layers: 0}}]\n"
                            "thresholds: [0.5]\n", "lraspp.yaml")
    torch.manual_seed(0)
    net = build_mess_network(space).eval()
    x = torch.randn(8, 3, 64, 64)
    with torch.inference_mode():
        conf = [stats.image_confidence(l, "mean", None, 20).numpy() for l in net(x)[0]]
    thr = []
    for c in conf:   # halfway between two neighbouring confidences: some images leave, the rest go on
        c = np.unique(c)
        thr.append(float((c[len(c) // 2 - 1] + c[len(c) // 2]) / 2))
    cfg = Config("cascade", tuple(space.positions), ("lin",) * 3, (thr[0], thr[1], 1.0))
    model = export_config(net, space, cfg)
    folder = export_onnx(model, tmp_path / "onnx")
    stages = read_cascade(folder)["stages"]
    assert [s["outputs"][-1] for s in stages[:3]].count("tap_low") == 1 and "tap_low" in stages[-1]["inputs"]
    with torch.inference_mode():
        logits, ex, macs = model(x)
    r = Cascade(folder, threads=1).run(x.numpy())
    assert r["exits"].tolist() == ex.tolist() and r["macs"].tolist() == macs.tolist()
    assert {0, 1, 3} <= set(ex.tolist())
    assert np.abs(r["logits"] - logits.numpy()).max() < 1e-3


def test_an_interrupted_re_export_leaves_the_previous_cascade_whole(run, tmp_path, monkeypatch):
    """Configuration A (four graphs), then B (three, another head at the same first position) into the same folder,
    interrupted after B's first graph: A's set is untouched. A finished B leaves no stage of A behind, and a graph
    of A put back by hand is refused, not run with B's thresholds."""
    from messearch import onnx_export

    space = run["space"]
    cfgs = _configs(run, space.policy)
    a, b = (export_config(run["net"], space, cfgs[k]) for k in (4, 3))
    folder = export_onnx(a, tmp_path / "onnx")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(before) == ["cascade.json", "stage0.onnx", "stage1.onnx", "stage2.onnx", "stage3.onnx"]
    real, calls = onnx_export._onnx_export, []

    def ctrl_c_after_the_first_graph(*args):
        if calls:
            raise KeyboardInterrupt
        calls.append(real(*args))

    monkeypatch.setattr(onnx_export, "_onnx_export", ctrl_c_after_the_first_graph)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(b, folder)
    monkeypatch.undo()
    assert calls and {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]   # no temporary folder left
    export_onnx(b, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["cascade.json", "stage0.onnx", "stage1.onnx", "stage2.onnx"]
    assert Cascade(folder, threads=1).n_exits == 2
    (folder / "stage0.onnx").write_bytes(before["stage0.onnx"])
    with pytest.raises(MessError, match=r"stage0.onnx: not the graph .*cascade.json lists \(its sha256 differs\)"):
        Cascade(folder, threads=1)
