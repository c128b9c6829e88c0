"""Data sets: synthetic scenes (grammar, determinism, difficulty) and tiny fabricated copies of every
on-disk format (sizes, class mapping, ignore handling, determinism, errors)."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from messearch.data import build_dataset, check_dataset, parse_spec
from messearch.data_synthetic import LEVELS, SceneDesign, _erode, class_colours, render_scene
from messearch.errors import DataError

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
H, W = 20, 30  # native size of the fabricated images


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def _save(path: Path, array: np.ndarray, palette: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    if palette:
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        im.putdata(array.flatten().tolist())
    im.save(path)
    return path


def _label(values: list[int]) -> np.ndarray:
    """Vertical bands, one per value, so every value is present at any reasonable resize."""
    lab = np.zeros((H, W), dtype=np.uint8)
    for k, v in enumerate(values):
        lab[:, k * W // len(values):(k + 1) * W // len(values)] = v
    return lab


def _truncate(path: Path, keep: float = 0.7) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --- synthetic -------------------------------------------------------------------------------------

def test_parse_spec_grammar():
    kind, s = parse_spec("synthetic")
    assert kind == "synthetic" and (s.seed, s.train, s.val, s.test) == (0, 512, 128, 128) and s.classes is None
    _, s = parse_spec("synthetic:3:40")
    assert (s.seed, s.train, s.val) == (3, 40, 40)
    _, s = parse_spec("synthetic:3:40:2/1/1")
    assert s.mix == (0.5, 0.25, 0.25)
    _, s = parse_spec("synthetic:seed=7,train=30,val=10,mix=hard,classes=5")
    assert (s.seed, s.train, s.val, s.mix, s.classes) == (7, 30, 10, (0.0, 0.0, 1.0), 5)
    assert parse_spec("camvid:~/x") == ("camvid", Path("~/x").expanduser())


@pytest.mark.parametrize("spec, named", [
    ("synthetic:abc", "seed='abc'"), ("synthetic:1:0", "n=0"), ("synthetic:1:5:1/2", "mix='1/2'"),
    ("synthetic:1:5:-1/1/1", "mix="), ("synthetic:size=3", "unknown key 'size'"),
    ("synthetic:seed=1:5", "positional field '5'"), ("synthetic:classes=1", "classes=1"),
    ("synthetic:1:2:easy:9", "positional field '9'"), ("synthetic:", "empty field"),
    ("synthetic:seed=1,seed=2", "seed given twice"), ("imagenet:/x", "unknown format 'imagenet'"),
    ("camvid", "camvid:PATH"), ("voc:", "voc:PATH"), ("", "empty"),
])
def test_parse_spec_errors_name_the_bad_part(spec, named):
    with pytest.raises(DataError, match=None) as e:
        build_dataset(spec, "val", (16, 16))
    assert named in str(e.value)


def test_synthetic_counts_above_a_million_are_refused_when_parsed():
    # parse_spec only: a data set of 10**11 images would list their ids first and fill the machine's memory
    for spec, named in [("synthetic:0:100000000000", "n=100000000000 must be in 1..1000000"),
                        ("synthetic:val=1000001", "val=1000001 must be in 1..1000000")]:
        with pytest.raises(DataError) as e:
            parse_spec(spec)
        assert named in str(e.value)
    assert parse_spec("synthetic:train=1000000")[1].train == 1_000_000


def test_synthetic_items_classes_and_difficulty():
    ds = build_dataset("synthetic:seed=1,train=30,val=30", "val", (24, 40))
    assert len(ds) == 30 and len(set(ds.image_ids)) == 30 and ds.num_classes == 8
    assert ds.class_names[0] == "background" and len(ds.class_names) == 8
    x, y = ds[0]
    assert x.shape == (3, 24, 40) and x.dtype == torch.float32
    assert y.shape == (24, 40) and y.dtype == torch.int64
    seen = set()
    for i in range(len(ds)):
        seen |= set(ds[i][1].unique().tolist())
    assert seen <= set(range(8)) and len(seen) >= 6
    # One level per image, a near-exact third of each, hardness inside its level's third.
    counts = {lv: ds.difficulty.count(lv) for lv in ("easy", "medium", "hard")}
    assert all(9 <= c <= 11 for c in counts.values()), counts
    for lv, h in zip(ds.level, ds.hardness):
        assert lv / 3 <= h <= (lv + 1) / 3
    # The space's num_classes sets the class count (a conflicting `classes=` is an error, below).
    ds5 = build_dataset("synthetic:1:6", "train", (16, 16), num_classes=5)
    assert ds5.num_classes == 5 and max(int(ds5[i][1].max()) for i in range(6)) <= 4
    assert build_dataset("synthetic:1:12:hard", "val", (16, 16)).difficulty == ["hard"] * 12


@pytest.mark.parametrize("spec, split, size, classes, message", [
    ("synthetic:classes=4", "train", (16, 16), 5, "classes=4 but the space has num_classes=5"),
    ("synthetic", "val", (0, 16), None, r"input_size=\(0, 16\) must be two positive integers"),
    ("synthetic", "dev", (16, 16), None, "split 'dev' is not available for synthetic"),
])
def test_synthetic_bad_arguments_are_named(spec, split, size, classes, message):
    with pytest.raises(DataError, match=message):
        build_dataset(spec, split, size, num_classes=classes)


def test_synthetic_deterministic_independent_of_n_and_splits_differ():
    a = build_dataset("synthetic:4:10", "val", (32, 32))
    b = build_dataset("synthetic:4:20", "val", (32, 32))
    for i in (0, 7):
        assert torch.equal(a[i][0], a[i][0]) and torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert torch.equal(pickle.loads(pickle.dumps(a))[7][0], a[7][0])
    train = build_dataset("synthetic:4:10", "train", (32, 32))
    other = build_dataset("synthetic:5:10", "val", (32, 32))
    assert not torch.equal(a[0][0], train[0][0]) and not torch.equal(a[0][0], other[0][0])
    assert set(a.image_ids).isdisjoint(train.image_ids)


def _digest(spec: str) -> str:
    ds = build_dataset(spec, "val", (32, 32))
    h = hashlib.sha256()
    for i in range(len(ds)):
        x, y = ds[i]
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    return h.hexdigest()


def test_synthetic_identical_in_a_subprocess():
    code = ("import sys; sys.path.insert(0, %r); from test_data import _digest; print(_digest('synthetic:11:6'))"
            % str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest("synthetic:11:6")


def test_train_transform_random_scale_crop_flip_and_seeded_loader():
    ds = build_dataset("synthetic:2:8", "train", (32, 32), train=True)
    torch.manual_seed(0)
    first = [ds[i] for i in range(8)]
    torch.manual_seed(0)
    again = [ds[i] for i in range(8)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert all(x.shape == (3, 32, 32) and y.shape == (32, 32) for x, y in first)
    # Small scales pad with ignore; the eval view never has ignore pixels.
    torch.manual_seed(1)
    padded = sum(int((ds[0][1] == 255).any()) for _ in range(30))
    assert 0 < padded < 30
    assert not (build_dataset("synthetic:2:8", "train", (32, 32))[0][1] == 255).any()

    def batches(seed):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=2,
                                             generator=torch.Generator().manual_seed(seed))
        return [b for b in loader]

    b1, b2 = batches(3), batches(3)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(b1, b2))


def _scene_measures(level: str, n: int = 24, size=(48, 48), k: int = 8) -> dict[str, float]:
    """What makes a scene hard, measured on the generator's own output (render_scene), no model involved."""
    mix = {"easy": (1, 0, 0), "medium": (0, 1, 0), "hard": (0, 0, 1)}[level]
    cols = class_colours(k).astype(np.float64)[1:]
    hues = cols / np.linalg.norm(cols, axis=1, keepdims=True)
    colour_says_class, background_std, classes = [], [], []
    for i in range(n):
        img, mask, lv, h = render_scene(7, "val", i, size, k, mix)
        assert LEVELS[lv] == level and lv / 3 <= h <= (lv + 1) / 3
        x, m = img.reshape(-1, 3).astype(np.float64) / 255.0, mask.reshape(-1)
        obj = m > 0
        d = x[obj] / np.maximum(np.linalg.norm(x[obj], axis=1, keepdims=True), 1e-9)
        colour_says_class.append(np.mean(1 + np.argmax(d @ hues.T, axis=1) == m[obj]))  # nearest class hue
        background_std.append(x[~obj].std(axis=0).mean())
        classes.append(len(set(m[obj].tolist())))
    return {"colour": float(np.mean(colour_says_class)), "background_std": float(np.mean(background_std)),
            "classes": float(np.mean(classes))}


def test_difficulty_is_what_the_generator_draws():
    """Easy scenes: every object in its class hue on a plain, nearly noiseless background, few classes. Hard
    scenes: camouflage and recoloured objects make a pixel's own colour mislead for about half of the object
    pixels (only the whole object's colour names the class), a noisy background, more classes."""
    easy, medium, hard = (_scene_measures(lv) for lv in LEVELS)
    assert easy["colour"] > 0.95 and hard["colour"] < 0.6 and hard["colour"] < medium["colour"] < easy["colour"]
    assert easy["background_std"] < 0.03 < 0.1 < hard["background_std"]
    assert easy["classes"] < medium["classes"] < hard["classes"]


def test_a_scene_design_changes_only_what_it_names():
    """A colour cast over medium and hard scenes (its ramp starts at h = 1/3) leaves easy scenes' bytes and every
    mask as they were, and changes the pixels of the scenes it casts."""
    cast = SceneDesign(cast_sigma=0.3, cast_ramp=(1 / 3, 1 / 2))
    for level, mix in (("easy", (1, 0, 0)), ("medium", (0, 1, 0)), ("hard", (0, 0, 1))):
        for i in range(4):
            img, mask, _, h = render_scene(5, "train", i, (40, 40), 5, mix)
            img2, mask2, _, h2 = render_scene(5, "train", i, (40, 40), 5, mix, design=cast)
            assert h == h2 and np.array_equal(mask, mask2)
            if level == "easy":
                assert np.array_equal(img, img2)
            else:
                assert not np.array_equal(img, img2)
    from messearch import data_synthetic

    assert data_synthetic.DESIGN == SceneDesign()   # rendering reads the module's DESIGN, the dataclass's defaults


def test_a_rim_design_keeps_the_class_hue_on_the_rim_only():
    """With rim_from = 1/3, a medium scene's objects keep their class hue within the rim width of their edge and
    lose it deeper inside (nearest class hue of a pixel); easy scenes render byte for byte as before."""
    k, rim = 5, SceneDesign(rim_from=1 / 3)
    cols = class_colours(k).astype(np.float64)[1:]
    hues = cols / np.linalg.norm(cols, axis=1, keepdims=True)
    hits = {True: [], False: []}   # deep inside: pixel in its class hue?
    for i in range(8):
        img, mask, _, _ = render_scene(5, "val", i, (80, 80), k, (0, 1, 0), design=rim)
        x = img.astype(np.float64) / 255.0
        for c in range(1, k):
            deep = _erode(mask == c, 5)
            for inside, where in ((True, deep), (False, (mask == c) & ~deep)):
                d = x[where] / np.maximum(np.linalg.norm(x[where], axis=1, keepdims=True), 1e-9)
                hits[inside].extend((1 + np.argmax(d @ hues.T, axis=1) == c).tolist())
        easy = render_scene(5, "val", i, (80, 80), k, (1, 0, 0))
        assert np.array_equal(easy[0], render_scene(5, "val", i, (80, 80), k, (1, 0, 0), design=rim)[0])
    assert len(hits[True]) > 500 and np.mean(hits[True]) < 0.5 < 0.9 < np.mean(hits[False])


def test_a_context_design_names_anonymous_objects_in_the_frame_only():
    """With a frame and anon_p = 1, every object of a hard scene is of the class whose hue the frame shows, in neutral
    looks of its own; the frame is background; easy scenes get a dark frame and no anonymous object."""
    k, ctx = 5, SceneDesign(frame_width=0.05, anon_p=1.0)
    cols = class_colours(k).astype(np.float64)
    frame = np.ones((80, 80), dtype=bool)
    frame[4:-4, 4:-4] = False
    for i in range(6):
        img, mask, _, _ = render_scene(5, "val", i, (80, 80), k, (0, 0, 1), design=ctx)
        assert (mask[frame] == 0).all()
        shown = 1 + np.argmin(((cols[1:] - img[frame].mean(axis=0) / 255.0) ** 2).sum(axis=1))
        assert set(np.unique(mask)) == {0, shown}
        easy, easy_mask, _, _ = render_scene(5, "val", i, (80, 80), k, (1, 0, 0), design=ctx)
        assert easy[frame].max() < 0.25 * 255 and (easy_mask[frame] == 0).all()
        assert len(np.unique(easy_mask)) > 1 and np.array_equal(easy_mask[~frame] > 0, render_scene(
            5, "val", i, (80, 80), k, (1, 0, 0))[1][~frame] > 0)


def test_scenes_below_odd_until_hold_only_the_odd_classes():
    """odd_until = 1/2: every scene with h below it has odd object classes only, later ones the even ones too."""
    design, below, above = SceneDesign(odd_until=0.5), set(), set()
    for i in range(30):
        _, mask, _, h = render_scene(3, "val", i, (40, 40), 9, design=design)
        (below if h < 0.5 else above).update(np.unique(mask).tolist())
    assert below - {0} <= {1, 3, 5, 7} and below > {0} and above & {2, 4, 6, 8}


# --- on-disk formats -------------------------------------------------------------------------------

def _camvid(root: Path) -> Path:
    for split, n in (("train", 2), ("val", 2)):
        lines = []
        for i in range(n):
            _save(root / split / f"{split}{i}.jpg", _rgb(i))
            _save(root / f"{split}annot" / f"{split}{i}.png", _label([0, 3, 8, 11]))
            # SegNet's lists hold absolute paths; the loader keeps their last two components.
            prefix = "/SegNet/CamVid/" if i == 0 else ""
            lines.append(f"{prefix}{split}/{split}{i}.jpg {prefix}{split}annot/{split}{i}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_camvid_sizes_mapping_ignore_and_determinism(tmp_path):
    root = _camvid(tmp_path / "camvid")
    ds = build_dataset(f"camvid:{root}", "val", (16, 24))
    assert len(ds) == 2 and ds.image_ids == ["val/val0", "val/val1"] and ds.num_classes == 11
    assert ds.class_names[3] == "Road"
    x, y = ds[0]
    assert x.shape == (3, 16, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.unique().tolist()) == {0, 3, 8, 255}  # 11 (void) -> ignore; nearest keeps values exact
    x2, y2 = ds[0]
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, y3 = pickle.loads(pickle.dumps(ds))[0]  # what DataLoader workers and Ray actors receive
    assert torch.equal(x, x3) and torch.equal(y, y3)
    img, mask = ds.load(1)
    assert img.shape == (H, W, 3) and mask.shape == (H, W)
    y_neg = build_dataset(f"camvid:{root}", "val", (16, 24), ignore_index=-1)[0][1]
    assert set(y_neg.unique().tolist()) == {-1, 0, 3, 8}
    assert check_dataset(f"camvid:{root}", "train", 11, deep=True)["images"] == 2


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    root = tmp_path / "cs"
    for split in ("train", "val"):
        _save(root / "leftImg8bit" / split / "aachen" / "aachen_000000_000019_leftImg8bit.png", _rgb(1))
        _save(root / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_labelIds.png",
              _label([0, 7, 26, 33, 9]))
    ds = build_dataset(f"cityscapes:{root}", "val", (H, W), num_classes=19)
    assert ds.image_ids == ["aachen/aachen_000000_000019"] and len(ds.class_names) == 19
    assert set(ds[0][1].unique().tolist()) == {255, 0, 13, 18}
    assert check_dataset(f"cityscapes:{root}", "train")["num_classes"] == 19


def test_voc_palette_indices_and_border_ignore(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    names = ["2007_000032", "2007_000033"]
    for k, name in enumerate(names):
        _save(voc / "JPEGImages" / f"{name}.jpg", _rgb(k))
        _save(voc / "SegmentationClass" / f"{name}.png", _label([0, 15, 255, 20]), palette=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")
    ds = build_dataset(f"voc:{tmp_path}", "val", (10, 15))  # the parent of VOCdevkit works too
    assert len(ds) == 2 and ds.class_names[15] == "person"
    assert set(ds[1][1].unique().tolist()) == {0, 15, 20, 255}
    with pytest.raises(DataError, match="train.txt: split list not found"):
        build_dataset(f"voc:{voc}", "train", (10, 15))


def test_ade20k_shift_and_ignore_zero(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for sub in ("training", "validation"):
        _save(root / "images" / sub / f"ADE_{sub}_00000001.jpg", _rgb(3))
        _save(root / "annotations" / sub / f"ADE_{sub}_00000001.png", _label([0, 1, 150, 13]))
    ds = build_dataset(f"ade20k:{tmp_path}", "train", (H, W))
    assert ds.num_classes == 150 and ds.class_names[0] == "wall" and ds.class_names[149] == "flag"
    assert set(ds[0][1].unique().tolist()) == {255, 0, 149, 12}
    with pytest.raises(DataError, match="split 'test' is not available for ade20k"):
        build_dataset(f"ade20k:{tmp_path}", "test", (H, W))


def _coco(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    images, anns = [], []
    for k, split in enumerate(("train", "val")):
        for i in range(2):
            iid = 10 * k + i + 1
            _save(root / f"{split}2017" / f"{iid:012d}.jpg", _rgb(iid))
            images.append((split, {"id": iid, "file_name": f"{iid:012d}.jpg", "height": H, "width": W}))
    def square(x0, y0, x1, y1):
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]
    for split, im in images:
        iid = im["id"]
        anns.append({"id": 100 + iid, "image_id": iid, "category_id": 1, "segmentation": square(2, 2, 12, 12),
                     "area": 100.0 if iid % 10 == 2 else 2000.0, "iscrowd": 0})  # person -> class 15
        anns.append({"id": 200 + iid, "image_id": iid, "category_id": 3, "segmentation": square(8, 8, 20, 18),
                     "area": 120.0, "iscrowd": 0})  # car -> class 7, overlapping the person
        anns.append({"id": 300 + iid, "image_id": iid, "category_id": 90, "segmentation": square(22, 2, 28, 8),
                     "area": 36.0, "iscrowd": 0})  # toothbrush: not a VOC category, stays background
    cats = [{"id": c, "name": n} for c, n in ((1, "person"), (3, "car"), (90, "toothbrush"))]
    for split in ("train", "val"):
        ids = {im["id"] for s, im in images if s == split}
        doc = {"images": [im for s, im in images if s == split], "categories": cats,
               "annotations": [a for a in anns if a["image_id"] in ids]}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    return root


def test_coco_without_pycocotools_says_how_to_install(tmp_path, monkeypatch):
    root = _coco(tmp_path / "coco")
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # as if it were not installed
    with pytest.raises(DataError, match=r"pip install 'messearch\[coco\]'"):
        build_dataset(f"coco:{root}", "val", (H, W))


def test_coco_voc_categories_overlap_ignored(tmp_path):
    pytest.importorskip("pycocotools", reason="the optional extra messearch[coco] (pycocotools) is not installed")
    root = _coco(tmp_path / "coco")
    val = build_dataset(f"coco:{root}", "val", (H, W), num_classes=21)
    assert val.image_ids == ["000000000011", "000000000012"]
    y = val[0][1]
    assert y[5, 5] == 15 and y[15, 15] == 7 and y[10, 10] == 255 and y[5, 25] == 0 and y[19, 0] == 0
    assert set(y.unique().tolist()) == {0, 7, 15, 255}
    assert torch.equal(pickle.loads(pickle.dumps(val))[0][1], y)
    # torchvision's train filter: images whose kept annotations cover <= 1000 px of area are dropped.
    assert build_dataset(f"coco:{root}", "train", (H, W)).image_ids == ["000000000001"]
    assert check_dataset(f"coco:{root}", "val", deep=True)["images"] == 2
    doc = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    doc["annotations"][0]["category_id"] = 999
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="instances_val2017.json: annotation 111 has category_id 999"):
        check_dataset(f"coco:{root}", "val")


def _no_label(root):
    (root / "valannot" / "val1.png").unlink()


def _unlabelled_list_line(root):
    (root / "train.txt").write_text("train/train0.jpg\n")


def _cityscapes_without_label(tmp_path) -> str:
    cs = tmp_path / "cs"
    _save(cs / "leftImg8bit" / "val" / "bonn" / "bonn_1_leftImg8bit.png", _rgb(0))
    (cs / "gtFine" / "val" / "bonn").mkdir(parents=True)
    return f"cityscapes:{cs}"


# case -> (a change to a good CamVid copy, or None; the call on (tmp_path, camvid spec); the message it must raise)
MISSING = {
    "root": (None, lambda t, spec: check_dataset(f"camvid:{t / 'nope'}", "val"), "nope: camvid data root not found"),
    "split list": (None, lambda t, spec: check_dataset(spec, "test"), "test.txt: split list not found"),
    "label file": (_no_label, lambda t, spec: check_dataset(spec, "val"),
                   r"valannot/val1.png: label of image .*val1.jpg not found"),
    "label path in the list": (_unlabelled_list_line, lambda t, spec: build_dataset(spec, "train", (H, W)),
                               r"train.txt:1: .* has no label path"),
    "cityscapes label": (None, lambda t, spec: check_dataset(_cityscapes_without_label(t), "val"),
                         "bonn_1_leftImg8bit.png: image without its label .*bonn_1_gtFine_labelIds.png"),
    "class count": (None, lambda t, spec: check_dataset(spec, "val", num_classes=19),
                    "the space has num_classes=19 but camvid has 11 classes"),
}


@pytest.mark.parametrize("case", list(MISSING))
def test_missing_root_split_list_and_label(tmp_path, case):
    change, call, message = MISSING[case]
    root = _camvid(tmp_path / "camvid")
    if change is not None:
        change(root)
    with pytest.raises(DataError, match=message):
        call(tmp_path, f"camvid:{root}")


def _garbage(root):
    (root / "train" / "train1.jpg").write_bytes(b"not an image at all")


def _truncated_image(root):
    _save(root / "train" / "train1.jpg", _rgb(9))
    _truncate(root / "train" / "train1.jpg")


def _truncated_label(root):
    _truncate(root / "valannot" / "val0.png")


def _label_value_12(root):
    _save(root / "valannot" / "val1.png", _label([0, 12, 3]))


def _rgb_label(root):
    _save(root / "valannot" / "val0.png", np.zeros((H, W, 3), np.uint8))


def _label_one_row_taller(root):
    _save(root / "valannot" / "val0.png", np.zeros((H + 1, W), np.uint8))


# case -> (the damage, the call on the camvid spec, the message). The fast scan (check_dataset) reads headers only:
# a truncated image passes it and fails the deep scan and loading the item.
UNREADABLE = {
    "garbage header": (_garbage, lambda spec: check_dataset(spec, "train"), r"train1.jpg: cannot read image header"),
    "truncated image, deep scan": (_truncated_image, lambda spec: check_dataset(spec, "train", deep=True),
                                   r"train1.jpg: cannot read image"),
    "truncated image, loaded": (_truncated_image, lambda spec: build_dataset(spec, "train", (H, W))[1],
                                r"train1.jpg: cannot read image"),
    "truncated label map": (_truncated_label, lambda spec: build_dataset(spec, "val", (H, W))[0],
                            r"val0.png: cannot read label map"),
    "label value outside the classes": (_label_value_12, lambda spec: build_dataset(spec, "val", (H, W))[1],
                                        r"val1.png: label values \[12\] are outside the camvid classes"),
    "RGB label map": (_rgb_label, lambda spec: check_dataset(spec, "val"), r"val0.png: label map has mode RGB"),
    "label of another size": (_label_one_row_taller, lambda spec: check_dataset(spec, "val"),
                              rf"val0.png: label map is {W}x{H + 1} but its image"),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_truncated_and_bad_labels(tmp_path, case):
    damage, call, message = UNREADABLE[case]
    root = _camvid(tmp_path / "camvid")
    damage(root)
    with pytest.raises(DataError, match=message):
        call(f"camvid:{root}")


def test_truncated_image_passes_the_fast_scan(tmp_path):
    root = _camvid(tmp_path / "camvid")
    _truncated_image(root)
    assert check_dataset(f"camvid:{root}", "train")["images"] == 2


@pytest.mark.parametrize("kind, values, bad", [("cityscapes", [7, 40], 40), ("voc", [0, 21], 21),
                                               ("ade20k", [1, 151], 151)])
def test_label_values_outside_each_format(tmp_path, kind, values, bad):
    if kind == "cityscapes":
        img = _save(tmp_path / "leftImg8bit" / "val" / "c" / "c_1_leftImg8bit.png", _rgb(0))
        lbl = tmp_path / "gtFine" / "val" / "c" / "c_1_gtFine_labelIds.png"
    elif kind == "voc":
        img = _save(tmp_path / "JPEGImages" / "a.jpg", _rgb(0))
        lbl = tmp_path / "SegmentationClass" / "a.png"
        (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
        (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    else:
        img = _save(tmp_path / "images" / "validation" / "a.jpg", _rgb(0))
        lbl = tmp_path / "annotations" / "validation" / "a.png"
    _save(lbl, _label(values), palette=(kind == "voc"))
    assert img.is_file()
    ds = build_dataset(f"{kind}:{tmp_path}", "val", (8, 8))
    with pytest.raises(DataError, match=rf"{lbl.name}: label values \[{bad}\] are outside the {kind} classes"):
        ds[0]
    with pytest.raises(DataError, match=rf"label values \[{bad}\]"):
        check_dataset(f"{kind}:{tmp_path}", "val", deep=True)


@pytest.mark.skipif(not (CAMVID / "val.txt").is_file(), reason=f"real data absent: no CamVid copy at {CAMVID}")
def test_real_camvid_val():
    spec = f"camvid:{CAMVID}"
    assert check_dataset(spec, "val", 11) == {"format": "camvid", "split": "val", "images": 101, "num_classes": 11}
    ds = build_dataset(spec, "val", (90, 120), num_classes=11)
    hist = np.zeros(256, dtype=np.int64)
    for i in range(len(ds)):
        img, mask = ds.load(i)
        assert img.shape == (360, 480, 3) and mask.shape == (360, 480)
        hist += np.bincount(mask.ravel(), minlength=256)
    present = set(np.flatnonzero(hist).tolist())
    assert present <= set(range(11)) | {255} and 255 in present and len(present) == 12
    top4 = [ds.class_names[c] for c in np.argsort(hist[:11])[::-1][:4]]
    assert {"Sky", "Building", "Road"} <= set(top4), top4
    labelled = hist[:11].sum()
    for small in ("Pole", "SignSymbol", "Pedestrian"):
        assert hist[ds.class_names.index(small)] < 0.02 * labelled
    x, y = ds[0]
    assert x.shape == (3, 90, 120) and y.shape == (90, 120) and y.dtype == torch.int64
    assert torch.equal(ds[0][0], x)


def test_synthetic_scenes_render_once_and_hand_out_copies(monkeypatch):
    # each epoch reads every scene again: the first rendering is kept (within RENDERED_BYTES), a copy handed out
    from messearch import data_synthetic
    real, calls = data_synthetic.render_scene, []
    monkeypatch.setattr(data_synthetic, "render_scene", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    ds = build_dataset("synthetic:3:8", "train", (32, 32))
    img, mask = ds.load(2)
    want = real(3, "train", 2, (32, 32), ds.num_classes, ds.spec.mix)
    img[:] = 0   # a caller's change stays its own
    again, mask2 = ds.load(2)
    assert calls == [2]
    assert np.array_equal(again, want[0]) and np.array_equal(mask2, want[1]) and again.any()
    x, y = ds[2]
    assert calls == [2] and x.shape == (3, 32, 32)
    copy = pickle.loads(pickle.dumps(ds))   # DataLoader workers and Ray actors: no renderings travel
    assert copy._rendered == {} and np.array_equal(copy.load(2)[0], want[0])
    monkeypatch.setattr(data_synthetic, "RENDERED_BYTES", 0)
    small = build_dataset("synthetic:3:8", "train", (32, 32))
    small.load(1), small.load(1)
    assert calls[-2:] == [1, 1]   # over the budget: rendered each time
