"""Data sets: one entry point, `build_dataset(spec, split, input_size, train)`, over the built-in
synthetic scenes and the on-disk formats CamVid, Cityscapes, Pascal VOC, COCO and ADE20K.

Spec strings (passed unchanged by the CLI's `--data`):
- `synthetic[...]`        built-in scenes; grammar and defaults in messearch/data_synthetic.py
- `camvid:PATH`           SegNet layout: {train,val,test}.txt of `image label` lines; 11 classes, 11 = void
- `cityscapes:PATH`       leftImg8bit/ + gtFine/ (labelIds mapped to the 19 train ids, the rest ignored)
- `voc:PATH`              VOC2012 (or VOCdevkit/ or its parent): JPEGImages, SegmentationClass, ImageSets/Segmentation
- `coco:PATH`             annotations/instances_{split}2017.json + {split}2017/, the 20 VOC categories (needs pycocotools)
- `ade20k:PATH`           ADEChallengeData2016 (or its parent): 150 classes, label 0 ignored
- `folder:PATH`           your own: PATH/SPLIT/{images,masks}/ + classes.yaml (messearch/data_folder.py)

Every item is `(image, mask)`: image float32 [3, H, W] normalised with the ImageNet mean/std that
torchvision's segmentation models expect, mask int64 [H, W] of class indices, `ignore_index` (255)
where a pixel must not count.

Transforms. Evaluation resizes to input_size (bilinear image, nearest mask; a different aspect ratio is
stretched, never cropped) with PIL's fixed-point resampling and a lookup-table normalisation, so the same
image gives bit-identical tensors on every call, worker and machine. Training draws a scale in
[0.5, 2.0] of input_size, pads (image with the mean, mask with ignore), takes a random input_size crop and
flips horizontally with probability 0.5; the draws come from torch's global RNG, which DataLoader seeds
per worker from its generator, so a seeded loader is reproducible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = 255  # ignore value inside the loaders; replaced by the caller's ignore_index at the end
KINDS = ("synthetic", "camvid", "cityscapes", "voc", "coco", "ade20k", "folder")
SPEC_HELP = ("synthetic[:SEED[:N[:MIX]]], camvid:PATH, cityscapes:PATH, voc:PATH, coco:PATH, ade20k:PATH or folder:PATH")


def _normalise_lut() -> np.ndarray:
    # Exactly torchvision's ToTensor (x / 255 in float32) then Normalize ((x - mean) / std), tabulated.
    x = torch.arange(256, dtype=torch.float32).div(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None]
    return ((x[None, :] - mean) / std).numpy()


_LUT = _normalise_lut()  # [3, 256] float32


def normalise_image(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float32 3xHxW normalised with the ImageNet mean/std (exact, via a lookup table)."""
    out = np.empty((3,) + img.shape[:2], dtype=np.float32)
    for c in range(3):
        out[c] = _LUT[c][img[..., c]]
    return torch.from_numpy(out)


def _resize(img: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    if img.shape[:2] == tuple(size):
        return img, mask
    h, w = size
    img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return img, mask


def transform_pair(img: np.ndarray, mask: np.ndarray, input_size: tuple[int, int], train: bool,
                   ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 HxWx3 image + uint8 HxW mask (255 = ignore) -> normalised float32 image, int64 mask."""
    H, W = input_size
    if not train:
        img, mask = _resize(img, mask, (H, W))
        image, target = normalise_image(img), torch.from_numpy(mask.astype(np.int64))
    else:
        s = 0.5 + 1.5 * float(torch.rand(()))
        img, mask = _resize(img, mask, (max(1, round(H * s)), max(1, round(W * s))))
        image, target = normalise_image(img), torch.from_numpy(mask.astype(np.int64))
        h, w = target.shape
        if h < H or w < W:  # pad bottom/right like torchvision's references: mean colour, ignore label
            ph, pw = max(0, H - h), max(0, W - w)
            image = torch.nn.functional.pad(image, (0, pw, 0, ph), value=0.0)
            target = torch.nn.functional.pad(target, (0, pw, 0, ph), value=IGNORE)
            h, w = target.shape
        top = int(torch.randint(0, h - H + 1, ()))
        left = int(torch.randint(0, w - W + 1, ()))
        image = image[:, top:top + H, left:left + W]
        target = target[top:top + H, left:left + W]
        if float(torch.rand(())) < 0.5:
            image, target = image.flip(-1), target.flip(-1)
        image, target = image.contiguous(), target.contiguous()
    if ignore_index != IGNORE:
        target[target == IGNORE] = ignore_index
    return image, target


class SegDataset(torch.utils.data.Dataset):
    """Common part of every data set: ids, classes, transforms. Subclasses implement `load(i)`."""

    kind = "?"

    def __init__(self, split: str, input_size, train: bool, ignore_index: int, num_classes: int,
                 class_names: list[str], image_ids: list[str]):
        self.split = split
        self.input_size = _check_size(input_size)
        self.train = bool(train)
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        self.image_ids = list(image_ids)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)) \
                or 0 <= ignore_index < self.num_classes:
            raise DataError(f"ignore_index={ignore_index!r} must be an integer outside 0..{self.num_classes - 1}")
        self.ignore_index = int(ignore_index)

    def __len__(self) -> int:
        return len(self.image_ids)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item i before transforms: uint8 HxWx3 image, uint8 HxW mask of class indices (255 = ignore)."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        img, mask = self.load(i % n)
        return transform_pair(img, mask, self.input_size, self.train, self.ignore_index)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, images={len(self)}, classes={self.num_classes}, "
                f"input_size={self.input_size}, train={self.train})")


def _check_size(input_size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in input_size)
    except (TypeError, ValueError):
        raise DataError(f"input_size={input_size!r} must be two positive integers (H, W)") from None
    if h < 1 or w < 1:
        raise DataError(f"input_size={input_size!r} must be two positive integers (H, W)")
    return h, w


def parse_spec(spec: str):
    """Split a data spec into (kind, arg): arg is a SyntheticSpec for synthetic, else the root Path."""
    from .data_synthetic import parse_synthetic

    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"data spec {spec!r} is empty; expected {SPEC_HELP}")
    spec = spec.strip()
    kind, sep, arg = spec.partition(":")
    if kind == "synthetic":
        return kind, parse_synthetic(spec)
    if kind not in KINDS:
        raise DataError(f"data spec {spec!r}: unknown kind {kind!r}; expected {SPEC_HELP}")
    if not sep or not arg.strip():
        raise DataError(f"data spec {spec!r}: {kind} needs a folder, as {kind}:PATH")
    return kind, Path(arg.strip()).expanduser()


def _check_split(kind: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise DataError(f"split {split!r} is not available for {kind}; allowed: {', '.join(allowed)}")


def build_dataset(spec: str, split: str, input_size, train: bool = False, ignore_index: int = 255,
                  num_classes: int | None = None) -> SegDataset:
    """The data set named by `spec` (see the module docstring) for `split`, as (image, mask) pairs.

    `num_classes` (the space's) sets the synthetic class count unless the spec says `classes=`; for
    the on-disk formats it must equal the format's count.
    """
    kind, arg = parse_spec(spec)
    if kind == "synthetic":
        from .data_synthetic import SyntheticDataset

        _check_split(kind, split, ("train", "val", "test"))
        classes = arg.classes
        if classes is not None and num_classes is not None and classes != num_classes:
            raise DataError(f"data spec {spec!r} has classes={classes} but the space has num_classes={num_classes}")
        return SyntheticDataset(arg, split, input_size, train, ignore_index, classes or num_classes)
    cls = _format(kind)
    _check_split(kind, split, cls.SPLITS)
    _check_num_classes(kind, cls.NUM_CLASSES, num_classes)
    ds = cls(arg, split, input_size, train, ignore_index)
    _check_num_classes(getattr(ds, "classes_file", kind), ds.num_classes, num_classes)
    return ds


def _format(kind: str):
    if kind == "folder":
        from .data_folder import FolderDataset

        return FolderDataset
    from .data_formats import FORMATS

    return FORMATS[kind]


def _check_num_classes(kind: str, have: int, want: int | None) -> None:
    if want is not None and have and want != have:  # have = 0: the count is known once the data set is read
        raise DataError(f"the space has num_classes={want} but {kind} has {have} classes")


def check_dataset(spec: str, split: str, num_classes: int | None = None, deep: bool = False) -> dict:
    """Fast up-front scan; raises DataError naming the file and the problem, else returns a summary.

    Checks that the root and split list exist, every image has its label, every file opens with a
    readable header, image and label sizes agree and label maps are single-channel. `deep=True` also
    decodes every file (truncation, label values outside the classes), as loading an item would.
    """
    kind, arg = parse_spec(spec)
    if kind == "synthetic":
        ds = build_dataset(spec, split, (8, 8), num_classes=num_classes)
        return {"kind": kind, "split": split, "images": len(ds), "num_classes": ds.num_classes}
    cls = _format(kind)
    _check_split(kind, split, cls.SPLITS)
    _check_num_classes(kind, cls.NUM_CLASSES, num_classes)
    ds = cls(arg, split, (8, 8), False, 255)
    _check_num_classes(getattr(ds, "classes_file", kind), ds.num_classes, num_classes)
    ds.check(deep=deep)
    return {"kind": kind, "split": split, "images": len(ds), "num_classes": ds.num_classes}
