"""`folder:PATH` (your own images and masks) and `messearch check-data`, on small folders made on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from messearch.cli import main
from messearch.data import build_dataset, check_dataset
from messearch.errors import DataError

H, W = 12, 16
COLOURS = {"sky": (128, 128, 128), "road": (128, 64, 128), "car": (64, 0, 128)}
VOID = (0, 0, 0)
CAMVID = next((p / "shared" / "data" / "camvid" for p in Path(__file__).resolve().parents
               if (p / "shared" / "data" / "camvid").is_dir()), Path("/nonexistent"))


def _indices(seed: int) -> np.ndarray:
    """A class-index map with every class and some void (255)."""
    m = np.random.default_rng(seed).integers(0, 3, size=(H, W)).astype(np.uint8)
    m[0, :4] = 255
    return m


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder(root: Path, colour: bool, counts=(("train", 4), ("val", 2))) -> dict[str, dict[str, np.ndarray]]:
    """Random images and masks; returns the expected class-index maps (255 = void) per split and image id."""
    palette = np.array(list(COLOURS.values()) + [VOID], dtype=np.uint8)
    expected = {}
    for split, n in counts:
        expected[split] = {}
        for i in range(n):
            name = f"city{i % 2}/img{i}" if split == "train" else f"img{i}"  # subfolders pair up too
            idx = _indices(100 * len(split) + i)
            _save(root / split / "images" / f"{name}.jpg",
                  np.random.default_rng(i).integers(0, 256, (H, W, 3), dtype=np.uint8))
            mask = palette[np.where(idx == 255, 3, idx)] if colour else idx
            _save(root / split / "masks" / f"{name}.png", mask)
            expected[split][name] = idx
    if colour:
        lines = "\n".join(f"  {n}: [{r}, {g}, {b}]" for n, (r, g, b) in COLOURS.items())
        (root / "classes.yaml").write_text(f"classes:\n{lines}\nvoid: [0, 0, 0]\n")
    else:
        (root / "classes.yaml").write_text("classes: [sky, road, car]\nvoid: 255\n")
    return expected


def _native(spec, split, **kw):
    return build_dataset(spec, split, (H, W), **kw)


@pytest.mark.parametrize("colour", [False, True], ids=["index", "colour"])
def test_folder_loads_masks_exactly(tmp_path, colour):
    expected = make_folder(tmp_path, colour)
    spec = f"folder:{tmp_path}"
    for split in ("train", "val"):
        ds = _native(spec, split, num_classes=3)
        assert len(ds) == len(expected[split]) and ds.class_names == ["sky", "road", "car"]
        assert sorted(ds.image_ids) == sorted(expected[split])
        for i, name in enumerate(ds.image_ids):
            assert np.array_equal(ds[i][1].numpy(), expected[split][name].astype(np.int64))
    # void follows the space's ignore index
    y = _native(spec, "val", ignore_index=99)[0][1]
    assert int((y == 99).sum()) == 4 and not (y == 255).any()
    assert check_dataset(spec, "train", 3) == {"format": "folder", "split": "train", "images": 4, "num_classes": 3}
    with pytest.raises(DataError, match=r"classes.yaml has 3 classes"):
        _native(spec, "val", num_classes=5)
    with pytest.raises(DataError, match="test/images: folder not found"):
        _native(spec, "test")


def test_classes_txt_and_palette_masks_read_as_colours(tmp_path):
    expected = make_folder(tmp_path, colour=True, counts=(("val", 2),))
    (tmp_path / "classes.yaml").unlink()
    (tmp_path / "classes.txt").write_text("# name R G B\nsky 128 128 128\nroad 128 64 128\ncar 64 0 128\n"
                                          "void 0 0 0\n")
    # the same mask as a palette PNG: its palette gives the colours
    rgb = Image.open(tmp_path / "val" / "masks" / "img1.png")
    rgb.quantize(colors=4, method=Image.Quantize.MEDIANCUT).save(tmp_path / "val" / "masks" / "img1.png")
    assert Image.open(tmp_path / "val" / "masks" / "img1.png").mode == "P"
    ds = _native(f"folder:{tmp_path}", "val")
    assert ds.class_names == ["sky", "road", "car"]
    for i, name in enumerate(ds.image_ids):
        assert np.array_equal(ds[i][1].numpy(), expected["val"][name].astype(np.int64))
    # index classes.txt: line i is value i, and a `void` line marks its value as void
    (tmp_path / "classes.txt").write_text("sky\nvoid\nroad\n")
    _save(tmp_path / "val" / "masks" / "img0.png", np.array([[0, 1, 2, 2]] * H, dtype=np.uint8).repeat(4, axis=1))
    classes = _native(f"folder:{tmp_path}", "val").classes
    assert classes.names == ("sky", "road") and classes.values == (0, 2) and classes.void == (1,)


def _break(root: Path, problem: str) -> str:
    """Spoil a good colour folder one way; return what the error must say."""
    masks = root / "train" / "masks"
    if problem == "unknown colour":
        m = np.array(Image.open(masks / "city1" / "img1.png"))
        m[5, 3:9] = (1, 2, 3)
        _save(masks / "city1" / "img1.png", m)
        return r"city1/img1.png: unknown colour \(1, 2, 3\) in 6 pixels"
    if problem == "missing mask":
        (masks / "city0" / "img2.png").unlink()
        return r"1 image\(s\) without a mask of the same name: .*city0/img2.jpg"
    if problem == "size mismatch":
        _save(masks / "img9.png", np.zeros((H, W + 1, 3), np.uint8))
        _save(root / "train" / "images" / "img9.png", np.zeros((H, W, 3), np.uint8))
        return r"img9.png: mask is 17x12 but its image .*img9.png is 16x12"
    if problem == "lossy mask":
        _save(masks / "img9.jpg", np.zeros((H, W, 3), np.uint8))
        return r"img9.jpg: not a mask file.*save masks as PNG"
    if problem == "index mask, colour classes":
        _save(masks / "city0" / "img0.png", np.zeros((H, W), np.uint8))
        return r"img0.png: single-channel mask \(mode L\), but .*classes.yaml gives colours"
    if problem == "bad classes file":
        (root / "classes.yaml").write_text("classes: {sky: [1, 2]}\n")
        return r"classes.yaml: classes.sky = \[1, 2\]; expected a colour \[R, G, B\]"
    if problem == "no classes file":
        (root / "classes.yaml").unlink()
        return "no classes.yaml or classes.txt"
    raise AssertionError(problem)


@pytest.mark.parametrize("problem", ["unknown colour", "missing mask", "size mismatch", "lossy mask",
                                     "index mask, colour classes", "bad classes file", "no classes file"])
def test_bad_colour_folder_is_named_before_any_work(tmp_path, problem):
    make_folder(tmp_path, colour=True)
    if problem == "unknown colour":  # a mask verified once and changed since is decoded again
        check_dataset(f"folder:{tmp_path}", "train", 3)
    pattern = _break(tmp_path, problem)
    with pytest.raises(DataError, match=pattern):
        check_dataset(f"folder:{tmp_path}", "train", 3)  # what train and pipeline run before any work


def test_index_above_the_class_count_and_rgb_mask_for_index_classes(tmp_path):
    make_folder(tmp_path, colour=False)
    m = _indices(7)
    m[2:3, :5] = 7
    _save(tmp_path / "val" / "masks" / "img1.png", m)
    with pytest.raises(DataError, match=r"img1.png: mask values that are no class \(index above the class count\): "
                                        r"7 \(5 pixels\); .*3 classes: 0..2; void 255"):
        check_dataset(f"folder:{tmp_path}", "val")
    _save(tmp_path / "val" / "masks" / "img1.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DataError, match="img1.png: RGB mask, but .* gives no colours"):
        check_dataset(f"folder:{tmp_path}", "val")


def test_check_data_summary_and_problems(tmp_path, capsys):
    expected = make_folder(tmp_path / "good", colour=True, counts=(("train", 4), ("val", 2), ("test", 1)))
    assert main(["check-data", f"folder:{tmp_path / 'good'}", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "3 classes" in out and "images: train 4, val 2, test 1" in out and "problems: none" in out
    for split in ("train", "val", "test"):  # every share equals the one counted from the masks we wrote
        idx = np.concatenate([m.ravel() for m in expected[split].values()])
        labelled = idx[idx != 255]
        shares = [f"{100 * np.mean(labelled == c):.2f}" for c in range(3)]
        col = ["train", "val", "test"].index(split)
        rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.startswith("  ")}
        assert [rows[n][col] for n in COLOURS] == shares
        assert rows["void"][2 + col] == f"{100 * np.mean(idx == 255):.2f}"
    make_folder(tmp_path / "bad", colour=True)
    _break(tmp_path / "bad", "unknown colour")
    _break(tmp_path / "bad", "size mismatch")
    assert main(["check-data", f"folder:{tmp_path / 'bad'}", "--quiet"]) == 2
    out = capsys.readouterr().out
    assert "problems: 2" in out and "unknown colour (1, 2, 3) in 6 pixels" in out and "mask is 17x12" in out
    assert "images: train 5, val 2" in out
    assert main(["check-data", "synthetic:seed=1,train=4,val=2", "--quiet"]) == 0
    assert "images: train 4, val 2" in capsys.readouterr().out
    assert main(["check-data", f"folder:{tmp_path / 'nowhere'}", "--quiet"]) == 2
    assert "folder data root not found" in capsys.readouterr().out


def test_train_runs_on_a_folder(tmp_path):
    from messearch.space import space_from_text
    from messearch.train import train
    import torch

    make_folder(tmp_path / "data", colour=True, counts=(("train", 4), ("val", 2)))
    space = space_from_text(
        "name: f\nmodel: fcn_resnet18\nnum_classes: 3\ninput_size: [32, 32]\npositions: [backbone.layer2.1]\n"
        "heads: [{name: lin, reduction: 4, layers: 0}]\nthresholds: [0.5]\n"
        "train: {batch_size: 2, epochs_stage1: 1, epochs_stage2: 1}\n", "f.yaml")
    path = train(space, f"folder:{tmp_path / 'data'}", tmp_path / "out", stage="1", progress=False, max_steps=1)
    assert 0.0 <= torch.load(path, weights_only=True)["exit_miou"]["final"] <= 1.0


@pytest.mark.skipif(not (CAMVID / "val.txt").exists(), reason="needs the shared CamVid copy")
def test_camvid_as_a_folder_gives_the_same_items(tmp_path):
    """The real CamVid copy, four val images linked into a folder with a classes.txt: the same tensors as camvid:."""
    theirs = build_dataset(f"camvid:{CAMVID}", "val", (90, 120), num_classes=11)
    for i in range(4):
        for src, sub in ((theirs.images[i], "images"), (theirs.labels[i], "masks")):
            dst = tmp_path / "val" / sub / (Path(theirs.images[i]).stem + src.suffix)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
    (tmp_path / "classes.txt").write_text("\n".join(list(theirs.class_names) + ["void"]) + "\n")
    ours = build_dataset(f"folder:{tmp_path}", "val", (90, 120), num_classes=11)
    assert len(ours) == 4 and ours.class_names == list(theirs.class_names)
    for i in range(4):
        j = ours.image_ids.index(Path(theirs.images[i]).stem)
        assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(ours[j], theirs[i]))
