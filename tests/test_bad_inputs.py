"""The reliability table: every bad input the CLI may meet -> its exit status and a fragment of its one error line.

Each row runs `messearch.cli.main` in this process (with the session's local Ray) and checks that stderr is one
line `error: ...` holding the fragment, with no traceback and no colour codes. The fixtures are one tiny
LR-ASPP-MobileNetV3 checkpoint (2 positions x 2 heads, 11 classes, 32x32 input), a fabricated CamVid-format data
set of 3 validation images, its cache and its front. Interrupts are tested last, on real subprocesses.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from messearch.cli import main

H, W = 20, 30
SPACE = """
name: bad
model: lraspp_mobilenet_v3_large
num_classes: 11
input_size: [32, 32]
positions: [backbone.2, backbone.4]
heads:
  - {name: lin, reduction: 4, layers: 0}
  - {name: c1, reduction: 4, layers: 1}
policy: {kind: fraction, pixel_threshold: 0.5, n_bins: 10}
thresholds: [0.3, 0.6, 0.9]
max_exits: 2
"""
# A valid space file's five required fields; a row replaces or adds one line.
BASE = ("model: deeplabv3_resnet18\nnum_classes: 4\ninput_size: [64, 64]\nheads: [{name: h}]\nthresholds: [0.5]\n")


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _camvid(root: Path) -> Path:
    """A CamVid-layout folder: 2 train and 3 val images (20x30) with labels in 0..10 and the void value 11."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 3)):
        lines = []
        for i in range(n):
            _save(root / split / f"{split}{i}.jpg", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
            _save(root / f"{split}annot" / f"{split}{i}.png", rng.integers(0, 12, (H, W), dtype=np.uint8))
            lines.append(f"{split}/{split}{i}.jpg {split}annot/{split}{i}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory, ray_local):
    """Paths of the good inputs: space, data, checkpoint, cache and front."""
    from messearch.cache import build_cache
    from messearch.checkpoint import save_checkpoint
    from messearch.weights import build_mess_network
    from messearch.space import space_from_text

    root = tmp_path_factory.mktemp("bad_inputs")
    camvid = _camvid(root / "camvid")
    (root / "space.yaml").write_text(SPACE)
    torch.manual_seed(0)
    net = build_mess_network(space_from_text(SPACE, str(root / "space.yaml")))
    with torch.no_grad():   # sharpen every classifier: confidences spread, so the front has cascades, not only the reference
        for m in list(net.heads) + [net.base.classifier]:
            [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)][-1].weight.mul_(1000.0)
    save_checkpoint(root / "mess.pt", net, f"camvid:{camvid}")
    build_cache(root / "mess.pt", None, "val", root / "cache", actors=1, shard_size=2, progress=False)
    assert main(["search", "--cache", str(root / "cache"), "--out", str(root / "pareto.parquet"), "--local"]) == 0
    from messearch.front import read_front

    # The "same front" checks below compare cascades too, not only the reference row.
    assert (read_front(root / "pareto.parquet")[0]["kind"] == "cascade").any()
    (root / "afile").write_text("a file, not a folder\n")
    return {"root": str(root), "space": str(root / "space.yaml"), "data": f"camvid:{camvid}", "camvid": str(camvid),
            "ckpt": str(root / "mess.pt"), "cache": str(root / "cache"), "front": str(root / "pareto.parquet"),
            "afile": str(root / "afile")}


# ------------------------------------------------------------------------------------------ row set-ups
# Each takes (env, tmp) and returns the placeholders its argv uses ({tmp} and env's keys are always there).

def space_with(line: str):
    def setup(env, tmp):
        key = line.split(":")[0]
        text = "".join(x + "\n" for x in BASE.splitlines() if not x.startswith(key + ":")) + line
        (tmp / "s.yaml").write_text(text)
        return {"s": str(tmp / "s.yaml")}
    return setup


def space_text(text: str):
    def setup(env, tmp):
        (tmp / "s.yaml").write_text(text)
        return {"s": str(tmp / "s.yaml")}
    return setup


def bad_camvid(corrupt):
    """A copy of the data set with one file spoiled by corrupt(root)."""
    def setup(env, tmp):
        root = Path(shutil.copytree(env["camvid"], tmp / "camvid"))
        corrupt(root)
        return {"bad": f"camvid:{root}"}
    return setup


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _write(rel: str, data: bytes):
    def setup(env, tmp):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
        return {}
    return setup


def _copy_cache(edit=None):
    def setup(env, tmp):
        out = Path(shutil.copytree(env["cache"], tmp / "cache"))
        if edit is not None:
            edit(out)
        return {"c": str(out)}
    return setup


def _manifest_edit(fn):
    import json

    def edit(out: Path):
        m = json.loads((out / "manifest.json").read_text())
        fn(m)
        (out / "manifest.json").write_text(json.dumps(m))
    return _copy_cache(edit)


def _truncated_checkpoint(env, tmp):
    data = Path(env["ckpt"]).read_bytes()
    (tmp / "half.pt").write_bytes(data[:len(data) // 2])
    return {}


def _pickle_with_code(env, tmp):
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'pwned'}",))
    (tmp / "evil.pt").write_bytes(pickle.dumps({"state_dict": Boom()}))
    return {}


ROWS = [
    # --- space files (info validates and reports): handled well before, kept handled
    ("space-unknown-field", space_with("colour: red"), ["info", "{s}"], 2, "unknown field 'colour'"),
    ("space-bad-position", space_with("positions: [backbone.layer9.0]"), ["info", "{s}"], 2,
     "field 'positions': bad value 'backbone.layer9.0'"),
    ("space-threshold-range", space_with("thresholds: [0.5, 1.5]"), ["info", "{s}"], 2,
     "field 'thresholds': bad value 1.5"),
    ("space-thresholds-num-huge", space_with("thresholds: {start: 0.1, stop: 0.9, num: 1000000000}"), ["info", "{s}"],
     2, "field 'thresholds.num': bad value 1000000000; allowed: an integer in 1..1,000"),
    ("space-thresholds-list-long", space_with("thresholds: [" + ", ".join(f"{i / 2000:.4f}" for i in range(1001)) + "]"),
     ["info", "{s}"], 2, "field 'thresholds': bad value 'a list of 1,001'; allowed: at most 1,000 values"),
    ("space-n-bins-huge", space_with("policy: {kind: fraction, pixel_threshold: 0.5, n_bins: 100000000}"),
     ["info", "{s}"], 2, "field 'policy.n_bins': bad value 100000000; allowed: an integer in 1..1,000"),
    ("space-head-width", space_with("heads: [{name: h, width: 0}]"), ["info", "{s}"], 2, "field 'heads[0].width'"),
    ("space-head-rfe", space_with("heads: [{name: h, rfe: huge}]"), ["info", "{s}"], 2, "field 'heads[0].rfe'"),
    ("space-model", space_with("model: vgg16"), ["info", "{s}"], 2, "field 'model': bad value 'vgg16'"),
    ("space-pixel-threshold", space_with("policy: {kind: fraction, pixel_threshold: 0.33}"), ["info", "{s}"], 2,
     "field 'policy.pixel_threshold'"),
    ("space-mode", space_with("mode: sometimes"), ["info", "{s}"], 2, "field 'mode': bad value 'sometimes'"),
    ("space-missing-field", space_text("model: deeplabv3_resnet18\n"), ["info", "{s}"], 2,
     "missing required field 'num_classes'"),
    ("space-not-yaml", space_text("model: [unclosed\n"), ["info", "{s}"], 2, "not valid YAML"),
    ("space-python-tag", space_text(BASE + "name: !!python/object/apply:os.system ['true']\n"), ["info", "{s}"], 2,
     "not valid YAML"),
    ("space-file-missing", None, ["info", "{tmp}/nope.yaml"], 2, "space file not found"),
    # --- space files: accepted silently before
    ("space-duplicate-key", space_text(BASE + "num_classes: 5\n"), ["info", "{s}"], 2,
     "field 'num_classes' given twice (lines 2 and 6)"),
    ("space-max-exits-above-positions", space_with("max_exits: 99"), ["info", "{s}"], 2,
     "field 'max_exits': bad value 99; allowed: an integer from 1 to 8"),
    ("space-ignore-index-in-classes", space_with("ignore_index: 2"), ["info", "{s}"], 2,
     "field 'ignore_index': bad value 2; allowed: a value outside the classes 0..3"),
    ("space-classes-beyond-exact-mean", space_text(BASE.replace("num_classes: 4", "num_classes: 300") +
                                                   "ignore_index: 1000\n"), ["info", "{s}"], 2,
     "field 'num_classes': bad value 300; allowed: at most 255 with policy kind 'mean'"),
    # --- data seen by `cache`: header problems named before Ray starts, decode problems by the actor in one line
    ("cache-image-header", bad_camvid(lambda r: (r / "val" / "val1.jpg").write_bytes(b"not an image")),
     ["cache", "--checkpoint", "{ckpt}", "--data", "{bad}", "--out", "{tmp}/c", "--quiet"], 2,
     "val1.jpg: cannot read image header"),
    ("cache-label-rgb", bad_camvid(lambda r: _save(r / "valannot" / "val2.png", np.zeros((H, W, 3), np.uint8))),
     ["cache", "--checkpoint", "{ckpt}", "--data", "{bad}", "--out", "{tmp}/c", "--quiet"], 2,
     "val2.png: label map has mode RGB"),
    ("cache-label-size", bad_camvid(lambda r: _save(r / "valannot" / "val0.png", np.zeros((H + 1, W), np.uint8))),
     ["cache", "--checkpoint", "{ckpt}", "--data", "{bad}", "--out", "{tmp}/c", "--quiet"], 2,
     f"val0.png: label map is {W}x{H + 1} but its image"),
    ("cache-truncated-jpeg", bad_camvid(lambda r: _truncate(r / "val" / "val2.jpg")),
     ["cache", "--checkpoint", "{ckpt}", "--data", "{bad}", "--out", "{tmp}/c", "--quiet"], 2,
     "val2.jpg: cannot read image"),
    ("cache-label-out-of-range", bad_camvid(lambda r: _save(r / "valannot" / "val1.png", np.full((H, W), 12, np.uint8))),
     ["cache", "--checkpoint", "{ckpt}", "--data", "{bad}", "--out", "{tmp}/c", "--quiet"], 2,
     "val1.png: label values [12] are outside the camvid classes"),
    ("cache-data-root-missing", None,
     ["cache", "--checkpoint", "{ckpt}", "--data", "camvid:{tmp}/nope", "--out", "{tmp}/c", "--quiet"], 2,
     "camvid data root not found"),
    ("cache-checkpoint-missing", None, ["cache", "--checkpoint", "{tmp}/nope.pt", "--out", "{tmp}/c"], 2,
     "checkpoint not found"),
    ("cache-checkpoint-garbage", _write("junk.pt", b"not a checkpoint"),
     ["cache", "--checkpoint", "{tmp}/junk.pt", "--out", "{tmp}/c"], 2,
     "junk.pt: not a checkpoint that torch.load(weights_only=True) reads (it is not a torch.save file: it starts "
     "with b'not ', not a zip archive or a pickle)"),
    ("cache-checkpoint-empty", _write("empty.pt", b""), ["cache", "--checkpoint", "{tmp}/empty.pt", "--out", "{tmp}/c"],
     2, "empty.pt: not a checkpoint that torch.load(weights_only=True) reads (the file is empty)"),
    ("evaluate-checkpoint-truncated", _truncated_checkpoint,
     ["evaluate", "--checkpoint", "{tmp}/half.pt", "--data", "{data}"], 2,
     "half.pt: not an exported model or MESS checkpoint that torch.load(weights_only=True) reads (a damaged zip "
     "archive (truncated or corrupt)"),
    ("cache-checkpoint-pickle-code", _pickle_with_code, ["cache", "--checkpoint", "{tmp}/evil.pt", "--out", "{tmp}/c"],
     2, "it holds Python objects other than tensors, which weights_only=True refuses to unpickle"),
    ("cache-exists-without-resume", None, ["cache", "--checkpoint", "{ckpt}", "--out", "{cache}", "--quiet"], 2,
     "already holds a cache; pass --resume"),
    ("cache-out-is-a-file", None, ["cache", "--checkpoint", "{ckpt}", "--out", "{afile}", "--quiet"], 2,
     "is a file; give a folder"),
    ("train-data-root-missing", None,
     ["train", "--space", "{space}", "--data", "camvid:{tmp}/nope", "--out", "{tmp}/t", "--quiet"], 2,
     "camvid data root not found"),
    # --- caches given to `search`
    ("search-no-cache", None, ["search", "--cache", "{tmp}", "--out", "{tmp}/p.parquet", "--local"], 2,
     "no cache here (manifest.json missing)"),
    ("search-shard-deleted", _copy_cache(lambda c: (c / "shard-00001.parquet").unlink()),
     ["search", "--cache", "{c}", "--out", "{tmp}/p.parquet", "--local"], 2, "missing or its sha256 does not match"),
    ("search-shard-corrupt", _copy_cache(lambda c: _truncate(c / "shard-00000.parquet")),
     ["search", "--cache", "{c}", "--out", "{tmp}/p.parquet", "--local"], 2, "missing or its sha256 does not match"),
    ("search-cache-incomplete", _manifest_edit(lambda m: m.update(complete=False)),
     ["search", "--cache", "{c}", "--out", "{tmp}/p.parquet", "--local"], 2, "the cache is incomplete"),
    ("search-bad-latency-budget", None,
     ["search", "--cache", "{cache}", "--out", "{tmp}/p.parquet", "--local", "--max-latency-ms", "fast"], 2,
     "expected DEVICE=MILLISECONDS"),
    # --- outputs that cannot be written, refused before any work
    ("search-out-is-a-folder", None, ["search", "--cache", "{cache}", "--out", "{tmp}", "--local"], 2,
     "is a folder; give a file path"),
    ("export-out-under-a-file", None,
     ["export", "--checkpoint", "{ckpt}", "--front", "{front}", "--config-id", "reference", "--out",
      "{afile}/model.pt"], 2, "afile is a file, not a folder"),
    ("plot-out-unwritable", None, ["plot", "{front}", "--out", "/proc/messearch-test/pareto.png"], 2,
     "cannot write in /proc"),
    # --- fronts and what reads them
    ("export-config-id-unknown", None,
     ["export", "--checkpoint", "{ckpt}", "--front", "{front}", "--config-id", "cdeadbeef00", "--out",
      "{tmp}/m.pt"], 2, "not in"),
    ("query-sort-unknown", None, ["query", "{front}", "--sort", "colour"], 2, "--sort 'colour': not a column"),
    ("evaluate-model-missing", None, ["evaluate", "--model", "{tmp}/nope.pt", "--data", "{data}"], 2, "not found"),
]


def _front_without(column: str):
    """A copy of the front with one column dropped (metadata kept), as another tool might write it."""
    def setup(env, tmp):
        import pyarrow.parquet as pq

        t = pq.read_table(env["front"])
        pq.write_table(t.drop_columns([column]), tmp / "f.parquet")
        return {"f": str(tmp / "f.parquet")}
    return setup


def _front_file(data: bytes | None):
    def setup(env, tmp):
        if data is None:   # truncated
            raw = Path(env["front"]).read_bytes()
            (tmp / "f.parquet").write_bytes(raw[: len(raw) // 2])
        else:
            (tmp / "f.parquet").write_bytes(data)
        return {"f": str(tmp / "f.parquet")}
    return setup


def _front_meta(**changes):
    """A copy of the front with its key-value metadata changed (as an older messearch wrote it)."""
    def setup(env, tmp):
        import pyarrow.parquet as pq

        t = pq.read_table(env["front"])
        kv = dict(t.schema.metadata)
        kv.update({k.encode(): v.encode() for k, v in changes.items()})
        pq.write_table(t.replace_schema_metadata(kv), tmp / "f.parquet")
        return {"f": str(tmp / "f.parquet")}
    return setup


def _space_variant(old: str, new: str):
    def setup(env, tmp):
        (tmp / "s.yaml").write_text(SPACE.replace(old, new))
        return {"s": str(tmp / "s.yaml")}
    return setup


EXPORT_F = ["export", "--checkpoint", "{ckpt}", "--front", "{f}", "--config-id", "reference", "--out", "{tmp}/m.pt"]
SEARCH_C = ["search", "--cache", "{c}", "--out", "{tmp}/p.parquet", "--local"]
SEARCH_S = ["search", "--cache", "{cache}", "--space", "{s}", "--out", "{tmp}/p.parquet", "--local"]

ROWS += [
    ("query-front-missing", None, ["query", "{tmp}/nope.parquet"], 2, "nope.parquet: front not found"),
    ("plot-front-missing", None, ["plot", "{tmp}/nope.parquet", "--out", "{tmp}/p.png"], 2, "front not found"),
    ("query-front-truncated", _front_file(None), ["query", "{f}"], 2, "f.parquet: not a Parquet file"),
    ("plot-front-not-parquet", _front_file(b"config_id,miou\nreference,0.5\n"), ["plot", "{f}", "--out", "{tmp}/p.png"],
     2, "f.parquet: not a Parquet file"),
    ("export-front-truncated", _front_file(None), EXPORT_F, 2, "f.parquet: not a Parquet file"),
    ("query-front-lacks-miou", _front_without("miou"), ["query", "{f}"], 2, "column 'miou' missing"),
    ("query-front-lacks-is_reference", _front_without("is_reference"), ["query", "{f}"], 2,
     "column 'is_reference' missing"),
    ("plot-front-lacks-mean_gmacs", _front_without("mean_gmacs"), ["plot", "{f}", "--out", "{tmp}/p.png"], 2,
     "column 'mean_gmacs' missing"),
    ("plot-front-lacks-is_reference", _front_without("is_reference"), ["plot", "{f}", "--out", "{tmp}/p.png"], 2,
     "column 'is_reference' missing"),
    ("export-front-lacks-thresholds", _front_without("thresholds"), EXPORT_F, 2, "column 'thresholds' missing"),
    ("export-front-lacks-config_id", _front_without("config_id"), EXPORT_F, 2, "column 'config_id' missing"),
    ("export-front-lacks-positions", _front_without("positions"), EXPORT_F, 2, "column 'positions' missing"),
    # --- provenance: a --space that disagrees with the cache (case 1), a manifest edited by hand (case 2)
    ("search-space-policy-bins", _space_variant("n_bins: 10", "n_bins: 4"), SEARCH_S, 2,
     "field 'policy.n_bins' is 4 but the cache"),
    ("export-front-policy-on-another-grid", _front_meta(policy='{"kind": "fraction", "pixel_threshold": 0.5, "n_bins": 2}'),
     EXPORT_F, 2, "the front records policy kind 'fraction' on 2 bins, but its checkpoint's cache holds"),
    ("search-space-pixel-threshold", _space_variant("pixel_threshold: 0.5", "pixel_threshold: 0.7"), SEARCH_S, 2,
     "field 'policy.pixel_threshold' is 0.7 but the cache"),
    ("search-space-policy-kind", _space_variant("{kind: fraction, pixel_threshold: 0.5, n_bins: 10}", "{kind: mean}"),
     SEARCH_S, 2, "field 'policy.kind' is 'mean' but the cache"),
    ("search-space-positions", _space_variant("[backbone.2, backbone.4]", "[backbone.2, backbone.5]"), SEARCH_S, 2,
     "field 'positions' is ['backbone.2', 'backbone.5'] but the cache"),
    ("search-space-heads-order", _space_variant("  - {name: lin, reduction: 4, layers: 0}\n  - {name: c1, reduction: 4, layers: 1}",
                                                "  - {name: c1, reduction: 4, layers: 1}\n  - {name: lin, reduction: 4, layers: 0}"),
     SEARCH_S, 2, "field 'heads' is ['c1', 'lin'] but the cache"),
    ("search-space-head-spec", _space_variant("{name: c1, reduction: 4, layers: 1}", "{name: c1, reduction: 4, layers: 2}"),
     SEARCH_S, 2, "field 'heads[1]'"),
    ("search-space-classes", _space_variant("num_classes: 11", "num_classes: 12"), SEARCH_S, 2,
     "field 'num_classes' is 12 but the cache"),
    ("search-space-input-size", _space_variant("input_size: [32, 32]", "input_size: [64, 64]"), SEARCH_S, 2,
     "field 'input_size' is [64, 64] but the cache"),
    ("search-max-exits-above-positions", None,
     ["search", "--cache", "{cache}", "--out", "{tmp}/p.parquet", "--local", "--max-exits", "5"], 2,
     "--max-exits 5"),
    ("search-manifest-positions-reversed", _manifest_edit(lambda m: m["positions"].reverse()), SEARCH_C, 2,
     "manifest.json: its metadata no longer matches its cache_sha256"),
    ("search-manifest-heads-reversed", _manifest_edit(lambda m: m["heads"].reverse()), SEARCH_C, 2, "manifest.json: its metadata no longer matches its cache_sha256"),
    ("search-manifest-exits-edited", _manifest_edit(lambda m: m["exits"].reverse()), SEARCH_C, 2, "manifest.json: its metadata no longer matches its cache_sha256"),
    ("search-manifest-n-images", _manifest_edit(lambda m: m.update(n_images=m["n_images"] + 1)), SEARCH_C, 2,
     "manifest.json: its metadata no longer matches its cache_sha256"),
    ("search-manifest-image-id", _manifest_edit(lambda m: m["image_ids"][0].__setitem__(0, "someone-else")), SEARCH_C,
     2, "manifest.json: its metadata no longer matches its cache_sha256"),
    ("search-manifest-policy", _manifest_edit(lambda m: m.update(n_bins=20)), SEARCH_C, 2, "manifest.json: its metadata no longer matches its cache_sha256"),
    ("search-manifest-shards-null", _manifest_edit(lambda m: m.update(shards=None)), SEARCH_C, 2,
     "the cache manifest's shards is null, not list"),
    ("search-manifest-shard-record-garbage", _manifest_edit(lambda m: m["shards"].__setitem__(0, 42)), SEARCH_C, 2,
     "the cache manifest's shard record 0 is 42, not {file, sha256, start, stop}"),
    ("search-manifest-n-images-text", _manifest_edit(lambda m: m.update(n_images="many")), SEARCH_C, 2,
     "the cache manifest's n_images is \"many\", not int"),
    ("search-manifest-complete-text", _manifest_edit(lambda m: m.update(complete="yes")), SEARCH_C, 2,
     "the cache manifest's complete is \"yes\", not bool"),
    ("search-manifest-not-a-dict", _copy_cache(lambda c: (c / "manifest.json").write_text("[1, 2]")), SEARCH_C, 2,
     "not a messearch cache manifest"),
]


def _class_list(name: str, data: bytes):
    """A folder data set whose class list is not UTF-8 (a Latin-1 file from a Windows tool)."""
    def setup(env, tmp):
        (tmp / "d").mkdir()
        (tmp / "d" / name).write_bytes(data)
        return {"d": f"folder:{tmp / 'd'}"}
    return setup


def _two_class_lists(env, tmp):
    """A folder data set with both a classes.yaml and a classes.txt (which one is meant?)."""
    (tmp / "d").mkdir()
    (tmp / "d" / "classes.yaml").write_text("classes: [road, car]\n")
    (tmp / "d" / "classes.txt").write_text("road\ncar\nsky\n")
    return {"d": f"folder:{tmp / 'd'}"}


def _checkpoint_edit(edit):
    """A copy of the checkpoint with its dict changed by edit(payload) (a hand-edited or foreign file)."""
    def setup(env, tmp):
        payload = torch.load(env["ckpt"], weights_only=True)
        edit(payload)
        torch.save(payload, tmp / "x.pt")
        return {}
    return setup


def _profile_without(key: str, value: str | None = None):
    """A real profile of the checkpoint, its metadata field `key` removed (or set to `value`)."""
    def setup(env, tmp):
        import pyarrow.parquet as pq

        from messearch.profile import profile_latency

        profile_latency(env["ckpt"], out=tmp / "cpu.parquet", min_run_time=0.01, progress=False)
        t = pq.read_table(tmp / "cpu.parquet")
        meta = {k: v for k, v in t.schema.metadata.items() if k != key.encode()}
        if value is not None:
            meta[key.encode()] = value.encode()
        pq.write_table(t.replace_schema_metadata(meta), tmp / "cpu.parquet")
        return {}
    return setup


TRAIN_D = ["train", "--space", "{space}", "--data", "{d}", "--out", "{tmp}/t", "--quiet"]
NOT_FINITE = "allowed a finite number"
ROWS += [
    # --- values that ended in a traceback
    ("data-classes-txt-latin1", _class_list("classes.txt", b"caf\xe9\nroad\n"), TRAIN_D, 2,
     "classes.txt: not UTF-8 text (byte 0xe9 at offset 3)"),
    ("data-classes-yaml-latin1", _class_list("classes.yaml", b"classes: [caf\xe9, road]\n"), TRAIN_D, 2,
     "classes.yaml: not UTF-8 text (byte 0xe9 at offset 13)"),
    ("data-classes-yaml-and-txt", _two_class_lists, TRAIN_D, 2, "holds classes.yaml and classes.txt; keep one class list"),
    ("cache-actors-zero", None, ["cache", "--checkpoint", "{ckpt}", "--out", "{tmp}/c", "--actors", "0"], 2,
     "--actors 0: allowed an integer >= 1"),
    ("cache-gpus-per-actor-negative", None,
     ["cache", "--checkpoint", "{ckpt}", "--out", "{tmp}/c", "--gpus-per-actor", "-1"], 2,
     "--gpus-per-actor -1: allowed a number >= 0"),
    ("info-input-size-zero", None, ["info", "quickstart", "--input-size", "0", "0", "--no-estimate"], 2,
     "--input-size 0 0: allowed two integers (height, width), each >= 32"),
    ("evaluate-threads-negative", None, ["evaluate", "--checkpoint", "{ckpt}", "--data", "{data}", "--threads", "-1"],
     2, "--threads -1: allowed an integer >= 1"),
    ("evaluate-warmup-negative", None, ["evaluate", "--checkpoint", "{ckpt}", "--data", "{data}", "--warmup", "-5"],
     2, "--warmup -5: allowed an integer >= 0"),
    ("evaluate-batch-size-zero", None, ["evaluate", "--checkpoint", "{ckpt}", "--data", "{data}", "--batch-size", "0"],
     2, "--batch-size 0: allowed an integer >= 1"),
    ("profile-threads-negative", None,
     ["profile", "--checkpoint", "{ckpt}", "--out", "{tmp}/p.parquet", "--threads", "-1", "--quiet"], 2,
     "--threads -1: allowed an integer >= 1"),
    ("checkpoint-without-space-text", _checkpoint_edit(lambda p: p.pop("space_text")),
     ["cache", "--checkpoint", "{tmp}/x.pt", "--out", "{tmp}/c", "--quiet"], 2,
     "x.pt: field 'space_text' is missing or not a str"),
    ("checkpoint-weights-of-another-network", _checkpoint_edit(lambda p: p["state_dict"].popitem()),
     ["profile", "--checkpoint", "{tmp}/x.pt", "--out", "{tmp}/p.parquet", "--quiet"], 2,
     "x.pt: its weights do not fit the network of its own space"),
    ("search-profile-without-positions", _profile_without("positions"),
     ["search", "--cache", "{cache}", "--out", "{tmp}/p.parquet", "--local", "--profile", "{tmp}/cpu.parquet"], 2,
     "cpu.parquet: metadata field 'positions' missing or malformed"),
    ("search-profile-at-batch-8", _profile_without("batch_size", "8"),
     ["search", "--cache", "{cache}", "--out", "{tmp}/p.parquet", "--local", "--profile", "{tmp}/cpu.parquet"], 2,
     "cpu.parquet: the profile's batch_size is 8, the cache's space needs 1"),
    ("search-profile-of-another-input-size", _profile_without("input_size", "[512, 512]"),
     ["search", "--cache", "{cache}", "--out", "{tmp}/p.parquet", "--local", "--profile", "{tmp}/cpu.parquet"], 2,
     "cpu.parquet: the profile's input_size is [512, 512], the cache's space needs ["),
    ("search-profile-of-another-model", _profile_without("model", "fcn_resnet50"),
     ["search", "--cache", "{cache}", "--out", "{tmp}/p.parquet", "--local", "--profile", "{tmp}/cpu.parquet"], 2,
     "cpu.parquet: the profile's model is fcn_resnet50, the cache's space needs "),
    # --- the mean policy's pixel limit, enforced as its class limit is
    ("space-mean-beyond-4-mpixel", space_with("input_size: [2048, 4096]"), ["info", "{s}", "--no-estimate"], 2,
     "field 'input_size': bad value [2048, 4096]; allowed: at most 4194304 pixels (4 Mpixel; here 8388608)"),
    # --- values accepted silently before
    ("cache-shard-size-zero", None,
     ["cache", "--checkpoint", "{ckpt}", "--out", "{tmp}/c", "--shard-size", "0", "--quiet"], 2,
     "--shard-size 0: allowed an integer >= 1"),
    ("cache-threads-without-local", None,
     ["cache", "--checkpoint", "{ckpt}", "--out", "{tmp}/c", "--threads", "2", "--quiet"], 2,
     "--threads 2: only with --local"),
    ("query-top-negative", None, ["query", "{front}", "--top", "-1"], 2, "--top -1: allowed an integer >= 1"),
    ("query-top-zero", None, ["query", "{front}", "--top", "0"], 2, "--top 0: allowed an integer >= 1"),
    ("search-shards-negative", None, ["search", "--cache", "{cache}", "--out", "{tmp}/p.parquet", "--shards", "-2"],
     2, "--shards -2: allowed an integer >= 1"),
    ("search-max-gmacs-nan", None,
     ["search", "--cache", "{cache}", "--out", "{tmp}/p.parquet", "--local", "--max-gmacs", "nan"], 2,
     "--max-gmacs nan: " + NOT_FINITE),
    ("query-latency-nan", None, ["query", "{front}", "--max-latency-ms", "cpu=nan"], 2,
     "--max-latency-ms cpu=nan: " + NOT_FINITE),
    ("query-min-miou-nan", None, ["query", "{front}", "--min-miou", "nan"], 2, "--min-miou nan: " + NOT_FINITE),
    ("query-latency-device-twice", None,
     ["query", "{front}", "--max-latency-ms", "cpu=100000", "--max-latency-ms", "cpu=1"], 2,
     "--max-latency-ms 'cpu=1': device 'cpu' given twice"),
]

ROWS += [
    # --- values that ended in a traceback, or were refused only after the stages before them had run
    ("search-seed-negative", None, ["search", "--cache", "{cache}", "--out", "{tmp}/p.parquet", "--local", "--seed", "-1"],
     2, "--seed -1: allowed an integer >= 0"),
    ("pipeline-holdout-above-one", None,
     ["pipeline", "--space", "{space}", "--data", "{data}", "--out", "{tmp}/run", "--holdout", "1.5"], 2,
     "--holdout 1.5: the share of images to hold out must lie strictly between 0 and 1"),
    ("profile-min-run-time-nan", None,
     ["profile", "--checkpoint", "{ckpt}", "--out", "{tmp}/p.parquet", "--min-run-time", "nan", "--quiet"], 2,
     "--min-run-time nan: allowed a finite number of seconds > 0"),
    ("profile-min-run-time-negative", None,
     ["profile", "--checkpoint", "{ckpt}", "--out", "{tmp}/p.parquet", "--min-run-time", "-1", "--quiet"], 2,
     "--min-run-time -1.0: allowed a finite number of seconds > 0"),
    ("export-onnx-unwritable", None,
     ["export", "--checkpoint", "{ckpt}", "--front", "{front}", "--config-id", "reference", "--onnx",
      "/proc/messearch-test/onnx"], 2, "--onnx /proc/messearch-test/onnx: cannot write in /proc"),
    ("info-images-beyond-memory", None, ["info", "{space}", "--images", "1000000000000"], 2,
     "--images 1000000000000: the search-time estimate would hold a synthetic cache of about"),
    # --- accepted silently before: one step trained, none validated, every exit's mIoU recorded as 0
    ("train-max-steps-zero", None,
     ["train", "--space", "{space}", "--data", "{data}", "--out", "{tmp}/t", "--max-steps", "0", "--quiet"], 2,
     "--max-steps 0: allowed an integer >= 1"),
]


@pytest.mark.parametrize("argv,victim,fragment", [
    (["export", "--checkpoint", "{ckpt}", "--front", "{front}", "--config-id", "reference", "--out", "{front}"],
     "front", "is the --front file this command reads"),
    (["export", "--checkpoint", "{ckpt}", "--front", "{front}", "--config-id", "reference", "--out", "{ckpt}"],
     "ckpt", "is the --checkpoint file this command reads"),
    (["plot", "{front}", "--out", "{front}"], "front", "is the front file this command reads"),
    (["profile", "--checkpoint", "{ckpt}", "--out", "{ckpt}", "--quiet"], "ckpt",
     "is the --checkpoint file this command reads"),
    (["search", "--cache", "{cache}", "--out", "{cache}/manifest.json", "--local"], "manifest",
     "is a file of the --cache folder this command reads"),
], ids=["export-over-front", "export-over-checkpoint", "plot-over-front", "profile-over-checkpoint",
        "search-over-cache-manifest"])
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(env, tmp_path, capsys, argv, victim, fragment):
    """An --out naming the file (or a file in the folder) the command reads would overwrite its own input."""
    values = {"ckpt": shutil.copy(env["ckpt"], tmp_path / "mess.pt"),
              "front": shutil.copy(env["front"], tmp_path / "pareto.parquet"),
              "cache": shutil.copytree(env["cache"], tmp_path / "cache")}
    values["manifest"] = str(Path(values["cache"]) / "manifest.json")
    before = Path(values[victim]).read_bytes()
    capsys.readouterr()
    rc = main([a.format(**values) for a in argv])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: --out ") and fragment in lines[0], err
    assert Path(values[victim]).read_bytes() == before


@pytest.mark.parametrize("name,setup,argv,code,fragment", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(env, tmp_path, capsys, name, setup, argv, code, fragment):
    values = dict(env, tmp=str(tmp_path))
    if setup is not None:
        values.update(setup(env, tmp_path))
    capsys.readouterr()
    rc = main([a.format(**values) for a in argv])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], err
    assert "Traceback" not in err and "\x1b[" not in err, err
    assert not (tmp_path / "pwned").exists()
    if "(remote stack in " in lines[0]:
        Path(lines[0].split("(remote stack in ")[1].rstrip(")")).unlink()


def test_case_1_a_space_on_a_coarser_grid_reads_the_cached_threshold_and_says_so(env, tmp_path, capsys):
    """Issue 13 case 1: a --space whose policy has other bins than the cache. Not an exact conversion (4 bins against
    the cache's 10): refused (a table row). An exact one (2 bins: 0.5 is bin 1 of 2 and bin 5 of 10): the front
    equals the cache's own, records the policy it read and the conversion, and its export measures what it says."""
    import json

    import pandas as pd

    from messearch.evaluate import evaluate
    from messearch.export import export_model
    from messearch.front import read_front

    space = tmp_path / "coarse.yaml"
    space.write_text(SPACE.replace("n_bins: 10", "n_bins: 2"))
    out = tmp_path / "pareto.parquet"
    assert main(["search", "--cache", env["cache"], "--space", str(space), "--out", str(out), "--local"]) == 0
    df, meta = read_front(out)
    pd.testing.assert_frame_equal(df, read_front(env["front"])[0])
    assert json.loads(meta["policy"]) == {"kind": "fraction", "pixel_threshold": 0.5, "n_bins": 10,
                                          "pixel_threshold_bin": 5}
    assert "policy.n_bins 2" in meta["policy_conversion"] and "bin 5 of 10" in meta["policy_conversion"]
    assert json.loads(meta["exits"])[-1] == ["<final>", "final"] and json.loads(meta["threshold_grid"]) == [0.3, 0.6, 0.9]
    row = df[df["n_exits"] == df["n_exits"].max()].iloc[0]
    model = export_model(env["ckpt"], out, row["config_id"], tmp_path / "m.pt")
    got = evaluate(str(model), env["data"], "val", warmup=0, progress=False, threads=1)
    assert row["n_exits"] >= 1
    assert (got.miou, got.mean_gmacs, list(got.exit_rates)) == (row["miou"], row["mean_gmacs"],
                                                                list(row["exit_rates"]))


@pytest.mark.parametrize("edit", ["positions", "heads"])
def test_case_2_a_manifest_with_reversed_lists_is_refused_and_resume_repairs_it(env, tmp_path, capsys, edit):
    """Issue 13 case 2: positions or heads reversed by hand would attach each exit's label to another exit's
    statistics; the cache's hash covers them, so the search refuses, and `cache --resume` rewrites the manifest."""
    import json

    cache = Path(shutil.copytree(env["cache"], tmp_path / "cache"))
    m = json.loads((cache / "manifest.json").read_text())
    m[edit].reverse()
    (cache / "manifest.json").write_text(json.dumps(m))
    argv = ["search", "--cache", str(cache), "--out", str(tmp_path / "p.parquet"), "--local"]
    assert main(argv) == 2
    assert "its metadata no longer matches its cache_sha256" in capsys.readouterr().err
    if edit == "heads":   # the repair the message names: shards verified and kept, the manifest rewritten
        assert main(["cache", "--checkpoint", env["ckpt"], "--out", str(cache), "--shard-size", "2", "--resume",
                     "--quiet"]) == 0
        assert "(0 computed now" in capsys.readouterr().out
        assert main(argv) == 0


def test_remote_error_keeps_its_stack_in_the_log_it_names_or_with_debug(env, tmp_path, capsys):
    """An error raised inside a cache actor: one line naming a log file that holds the remote stack; --debug prints it."""
    data = bad_camvid(lambda r: _truncate(r / "val" / "val0.jpg"))(env, tmp_path)["bad"]
    argv = ["cache", "--checkpoint", env["ckpt"], "--data", data, "--out", str(tmp_path / "c"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    log = Path(err.split("(remote stack in ")[1].rstrip(")"))
    text = log.read_text()
    assert 'messearch/data_formats.py", line' in text and "val0.jpg: cannot read image" in text
    log.unlink()
    assert main(["--debug"] + argv[:-2] + [str(tmp_path / "c2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ") and "remote stack in" not in err


def test_lifted_class_limit_and_default_max_exits_are_accepted(tmp_path, capsys):
    space = tmp_path / "s.yaml"
    space.write_text(BASE.replace("num_classes: 4", "num_classes: 300") + "ignore_index: 1000\n"
                     "policy: {kind: mean, allow_inexact_mean: true}\n")
    assert main(["info", str(space), "--json"]) == 0
    # beyond 4 Mpixel too: the pixel limit is lifted by the same flag
    space.write_text(BASE.replace("input_size: [64, 64]", "input_size: [2048, 4096]")
                     + "policy: {kind: mean, allow_inexact_mean: true}\n")
    from messearch.space import load_space

    assert load_space(space).input_size == (2048, 4096)
    space.write_text(BASE.replace("input_size: [64, 64]", "input_size: [2048, 4096]")
                     + "policy: {kind: fraction, pixel_threshold: 0.5}\n")   # counts are exact at any size
    assert load_space(space).policy.kind == "fraction"
    # no max_exits: the default (3) is capped at the two positions, not refused
    space.write_text(BASE + "positions: [backbone.layer1.0, backbone.layer2.0]\n")
    assert load_space(space).max_exits == 2


# ------------------------------------------------------------------------------------------ interrupts
# A real `messearch` process, signalled at a chosen moment. Its processes (and those of the local Ray it starts)
# inherit a tag in their environment, so the test finds exactly them and no other session's Ray.

def _tagged(tag: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"MESSEARCH_TEST_TAG={tag}".encode() in f.read().split(b"\0"):
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        cmd = c.read().replace(b"\0", b" ").decode(errors="replace")
                    found.append(f"{pid} {cmd[:100]}")
        except OSError:
            continue
    return found


def _interrupt(argv, when, sig, group=False, timeout=240):
    """Run messearch with argv; when when() is true send sig (to its process group: a terminal's Ctrl+C); return
    (exit status, stderr, processes of its own still alive 15 s after it exited)."""
    tag = uuid.uuid4().hex
    env = dict(os.environ, MESSEARCH_TEST_TAG=tag, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("RAY_ADDRESS", None)
    # SIGINT's default disposition in the child, as a terminal gives it: a suite run in the background of a
    # non-interactive shell inherits SIGINT ignored, and the Ctrl+C tests would then test nothing.
    p = subprocess.Popen([sys.executable, "-m", "messearch.cli", *argv], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + timeout
        while p.poll() is None and not when(tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.poll() is None, f"finished before the signal: {p.communicate()[1][-2000:]}"
        os.killpg(p.pid, sig) if group else p.send_signal(sig)
        _, err = p.communicate(timeout=timeout)
        # Ray's agents notice their raylet is gone within a few seconds; give them 15 s, then list who is left.
        deadline = time.monotonic() + 15
        while _tagged(tag) and time.monotonic() < deadline:
            time.sleep(0.5)
        return p.returncode, err, _tagged(tag)
    finally:
        if p.poll() is None:
            p.kill()
        for line in _tagged(tag):   # never leave anything behind, even when the test fails
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except OSError:
                pass


def _last_line(err: str) -> str:
    assert "Traceback" not in err, err
    return [x for x in err.splitlines() if x.strip()][-1]


def _no_partial_files(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if ".tmp-" in p.name], sorted(folder.rglob("*"))


def test_ctrl_c_during_ray_start_up_leaves_no_ray_process(env, tmp_path):
    out = tmp_path / "c"
    rc, err, left = _interrupt(["cache", "--checkpoint", env["ckpt"], "--out", str(out), "--quiet"],
                               lambda tag: any("raylet" in x for x in _tagged(tag)), signal.SIGINT)
    assert rc == 130, err
    assert _last_line(err).startswith("interrupted (Ctrl+C): ") and "rerun the same command" in err, err
    assert left == [], left
    if out.exists():
        _no_partial_files(out)


def _recorded_shards(out: Path) -> int:
    import json

    try:
        return sum(x is not None for x in json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def test_sigterm_mid_cache_keeps_whole_shards_and_says_how_to_resume(env, tmp_path):
    out = tmp_path / "c"
    rc, err, left = _interrupt(["cache", "--checkpoint", env["ckpt"], "--data", "synthetic:seed=0,val=300",
                                "--shard-size", "1", "--actors", "1", "--out", str(out), "--quiet"],
                               lambda tag: _recorded_shards(out) > 0, signal.SIGTERM)
    assert rc == 143, err
    line = _last_line(err)
    assert line.startswith("interrupted (SIGTERM): ") and f"of 300 shards kept in {out}" in line, line
    assert "--resume" in line and left == [], (line, left)
    _no_partial_files(out)
    from messearch.cache_format import read_manifest, shard_ok

    manifest = read_manifest(out)
    kept = [s for s in manifest.shards if s is not None]
    assert not manifest.complete and kept and all(shard_ok(out, s) for s in kept)


def test_ctrl_c_mid_tune_then_resume_gives_the_same_front(env, tmp_path, capsys):
    import pandas as pd

    from messearch.front import read_front

    out = tmp_path / "pareto.parquet"
    # 8 trials on 2 CPUs: when the first trial's folder appears, most trials are still to run (each loads the
    # compiled kernels, which a space this small would skip); the reference front was searched plain
    argv = ["search", "--cache", env["cache"], "--out", str(out), "--shards", "8", "--evaluator", "kernel"]
    rc, err, left = _interrupt(argv, lambda tag: any((tmp_path / "tune" / "messearch_search").glob("_shard_trial_*")),
                               signal.SIGINT, group=True)
    assert rc == 130, err
    line = _last_line(err)
    assert line.startswith("interrupted (Ctrl+C): no front written") and "with --resume" in line, line
    assert left == [] and not out.exists(), left
    _no_partial_files(tmp_path)
    assert main(argv + ["--resume"]) == 0
    pd.testing.assert_frame_equal(read_front(out)[0], read_front(env["front"])[0])


def test_a_tune_trial_that_raises_once_is_retried_and_the_front_is_identical(env, tmp_path, monkeypatch):
    """Fault injection on the Tune side: shard 0's first attempt raises inside its Ray worker; Tune retries it
    (FailureConfig) and the front equals the in-process search's, row for row."""
    from ray import cloudpickle
    import pandas as pd

    import messearch.search_driver as driver
    from messearch.front import read_front

    marker = tmp_path / "fail-once"
    marker.write_text("")

    def flaky(config, **kwargs):   # pickled by value into the trial's worker
        from messearch.search_driver import _shard_trial

        if config["shard"]["index"] == 0 and os.path.exists(str(marker)):
            os.remove(str(marker))
            raise RuntimeError("injected fault: shard 0, first attempt")
        return _shard_trial(config, **kwargs)

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(driver, "_shard_trial", flaky)
    out = tmp_path / "pareto.parquet"
    try:
        assert main(["search", "--cache", env["cache"], "--out", str(out), "--shards", "2", "--evaluator", "kernel"]) == 0
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert not marker.exists()   # the fault did fire
    pd.testing.assert_frame_equal(read_front(out)[0], read_front(env["front"])[0])
