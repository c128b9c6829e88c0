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

The base class and the transforms every format shares are in messearch/dataset.py.
"""

from __future__ import annotations

from pathlib import Path

from .data_folder import FolderDataset, read_classes
from .data_formats import FORMATS
from .data_synthetic import SyntheticDataset, parse_synthetic
from .data_synthetic import class_names as synthetic_class_names
from .dataset import SegDataset
from .errors import DataError

FORMAT_NAMES = ("synthetic", "camvid", "cityscapes", "voc", "coco", "ade20k", "folder")
SPEC_HELP = ("synthetic[:SEED[:N[:MIX]]], camvid:PATH, cityscapes:PATH, voc:PATH, coco:PATH, ade20k:PATH or folder:PATH")


def parse_spec(spec: str):
    """Split a data spec into (format name, arg): arg is a SyntheticSpec for synthetic, else the root Path."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"data spec {spec!r} is empty; expected {SPEC_HELP}")
    spec = spec.strip()
    fmt, sep, arg = spec.partition(":")
    if fmt == "synthetic":
        return fmt, parse_synthetic(spec)
    if fmt not in FORMAT_NAMES:
        raise DataError(f"data spec {spec!r}: unknown format {fmt!r}; expected {SPEC_HELP}")
    if not sep or not arg.strip():
        raise DataError(f"data spec {spec!r}: {fmt} needs a folder, as {fmt}:PATH")
    return fmt, Path(arg.strip()).expanduser()


def class_names(spec: str, num_classes: int) -> list[str]:
    """The class names of the data set `spec` names, without reading its images (a folder's from its classes file
    when it is here); `class_k` where a format has none or their number is not `num_classes`."""
    try:
        fmt, arg = parse_spec(spec)
    except DataError:
        fmt = None
    if fmt == "synthetic":
        return synthetic_class_names(num_classes)
    names = list(FORMATS[fmt].CLASS_NAMES) if fmt in FORMATS else []
    if fmt == "folder":
        try:
            names = list(read_classes(arg).names)
        except DataError:  # exported away from the data: generic names
            names = []
    return names if len(names) == num_classes else [f"class_{k}" for k in range(num_classes)]


def _check_split(fmt: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise DataError(f"split {split!r} is not available for {fmt}; allowed: {', '.join(allowed)}")


def build_dataset(spec: str, split: str, input_size, train: bool = False, ignore_index: int = 255,
                  num_classes: int | None = None) -> SegDataset:
    """The data set named by `spec` (see the module docstring) for `split`, as (image, mask) pairs.

    `num_classes` (the space's) sets the synthetic class count unless the spec says `classes=`; for
    the on-disk formats it must equal the format's count.
    """
    fmt, arg = parse_spec(spec)
    if fmt == "synthetic":
        _check_split(fmt, split, ("train", "val", "test"))
        classes = arg.classes
        if classes is not None and num_classes is not None and classes != num_classes:
            raise DataError(f"data spec {spec!r} has classes={classes} but the space has num_classes={num_classes}")
        return SyntheticDataset(arg, split, input_size, train, ignore_index, classes or num_classes)
    cls = _format(fmt)
    _check_split(fmt, split, cls.SPLITS)
    _check_num_classes(fmt, cls.NUM_CLASSES, num_classes)
    ds = cls(arg, split, input_size, train, ignore_index)
    _check_num_classes(getattr(ds, "classes_file", fmt), ds.num_classes, num_classes)
    return ds


def _format(fmt: str):
    return FolderDataset if fmt == "folder" else FORMATS[fmt]


def _check_num_classes(fmt: str, have: int, want: int | None) -> None:
    if want is not None and have and want != have:  # have = 0: the count is known once the data set is read
        raise DataError(f"the space has num_classes={want} but {fmt} has {have} classes")


def check_dataset(spec: str, split: str, num_classes: int | None = None, deep: bool = False) -> dict:
    """Fast up-front scan; raises DataError naming the file and the problem, else returns a summary.

    Checks that the root and split list exist, every image has its label, every file opens with a
    readable header, image and label sizes agree and label maps are single-channel. `deep=True` also
    decodes every file (truncation, label values outside the classes), as loading an item would.
    """
    fmt, arg = parse_spec(spec)
    if fmt == "synthetic":
        ds = build_dataset(spec, split, (8, 8), num_classes=num_classes)
        return {"format": fmt, "split": split, "images": len(ds), "num_classes": ds.num_classes}
    cls = _format(fmt)
    _check_split(fmt, split, cls.SPLITS)
    _check_num_classes(fmt, cls.NUM_CLASSES, num_classes)
    ds = cls(arg, split, (8, 8), False, 255)
    _check_num_classes(getattr(ds, "classes_file", fmt), ds.num_classes, num_classes)
    ds.check(deep=deep)
    return {"format": fmt, "split": split, "images": len(ds), "num_classes": ds.num_classes}
