"""Export and measured evaluation: the pruned dynamic-exit model reproduces its predicted figures exactly.

A tiny DeepLabV3-ResNet18 space at 64x64 (3 positions, 2 heads), random weights with sharpened classifiers
so that confidences spread, 8 synthetic images. Predictions come from per-exit statistics at batch 1 (the
cache's rule) and an independent cascade rule written here; the chain test goes through the real cache,
search and front when those modules are present.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from messearch import stats
from messearch.cache import build_cache
from messearch.cache_format import CacheArrays, load_cache
from messearch.checkpoint import load_checkpoint, save_checkpoint
from messearch.cli import main
from messearch.costs import mac_table
from messearch.data import build_dataset, class_names
from messearch.dataset import IMAGENET_MEAN, IMAGENET_STD
from messearch.errors import MessError
from messearch.evaluate import evaluate, evaluate_side_by_side
from messearch.config import Config
from messearch.export import export_config, export_model, load_exported, save_exported
from messearch.files import sha256_file
from messearch.front import write_front
from messearch.search_spec import SearchSpec
from messearch.search_driver import evaluate_configs, search_local
from messearch.weights import build_mess_network
from messearch.space import space_from_text

DATA = "synthetic:0:8"
SPACE = """
name: tiny
model: deeplabv3_resnet18
num_classes: 4
input_size: [64, 64]
positions: [backbone.layer1.1, backbone.layer2.1, backbone.layer3.1]
heads:
  - {name: lin, reduction: 4, layers: 0}
  - {name: c1, reduction: 8, layers: 1}
policy: {kind: %s}
thresholds: [0.3, 0.5, 0.7]
max_exits: 3
mode: single
"""


def _space(policy="mean"):
    return space_from_text(SPACE % policy, "tiny.yaml")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the cache's setting (thread count changes which CPU convolution runs, so rounding), and
    robust timing on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """A checkpoint with random weights whose classifiers are sharpened (confidences spread over (1/C, 1))."""
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    net = build_mess_network(_space()).eval()
    with torch.no_grad():
        for head in net.heads:
            head.classifier.weight.mul_(8.0)
        net.base.classifier[-1].weight.mul_(8.0)
    save_checkpoint(d / "mess.pt", net, DATA)
    net, space, _ = load_checkpoint(d / "mess.pt")
    ds = build_dataset(DATA, "val", space.input_size, num_classes=space.num_classes)
    return {"dir": d, "ckpt": str(d / "mess.pt"), "net": net, "space": space, "ds": ds,
            "cache": _direct_cache(net, space, ds), "macs": mac_table(space)}


def _direct_cache(net, space, ds) -> CacheArrays:
    """Per image and exit, the exact statistics of the exit's logits at batch 1 (what the cache stores)."""
    per = {k: [] for k in ("tp", "pred", "gt", "conf_mean", "n_above")}
    with torch.inference_mode():
        for i in range(len(ds)):
            x, m = ds[i]
            exits, final = net(x[None])
            s = [stats.exit_statistics(l, m[None], space.num_classes, space.ignore_index, space.policy.n_bins)
                 for l in exits + [final]]
            for k in ("tp", "pred", "n_above"):
                per[k].append(torch.stack([e[k][0] for e in s]).numpy())
            per["conf_mean"].append(np.array([float(e["conf_mean"][0]) for e in s]))
            per["gt"].append(s[0]["gt"][0].numpy())
    h, w = space.input_size
    return CacheArrays(image_ids=list(ds.image_ids), positions=list(space.positions), heads=space.head_names,
                       tp=np.stack(per["tp"]), pred=np.stack(per["pred"]), gt=np.stack(per["gt"]),
                       conf_mean=np.stack(per["conf_mean"]), n_above=np.stack(per["n_above"]),
                       n_pixels=np.full(len(ds), h * w, dtype=np.int64), meta={"n_bins": space.policy.n_bins})


def _confidence(cache: CacheArrays, e: int, policy) -> np.ndarray:
    if policy.kind == "mean":
        return cache.conf_mean[:, e]
    return cache.n_above[:, e, policy.pixel_threshold_bin].astype(np.float64) / cache.n_pixels


def _predict(cache: CacheArrays, cfg: Config, table, policy) -> dict:
    """The cascade rule written out image by image: exit taken, confusion sums, MACs."""
    n, e_final = cache.n_images, cache.tp.shape[1] - 1
    exits = [cache.exit_index(p, h) for p, h in zip(cfg.positions, cfg.heads)]
    pidx = [cache.positions.index(p) for p in cfg.positions]
    hidx = [cache.heads.index(h) for h in cfg.heads]
    took, macs = [], []
    tp = np.zeros(cache.gt.shape[1], dtype=np.int64)
    pred = np.zeros_like(tp)
    for i in range(n):
        j, cost = len(exits), 0
        for jj, e in enumerate(exits):
            cost += int(table.head[pidx[jj], hidx[jj]])
            if cfg.kind == "static" or _confidence(cache, e, policy)[i] >= cfg.thresholds[jj]:
                j = jj
                break
        cost += int(table.backbone_to[pidx[j]]) if j < len(exits) else int(table.backbone_total) + int(table.final)
        e = exits[j] if j < len(exits) else e_final
        tp += cache.tp[i, e]
        pred += cache.pred[i, e]
        took.append(j)
        macs.append(cost)
    gt = cache.gt.sum(0)
    k = len(exits)
    return {"miou": float(stats.miou_from_counts(tp, pred, gt)), "pixel_acc": float(stats.pixel_accuracy(tp, gt)),
            "exit_rates": [took.count(j) / n for j in range(k + 1)], "mean_gmacs": float(np.int64(sum(macs)) / n / 1e9),
            "tp": tp.tolist(), "pred": pred.tolist(), "gt": gt.tolist(), "exits": took, "macs": macs}


def _split_threshold(cache, e, policy) -> float:
    """A threshold that sends some images on and lets others leave (the median confidence)."""
    c = np.sort(_confidence(cache, e, policy))
    return float(c[len(c) // 2])


def _configs(run, policy) -> list[Config]:
    cache, P = run["cache"], run["space"].positions
    t = lambda p, h: _split_threshold(cache, cache.exit_index(p, h), policy)  # noqa: E731
    shared = t(P[1], "c1")
    return [
        Config("reference"),
        Config("static", (P[1],), ("c1",), (0.0,)),
        Config("cascade", (P[0],), ("lin",), (t(P[0], "lin"),)),
        Config("cascade", (P[0], P[2]), ("c1", "c1"), (shared, shared)),
        Config("cascade", tuple(P), ("lin", "c1", "lin"), tuple(t(p, h) for p, h in zip(P, ("lin", "c1", "lin")))),
    ]


@pytest.mark.parametrize("policy", ["mean", "fraction, pixel_threshold: 0.5"])
def test_exact_fidelity_every_kind(run, policy):
    space = _space(policy)
    for cfg in _configs(run, space.policy):
        want = _predict(run["cache"], cfg, run["macs"], space.policy)
        model = export_config(run["net"], space, cfg, {"config_id": cfg.config_id}, space.policy)
        got = evaluate(model, DATA, "val", warmup=0, progress=False)
        assert got.exits == want["exits"], cfg
        assert got.macs == want["macs"], cfg
        for key in ("tp", "pred", "gt", "miou", "pixel_acc", "exit_rates", "mean_gmacs"):
            assert getattr(got, key) == want[key], (cfg, key)
        if cfg.kind == "cascade":  # the thresholds really split the images
            assert 0 < got.exit_counts[-1] < len(run["ds"]), cfg


def test_side_by_side_evaluation_equals_one_by_one(run):
    """Two exported models evaluated at once, a thread each (the pipeline's evaluate stage), give exactly the figures
    that evaluating them one by one gives."""
    space = _space("mean")
    models = [export_config(run["net"], space, cfg, {"config_id": cfg.config_id}, space.policy)
              for cfg in _configs(run, space.policy)[2:4]]
    together = evaluate_side_by_side(models, DATA, "val", threads=1, warmup=0, progress=False)
    for model, got in zip(models, together):
        want = evaluate(model, DATA, "val", warmup=0, progress=False, threads=1)
        for key in ("tp", "pred", "gt", "exits", "macs", "miou", "exit_rates", "torch_threads"):
            assert getattr(got, key) == getattr(want, key), key


def test_pruned_modules_only(run):
    space, P = run["space"], run["space"].positions
    static = export_config(run["net"], space, Config("static", (P[0],), ("lin",), (0.0,)))
    names = {k.split(".")[0] for k in static.state_dict()}
    assert names == {"stages"} and not static.has_final
    n_units = sum(len(s.units) for s in static.stages)
    assert n_units == [u.name for u in run["net"].units].index(P[0]) + 1   # backbone up to the exit, no further
    assert sum(p.numel() for p in static.parameters()) < 0.1 * sum(p.numel() for p in run["net"].parameters())
    ref = export_config(run["net"], space, Config("reference"))
    assert sum(len(s.units) for s in ref.stages) == len(run["net"].units) and ref.has_final


def test_early_exit_skips_deeper_segments(run):
    space, cache = run["space"], run["cache"]
    cfg = _configs(run, space.policy)[4]
    model = export_config(run["net"], space, cfg)
    seen = []
    hooks = [s.units.register_forward_hook(lambda m, i, o, k=k: seen.append((k, o.shape[0])))
             for k, s in enumerate(model.stages)]
    x = torch.stack([run["ds"][i][0] for i in range(len(run["ds"]))])
    with torch.inference_mode():
        _, ex, _ = model(x)
    for h in hooks:
        h.remove()
    ex = ex.tolist()
    exit_stage = [k for k, s in enumerate(model.stages) if s.has_exit]
    per_stage = dict(seen)
    for k in range(len(model.stages)):
        # images still running at stage k: those that did not leave at an exit of an earlier stage
        left = sum(1 for e in ex if e < len(exit_stage) and exit_stage[e] < k)
        assert per_stage.get(k, 0) == len(ex) - left
    assert len(set(ex)) > 1 and per_stage[len(model.stages) - 1] < len(ex)
    # one image alone that leaves at the first exit runs exactly one stage
    first = ex.index(0)
    seen.clear()
    hooks = [s.units.register_forward_hook(lambda m, i, o, k=k: seen.append(k)) for k, s in enumerate(model.stages)]
    with torch.inference_mode():
        model(x[first:first + 1])
    for h in hooks:
        h.remove()
    assert seen == list(range(exit_stage[0] + 1))


def test_batch_equals_one_by_one(run):
    space = run["space"]
    cfg = _configs(run, space.policy)[4]
    model = export_config(run["net"], space, cfg)
    x = torch.stack([run["ds"][i][0] for i in range(len(run["ds"]))])
    # without oneDNN, CPU convolutions are computed image by image: batch results equal batch-1 results bit for bit
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=False):
        lb, eb, mb = model(x)
        ones = [model(x[i:i + 1]) for i in range(len(x))]
    assert torch.equal(lb, torch.cat([o[0] for o in ones]))
    assert eb.tolist() == [int(o[1]) for o in ones] and mb.tolist() == [int(o[2]) for o in ones]
    # with oneDNN (the default) rounding depends on the batch: evaluate reports the differences, counted here too
    r = evaluate(model, DATA, "val", batch_size=4, warmup=0, progress=False, compare_batch1=True)
    with torch.inference_mode():
        lb, eb, _ = model(x)
        l1 = torch.cat([model(x[i:i + 1])[0] for i in range(len(x))])
        e1 = [int(model(x[i:i + 1])[1]) for i in range(len(x))]
    assert r.batch1["n_pixels_differ"] == int((lb.argmax(1) != l1.argmax(1)).sum())
    assert r.batch1["n_exits_differ"] == sum(int(a != b) for a, b in zip(eb.tolist(), e1))
    assert r.batch1["max_abs_logit_diff"] < 1e-3


def test_save_load_and_torchscript(run, tmp_path):
    space = run["space"]
    cfg = _configs(run, space.policy)[3]
    model = export_config(run["net"], space, cfg, {"config_id": cfg.config_id})
    x = torch.stack([run["ds"][i][0] for i in range(4)])
    with torch.inference_mode():
        want = model(x)
    loaded = load_exported(save_exported(model, tmp_path / "m.pt"))
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["format"] == "messearch/mess-export-v1" and payload["config"]["kind"] == "cascade"
    with torch.inference_mode():
        got = loaded(x)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    save_exported(model, tmp_path / "m.ts", torchscript=True)
    torch.save(x, tmp_path / "x.pt")
    # a fresh interpreter with PyTorch only: messearch is never imported
    code = ("import sys, torch; torch.set_num_threads(1); m = torch.jit.load(sys.argv[1]); x = torch.load(sys.argv[2]);"
            "out = m(x); torch.save(list(out), sys.argv[3]); assert 'messearch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.ts"), str(tmp_path / "x.pt"),
                    str(tmp_path / "out.pt")], check=True, cwd=tmp_path)
    ts = torch.load(tmp_path / "out.pt")
    assert all(torch.equal(a, b) for a, b in zip(want, ts))
    r1 = evaluate(str(tmp_path / "m.ts"), DATA, "val", warmup=0, progress=False)
    r2 = evaluate(model, DATA, "val", warmup=0, progress=False)
    assert r1.tp == r2.tp and r1.exits == r2.exits and r1.macs == r2.macs
    # the metadata travels whole, in both formats: preprocessing and class names included
    assert loaded.meta == model.meta == load_exported(tmp_path / "m.ts").meta
    assert model.meta.class_names == class_names(DATA, space.num_classes) and len(model.meta.class_names) == 4
    assert model.meta.mean == list(IMAGENET_MEAN) and model.meta.std == list(IMAGENET_STD)
    assert model.meta.input_size == list(space.input_size) and model.meta.exits == [list(e) for e in
                                                                                   zip(cfg.positions, cfg.heads)]


def test_reference_from_checkpoint(run):
    r = evaluate(run["ckpt"], DATA, "val", warmup=1, progress=False)
    want = _predict(run["cache"], Config("reference"), run["macs"], run["space"].policy)
    assert r.tp == want["tp"] and r.miou == want["miou"] and r.exit_rates == [1.0]
    assert r.mean_gmacs == run["macs"].reference / 1e9
    assert r.latency_ms_median > 0 and r.latency_ms_p90 >= r.latency_ms_median


def _front(run, tmp_path, sha=None, configs=None):
    """A pareto.parquet holding the rows of `configs` (default _configs) with their predicted figures (the search's
    columns)."""
    import pandas as pd

    space, recs = run["space"], []
    for cfg in configs or _configs(run, space.policy):
        p = _predict(run["cache"], cfg, run["macs"], space.policy)
        recs.append({"config_id": cfg.config_id, "kind": cfg.kind, "n_exits": cfg.n_exits,
                     "positions": list(cfg.positions), "heads": list(cfg.heads), "thresholds": list(cfg.thresholds),
                     "miou": p["miou"], "pixel_acc": p["pixel_acc"], "mean_gmacs": p["mean_gmacs"],
                     "exit_rates": p["exit_rates"], "speedup": run["macs"].reference / 1e9 / p["mean_gmacs"],
                     "miou_delta_pp": 0.0, "is_reference": cfg.kind == "reference"})
    path = tmp_path / "pareto.parquet"
    write_front(pd.DataFrame(recs), path, {"checkpoint_sha256": sha or sha256_file(run["ckpt"]),
                                           "space_text": space.text})
    return str(path), recs


def test_cli_export_and_evaluate(run, tmp_path, capsys):
    front, recs = _front(run, tmp_path)
    row = recs[4]
    out = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", run["ckpt"], "--front", front, "--config-id", row["config_id"],
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", DATA, "--split", "val", "--json", "--warmup", "0"]) == 0
    got = json.loads(capsys.readouterr().out)
    for key in ("miou", "pixel_acc", "exit_rates", "mean_gmacs"):
        assert got[key] == row[key], key
    assert {"latency_ms_median", "latency_ms_p90", "n_images"} <= set(got)
    assert load_exported(out).meta.provenance["predicted"]["miou"] == row["miou"]


def _bad_cli_argv(run, tmp_path, case: str) -> list[str]:
    front, recs = _front(run, tmp_path)
    out = str(tmp_path / "model.pt")
    if case == "unknown config id":
        return ["export", "--checkpoint", run["ckpt"], "--front", front, "--config-id", "cdeadbeef00", "--out", out]
    if case == "front of another checkpoint":
        other = _front(run, tmp_path / "other", "0" * 64)[0]
        return ["export", "--checkpoint", run["ckpt"], "--front", other, "--config-id", recs[4]["config_id"], "--out", out]
    return ["evaluate", "--model", run["ckpt"] + ".nope", "--data", DATA]


@pytest.mark.parametrize("case, words", [("unknown config id", "not in"), ("front of another checkpoint",
                                                                           "another checkpoint"),
                                          ("missing model", "not found")])
def test_cli_bad_inputs_one_line(run, tmp_path, capsys, case, words):
    """Bad inputs: one line on stderr, exit status 2."""
    assert main(_bad_cli_argv(run, tmp_path, case)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1, err


def test_export_of_an_unknown_id_lists_valid_ids(run, tmp_path):
    front, recs = _front(run, tmp_path)
    with pytest.raises(MessError) as e:
        export_model(run["ckpt"], front, "zzz", tmp_path / "z.pt")
    assert recs[0]["config_id"] in str(e.value)


@pytest.mark.parametrize("what", ["checkpoint", "junk"])
def test_load_exported_refuses_what_is_not_an_export(run, tmp_path, what):
    path = run["ckpt"]
    if what == "junk":
        path = tmp_path / "junk.pt"
        path.write_bytes(b"not a model")
    with pytest.raises(MessError, match="not a messearch exported model"):
        load_exported(path)


def _real_cache(run, tmp_path, request):
    """The cache of the split at batch 1, built by the cache's Ray actors."""
    request.getfixturevalue("ray_local")
    build_cache(run["ckpt"], DATA, "val", str(tmp_path / "cache"), batch_size=1)
    return load_cache(str(tmp_path / "cache"))


def test_chain_cache_search_front_export_evaluate(run, tmp_path, request):
    """cache -> search -> pareto.parquet -> export -> evaluate: every figure of every exported row equals its row's."""
    space = run["space"]
    cache = _real_cache(run, tmp_path, request)
    # the cache's integers and confidences are the ones computed here from each exit's logits at batch 1
    d = run["cache"]
    assert cache.image_ids == d.image_ids
    for key in ("tp", "pred", "gt", "conf_mean", "n_above"):
        assert np.array_equal(getattr(cache, key), getattr(d, key)), key
    conf = cache.conf_mean[:, :-1]
    thresholds = tuple(sorted({float(np.quantile(conf, q, method="lower")) for q in (0.3, 0.5, 0.7)}))
    meta = {"checkpoint_sha256": sha256_file(run["ckpt"]), "space_text": space.text}
    rows = []
    for mode in ("shared", "per-exit"):
        spec = SearchSpec(positions=list(space.positions), heads=space.head_names, thresholds=thresholds,
                                 max_exits=3, thresholds_mode=mode, mode="single", policy_kind="mean")
        front = search_local(cache, spec, run["macs"])
        every = evaluate_configs(cache, spec, run["macs"])
        # the search's own front, plus rows of every kind and exit count picked from all configurations
        ks = (1, 2, 3) if mode == "shared" else (2, 3)
        picks = [every[(every["n_exits"] == k) & (every["kind"] == "cascade")].sample(1, random_state=k) for k in ks]
        if mode == "shared":
            picks.append(every[every["kind"] == "static"].sample(1, random_state=0))
        rows.append(front)
        rows += picks
    df = pd_concat(rows)
    path = tmp_path / "pareto.parquet"
    write_front(df, path, meta)
    assert {"reference", "static", "cascade"} <= set(df["kind"]) and set(df["n_exits"]) == {0, 1, 2, 3}
    for _, row in df.iterrows():
        model = export_model(run["ckpt"], path, row["config_id"], tmp_path / f"{row['config_id']}.pt")
        got = evaluate(str(model), DATA, "val", warmup=0, progress=False)
        for key in ("miou", "pixel_acc", "mean_gmacs"):
            assert getattr(got, key) == row[key], (row["config_id"], key)
        assert got.exit_rates == list(row["exit_rates"]), row["config_id"]


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True).drop_duplicates("config_id").reset_index(drop=True)
