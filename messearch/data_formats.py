"""On-disk segmentation formats: CamVid (SegNet layout), Cityscapes, Pascal VOC 2012, COCO (20 VOC
categories) and ADE20K. Each finds its (image, label) pairs up front, naming any missing piece, and
maps raw label values through a table in which every value outside the format's classes is an error."""

from __future__ import annotations

import json
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from .dataset import IGNORE, SegDataset
from .errors import DataError

_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


def read_image(path: Path) -> np.ndarray:
    """Decode an image fully as uint8 HxWx3; DataError names the file when it is missing or unreadable."""
    try:
        with Image.open(path) as im:
            im.load()  # full decode: a truncated file fails here, never silently later
            return np.array(im.convert("RGB") if im.mode != "RGB" else im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, zlib errors...)
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def read_label(path: Path) -> np.ndarray:
    """Decode a single-channel label map (indices of a palette PNG, or grey values) as an integer array."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in _LABEL_MODES:
                raise DataError(f"{path}: label map has mode {im.mode}; expected a single-channel "
                                f"index image (mode L or P) with one class value per pixel")
            return np.array(im)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: label file not found") from None
    except Exception as e:
        raise DataError(f"{path}: cannot read label map ({type(e).__name__}: {e})") from None


def _header(path: Path, what: str) -> tuple[tuple[int, int], str]:
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except Exception as e:
        raise DataError(f"{path}: cannot read {what} header ({type(e).__name__}: {e})") from None


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} not found")
    return path


class FileDataset(SegDataset):
    """Pairs of image and label files; a subclass sets the classes, the raw-value table and `scan`."""

    NUM_CLASSES = 0
    CLASS_NAMES: tuple[str, ...] = ()
    SPLITS: tuple[str, ...] = ("train", "val")
    RAW_VALUES = ""  # the raw label values the format allows, for error messages

    def __init__(self, root, split: str, input_size, train: bool = False, ignore_index: int = 255):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: {self.kind} data root not found")
        if split not in self.SPLITS:
            raise DataError(f"split {split!r} is not available for {self.kind}; allowed: {', '.join(self.SPLITS)}")
        self.root = root
        samples = self.scan(root, split)
        if not samples:
            raise DataError(f"{root}: no {split} images found for {self.kind}")
        ids, self.images, self.labels = (list(t) for t in zip(*samples))
        super().__init__(split, input_size, train, ignore_index, self.NUM_CLASSES, list(self.CLASS_NAMES), ids)
        self.lut = self.label_table()

    def scan(self, root: Path, split: str) -> list[tuple[str, Path, Path]]:
        """(image id, image path, label path) for every item of `split`, in a stable order."""
        raise NotImplementedError

    def label_table(self) -> np.ndarray:
        """int16 [256]: raw label value -> class index, IGNORE, or -1 where the value is not allowed."""
        raise NotImplementedError

    def map_labels(self, raw: np.ndarray, path) -> np.ndarray:
        """Raw label map -> uint8 class indices (255 = ignore); DataError names the file and the bad values."""
        if raw.size and (raw.min() < 0 or raw.max() >= len(self.lut)):
            bad = np.unique(raw[(raw < 0) | (raw >= len(self.lut))])
        else:
            mapped = self.lut[raw]
            if mapped.size == 0 or mapped.min() >= 0:
                return mapped.astype(np.uint8)
            bad = np.unique(raw[mapped < 0])
        raise DataError(f"{path}: label values {bad[:10].tolist()} are outside the {self.kind} classes "
                        f"(allowed raw values: {self.RAW_VALUES})")

    def load_label(self, i: int, size: tuple[int, int]) -> np.ndarray:
        """Mapped label map of item i (uint8, 255 = ignore), checked against the image size (W, H)."""
        raw = read_label(self.labels[i])
        if raw.shape[::-1] != size:
            raise DataError(f"{self.labels[i]}: label map is {raw.shape[1]}x{raw.shape[0]} but its image "
                            f"{self.images[i]} is {size[0]}x{size[1]}")
        return self.map_labels(raw, self.labels[i])

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode item i: uint8 image and uint8 mapped mask."""
        img = read_image(self.images[i])
        return img, self.load_label(i, (img.shape[1], img.shape[0]))

    def check(self, deep: bool = False) -> None:
        """Open every file's header (check_header); `deep` decodes every item instead, as loading it would."""
        for i in range(len(self)):
            if deep:
                self.load(i)
            else:
                self.check_header(i)

    def check_header(self, i: int) -> None:
        """Item i's image and label headers: sizes agree, the label is single-channel."""
        size, _ = _header(self.images[i], "image")
        lsize, mode = _header(self.labels[i], "label")
        if mode not in _LABEL_MODES:
            raise DataError(f"{self.labels[i]}: label map has mode {mode}; expected a single-channel "
                            f"index image (mode L or P)")
        if lsize != size:
            raise DataError(f"{self.labels[i]}: label map is {lsize[0]}x{lsize[1]} but its image "
                            f"{self.images[i]} is {size[0]}x{size[1]}")


def _table(mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(256, -1, dtype=np.int16)
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut


class CamVid(FileDataset):
    """CamVid as in the SegNet tutorial: {split}.txt lists `image label`; 11 classes, 11 = void."""

    kind = "camvid"
    NUM_CLASSES = 11
    CLASS_NAMES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                   "Pedestrian", "Bicyclist")
    SPLITS = ("train", "val", "test")
    RAW_VALUES = "0..10, and 11 = void (ignored)"

    def label_table(self) -> np.ndarray:
        return _table({**{c: c for c in range(11)}, 11: IGNORE})

    @staticmethod
    def _resolve(root: Path, text: str) -> Path:
        # SegNet's lists hold absolute paths such as /SegNet/CamVid/train/x.png: keep the last two parts.
        p = PurePosixPath(text)
        if p.is_absolute():
            local = root.joinpath(*p.parts[-2:])
            return local if local.exists() or not Path(text).exists() else Path(text)
        return root / p

    def scan(self, root, split):
        list_file = root / f"{split}.txt"
        if not list_file.is_file():
            raise DataError(f"{list_file}: split list not found (camvid:PATH needs {split}.txt with "
                            f"'image_path label_path' lines)")
        samples = []
        for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                what = "has no label path" if len(parts) == 1 else f"has {len(parts)} fields"
                raise DataError(f"{list_file}:{lineno}: line {line.strip()!r} {what}; expected 'image_path label_path'")
            img, lbl = self._resolve(root, parts[0]), self._resolve(root, parts[1])
            if not img.is_file():
                raise DataError(f"{img}: image not found (listed in {list_file}:{lineno})")
            if not lbl.is_file():
                raise DataError(f"{lbl}: label of image {img} not found (listed in {list_file}:{lineno})")
            try:
                image_id = img.relative_to(root).with_suffix("").as_posix()
            except ValueError:
                image_id = img.with_suffix("").as_posix()
            samples.append((image_id, img, lbl))
        return samples


# Cityscapes labelIds -> the 19 train ids (cityscapesscripts' labels.py); the other ids are ignored.
_CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                         25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


class Cityscapes(FileDataset):
    """Cityscapes fine annotations: leftImg8bit/{split}/{city}/ and gtFine/{split}/{city}/ (labelIds)."""

    kind = "cityscapes"
    NUM_CLASSES = 19
    CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                   "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                   "motorcycle", "bicycle")
    SPLITS = ("train", "val", "test")
    RAW_VALUES = "labelIds 0..33 (those without a train id are ignored)"

    def label_table(self) -> np.ndarray:
        return _table({i: _CITYSCAPES_TRAIN_IDS.get(i, IGNORE) for i in range(34)})

    def scan(self, root, split):
        img_dir = _require_dir(root / "leftImg8bit" / split, "image folder (cityscapes:PATH needs leftImg8bit/SPLIT/CITY/)")
        gt_dir = _require_dir(root / "gtFine" / split, "label folder (cityscapes:PATH needs gtFine/SPLIT/CITY/)")
        samples = []
        for img in sorted(img_dir.glob("*/*_leftImg8bit.png")):
            stem = img.name[: -len("_leftImg8bit.png")]
            lbl = gt_dir / img.parent.name / f"{stem}_gtFine_labelIds.png"
            if not lbl.is_file():
                raise DataError(f"{img}: image without its label {lbl}")
            samples.append((f"{img.parent.name}/{stem}", img, lbl))
        return samples


class VOC(FileDataset):
    """Pascal VOC 2012 segmentation: palette PNG indices 0..20, 255 (object borders) ignored."""

    kind = "voc"
    NUM_CLASSES = 21
    CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                   "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                   "train", "tvmonitor")
    SPLITS = ("train", "val", "trainval", "test")
    RAW_VALUES = "0..20 and 255 (ignored)"

    def label_table(self) -> np.ndarray:
        return _table({**{c: c for c in range(21)}, 255: IGNORE})

    def scan(self, root, split):
        for sub in ("VOC2012", "VOCdevkit/VOC2012"):
            if (root / sub / "ImageSets").is_dir():
                root = root / sub
                break
        list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise DataError(f"{list_file}: split list not found (voc:PATH needs ImageSets/Segmentation/{split}.txt)")
        samples = []
        for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
            name = line.strip()
            if not name:
                continue
            img = root / "JPEGImages" / f"{name}.jpg"
            lbl = root / "SegmentationClass" / f"{name}.png"
            if not img.is_file():
                raise DataError(f"{img}: image not found (listed in {list_file}:{lineno})")
            if not lbl.is_file():
                raise DataError(f"{lbl}: label of image {img} not found (listed in {list_file}:{lineno})")
            samples.append((name, img, lbl))
        return samples


class ADE20K(FileDataset):
    """ADE20K scene parsing (ADEChallengeData2016): label 0 (other) ignored, label k -> class k-1."""

    kind = "ade20k"
    NUM_CLASSES = 150
    CLASS_NAMES = tuple(
        "wall building sky floor tree ceiling road bed windowpane grass cabinet sidewalk person earth door table "
        "mountain plant curtain chair car water painting sofa shelf house sea mirror rug field armchair seat "
        "fence desk rock wardrobe lamp bathtub railing cushion base box column signboard chest_of_drawers counter "
        "sand sink skyscraper fireplace refrigerator grandstand path stairs runway case pool_table pillow "
        "screen_door stairway river bridge bookcase blind coffee_table toilet flower book hill bench countertop "
        "stove palm kitchen_island computer swivel_chair boat bar arcade_machine hovel bus towel light truck "
        "tower chandelier awning streetlight booth television_receiver airplane dirt_track apparel pole land "
        "bannister escalator ottoman bottle buffet poster stage van ship fountain conveyer_belt canopy washer "
        "plaything swimming_pool stool barrel basket waterfall tent bag minibike cradle oven ball food step tank "
        "trade_name microwave pot animal bicycle lake dishwasher screen blanket sculpture hood sconce vase "
        "traffic_light tray ashcan fan pier crt_screen plate monitor bulletin_board shower radiator glass clock "
        "flag".split())
    RAW_VALUES = "0..150 (0 = other, ignored)"

    def label_table(self) -> np.ndarray:
        return _table({0: IGNORE, **{k: k - 1 for k in range(1, 151)}})

    def scan(self, root, split):
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        sub = {"train": "training", "val": "validation"}[split]
        img_dir = _require_dir(root / "images" / sub, "image folder (ade20k:PATH needs images/{training,validation}/)")
        ann_dir = _require_dir(root / "annotations" / sub, "label folder (ade20k:PATH needs annotations/{training,validation}/)")
        samples = []
        for img in sorted(img_dir.glob("*.jpg")):
            lbl = ann_dir / f"{img.stem}.png"
            if not lbl.is_file():
                raise DataError(f"{img}: image without its label {lbl}")
            samples.append((img.stem, img, lbl))
        return samples


# torchvision references/segmentation/coco_utils.py: COCO category ids of the 20 VOC classes, in VOC order.
COCO_CAT_LIST = [0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72]


def _pycocotools_mask():
    try:
        from pycocotools import mask
    except ImportError:
        raise DataError("coco:PATH needs pycocotools to rasterise the annotations: "
                        "pip install 'messearch[coco]'") from None
    return mask


class COCO(FileDataset):
    """COCO 2017 instances restricted to the 20 VOC categories, rasterised as torchvision's references do:
    each pixel takes its annotation's class, pixels covered by two or more annotations are ignored, and the
    train split keeps only images whose kept annotations cover more than 1000 pixels of area."""

    kind = "coco"
    NUM_CLASSES = 21
    CLASS_NAMES = VOC.CLASS_NAMES
    RAW_VALUES = "category ids listed in the file's categories"

    def label_table(self) -> np.ndarray:
        return _table({c: c for c in range(21)})

    def scan(self, root, split):
        _pycocotools_mask()  # fail early, with the install hint
        ann_file = root / "annotations" / f"instances_{split}2017.json"
        img_dir = _require_dir(root / f"{split}2017", f"image folder (coco:PATH needs {split}2017/)")
        if not ann_file.is_file():
            raise DataError(f"{ann_file}: annotation file not found (coco:PATH needs annotations/instances_{split}2017.json)")
        try:
            data = json.loads(ann_file.read_text())
            known = {int(c["id"]) for c in data["categories"]}
            by_image: dict[int, list] = {}
            for a in data["annotations"]:
                cat = a["category_id"]
                if cat not in known:
                    raise DataError(f"{ann_file}: annotation {a.get('id')} has category_id {cat!r}, which is not "
                                    f"among the file's categories")
                if cat in COCO_CAT_LIST:
                    by_image.setdefault(a["image_id"], []).append(
                        (COCO_CAT_LIST.index(cat), a["segmentation"], float(a.get("area", 0))))
            samples, self.shapes = [], {}
            for im in sorted(data["images"], key=lambda im: im["id"]):
                kept = by_image.get(im["id"], [])
                if split == "train" and sum(area for _, _, area in kept) <= 1000:
                    continue  # torchvision's _coco_remove_images_without_annotations
                path = img_dir / im["file_name"]
                if not path.is_file():
                    raise DataError(f"{path}: image {im['id']} of {ann_file} not found")
                samples.append((Path(im["file_name"]).stem, path, [(c, seg) for c, seg, _ in kept]))
                self.shapes[path] = (int(im["width"]), int(im["height"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{ann_file}: not a valid COCO instances file ({type(e).__name__}: {e})") from None
        return samples

    def load_label(self, i, size):
        """Rasterise item i's annotations (class per pixel, overlaps ignored) at the image size (W, H)."""
        path = self.images[i]
        if self.shapes[path] != size:
            raise DataError(f"{path}: image is {size[0]}x{size[1]} but its annotation file says "
                            f"{self.shapes[path][0]}x{self.shapes[path][1]}")
        w, h = size
        mask_api = _pycocotools_mask()
        target = np.zeros((h, w), dtype=np.uint8)
        count = np.zeros((h, w), dtype=np.uint8)
        for cls, seg in self.labels[i]:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools' numpy 2 copy= notice
                    if isinstance(seg, list):  # polygons
                        m = mask_api.decode(mask_api.frPyObjects(seg, h, w))
                        m = m.any(axis=2) if m.ndim == 3 else m.astype(bool)
                    else:  # RLE: uncompressed (list counts) or compressed
                        rle = mask_api.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg
                        m = mask_api.decode(rle).astype(bool)
            except Exception as e:
                raise DataError(f"{path}: cannot rasterise an annotation of class {cls} ({type(e).__name__}: {e})") from None
            target[m] = np.maximum(target[m], cls)
            count += m
        target[count > 1] = IGNORE
        return target

    def check_header(self, i: int) -> None:
        """Image i opens with the size the annotation file gives (the masks are rasterised from it)."""
        size, _ = _header(self.images[i], "image")
        if size != self.shapes[self.images[i]]:
            raise DataError(f"{self.images[i]}: image is {size[0]}x{size[1]} but its annotation file says "
                            f"{self.shapes[self.images[i]][0]}x{self.shapes[self.images[i]][1]}")

FORMATS = {"camvid": CamVid, "cityscapes": Cityscapes, "voc": VOC, "coco": COCO, "ade20k": ADE20K}
assert len(ADE20K.CLASS_NAMES) == 150
