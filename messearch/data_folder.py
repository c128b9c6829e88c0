"""Your own data: `folder:PATH`, images and masks of the same name in two folders per split.

    PATH/classes.yaml                 (or classes.txt) the class names, and for RGB masks their colours
    PATH/{train,val,test}/images/*    any image PIL reads; subfolders allowed
    PATH/{train,val,test}/masks/*     same relative path and stem, lossless (.png, .bmp, .tif)

classes.yaml:
    classes: [sky, road, car]         index masks (single-channel PNG): pixel value i is class i
    classes: {sky: 3, road: 7}        index masks with other values
    classes: {sky: [128, 128, 128], road: [128, 64, 128]}   RGB colour masks (palette PNGs are read as colours)
    void: 255                         value(s) or colour(s) that map to the ignore index (optional)
classes.txt: one class a line, `NAME` (index masks: line i is value i) or `NAME R G B` (colour masks);
a line named `void` marks the void value or colour instead of a class.

Every problem is a DataError naming the file: a missing mask or image, a lossy mask, a mask whose size
differs from its image, a mask value that is no class, or an unknown colour (with its pixel count).
`check()` decodes every mask before any work starts.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from .dataset import IGNORE
from .data_formats import FileDataset, _header
from .errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff")  # lossless only: JPEG blurs class values and colours at edges
_INDEX_MODES = ("1", "L", "P", "I;16", "I;16B", "I;16L", "I")
LAYOUT = "folder:PATH needs PATH/classes.yaml and PATH/SPLIT/images/ + PATH/SPLIT/masks/"


@dataclass(frozen=True)
class FolderClasses:
    """The classes of a folder data set: names, the mask value (int) or colour (r, g, b) of each, and the void ones."""

    names: tuple[str, ...]
    values: tuple  # per class: int for index masks, (r, g, b) for colour masks
    void: tuple  # values or colours mapped to the ignore index
    colour: bool
    source: str

    def describe(self) -> str:
        """The allowed mask values or colours, for error messages."""
        if self.colour:
            allowed = ", ".join(f"{n} {tuple(c)}" for n, c in list(zip(self.names, self.values))[:12])
            allowed += ", ..." if len(self.names) > 12 else ""
        elif list(self.values) == list(range(len(self.names))):
            allowed = f"0..{len(self.names) - 1}"
        else:
            allowed = ", ".join(f"{n}={v}" for n, v in zip(self.names, self.values))
        void = f"; void {', '.join(str(tuple(v)) if self.colour else str(v) for v in self.void)}" if self.void else ""
        return f"{self.source} has {len(self.names)} classes: {allowed}{void}"


def _fail(source, field, value, allowed) -> None:
    raise DataError(f"{source}: {field} = {value!r}; {allowed}")


def _colour(source, field, v) -> tuple[int, int, int]:
    if isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(c, int) and not isinstance(c, bool)
                                                             and 0 <= c <= 255 for c in v):
        return tuple(int(c) for c in v)
    _fail(source, field, v, "expected a colour [R, G, B] of integers 0..255")


def _value(source, field, v) -> int:
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535:
        return int(v)
    _fail(source, field, v, "expected a mask value, an integer 0..65535")


def _make(names, values, void, colour, source) -> FolderClasses:
    if not names:
        raise DataError(f"{source}: no classes")
    if len(names) > 255:
        raise DataError(f"{source}: {len(names)} classes; at most 255 are supported")
    seen: dict = {}
    for n, v in [*zip(names, values), *(("void", v) for v in void)]:
        if v in seen:
            raise DataError(f"{source}: {n!r} and {seen[v]!r} have the same {'colour' if colour else 'value'} {v}")
        seen[v] = n
    if len(set(names)) != len(names):
        raise DataError(f"{source}: class names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    return FolderClasses(tuple(names), tuple(values), tuple(void), colour, str(source))


def _read_text(path: Path) -> str:
    """A class list's text (UTF-8); DataError naming the file and the first bad byte otherwise."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); allowed: a "
                        f"UTF-8 class list (re-save it as UTF-8)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _parse_yaml(path: Path) -> FolderClasses:
    try:
        doc = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or "classes" not in doc:
        raise DataError(f"{path}: expected a mapping with `classes:` (and optionally `void:`)")
    unknown = sorted(set(doc) - {"classes", "void"})
    if unknown:
        raise DataError(f"{path}: unknown keys {unknown}; allowed: classes, void")
    classes, void = doc["classes"], doc.get("void")
    if isinstance(classes, list):
        if not all(isinstance(n, str) for n in classes):
            _fail(path, "classes", classes, "expected a list of names, or a mapping name: value or name: [R, G, B]")
        names, values, colour = list(classes), list(range(len(classes))), False
    elif isinstance(classes, dict):
        names = [str(n) for n in classes]
        colour = any(isinstance(v, (list, tuple)) for v in classes.values())
        conv = _colour if colour else _value
        values = [conv(path, f"classes.{n}", v) for n, v in classes.items()]
    else:
        _fail(path, "classes", classes, "expected a list of names, or a mapping name: value or name: [R, G, B]")
    if void is None:
        voids = []
    elif colour:
        many = isinstance(void, list) and void and all(isinstance(v, (list, tuple)) for v in void)
        voids = [_colour(path, "void", v) for v in (void if many else [void])]
    else:
        voids = [_value(path, "void", v) for v in (void if isinstance(void, list) else [void])]
    return _make(names, values, voids, colour, path)


def _parse_txt(path: Path) -> FolderClasses:
    names, values, voids, kinds = [], [], [], set()
    lines = [(i, ln.split("#")[0].strip()) for i, ln in enumerate(_read_text(path).splitlines(), 1)]
    for index, (lineno, line) in enumerate((i, ln) for i, ln in lines if ln):
        m = re.fullmatch(r"(.+?)\s+(\d+)\s+(\d+)\s+(\d+)", line)
        name = m.group(1) if m else line
        value = _colour(f"{path}:{lineno}", "colour", [int(g) for g in m.groups()[1:]]) if m else index
        kinds.add(bool(m))
        if name.lower() == "void":
            voids.append(value)
        else:
            names.append(name)
            values.append(value)
    if len(kinds) > 1:
        raise DataError(f"{path}: some lines give a colour and others do not; either `NAME` on every line "
                        f"(index masks) or `NAME R G B` on every line (colour masks)")
    return _make(names, values, voids, kinds == {True}, path)


def read_classes(root: Path) -> FolderClasses:
    """The classes of the folder data set at `root`, from classes.yaml (or .yml, .txt)."""
    found = [name for name in ("classes.yaml", "classes.yml", "classes.txt") if (root / name).is_file()]
    if len(found) > 1:   # which one is meant is the user's call: two lists may disagree
        raise DataError(f"{root}: holds {' and '.join(found)}; keep one class list")
    if found:
        return _parse_txt(root / found[0]) if found[0].endswith(".txt") else _parse_yaml(root / found[0])
    raise DataError(f"{root}: no classes.yaml or classes.txt ({LAYOUT})")


def _listing(paths: list, more: str = "") -> str:
    shown = ", ".join(str(p) for p in paths[:5])
    return shown + (f" and {len(paths) - 5} more" if len(paths) > 5 else "") + more


def scan_folder(root: Path, split: str) -> list[tuple[str, Path, Path]]:
    """(id, image, mask) of every image of `split`, paired by relative path and stem; DataError lists the unpaired."""
    img_dir, mask_dir = root / split / "images", root / split / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"{d}: folder not found ({LAYOUT})")
    groups = []
    for folder, exts, what in ((img_dir, IMAGE_EXTS, "image"), (mask_dir, MASK_EXTS, "mask")):
        found: dict[str, Path] = {}
        for p in (p for p in sorted(folder.rglob("*")) if p.is_file()):
            rel = p.relative_to(folder)
            if any(part.startswith(".") for part in rel.parts):
                continue  # hidden files and folders (.DS_Store, .ipynb_checkpoints) are not data
            if p.suffix.lower() not in exts:
                lossy = " (JPEG masks change class colours at edges; save masks as PNG)" if what == "mask" and \
                    p.suffix.lower() in (".jpg", ".jpeg") else ""
                raise DataError(f"{p}: not a{'n' if what == 'image' else ''} {what} file; allowed: "
                                f"{', '.join(exts)}{lossy}")
            key = rel.with_suffix("").as_posix()
            if key in found:
                raise DataError(f"{p}: two {what}s named {key} ({found[key].name} and {p.name})")
            found[key] = p
        groups.append(found)
    images, masks = groups
    if not images:
        raise DataError(f"{img_dir}: no images ({LAYOUT})")
    no_mask = [images[k] for k in images if k not in masks]
    if no_mask:
        raise DataError(f"{mask_dir}: {len(no_mask)} image(s) without a mask of the same name: {_listing(no_mask)}")
    no_image = [masks[k] for k in masks if k not in images]
    if no_image:
        raise DataError(f"{img_dir}: {len(no_image)} mask(s) without an image of the same name: {_listing(no_image)}")
    return [(k, images[k], masks[k]) for k in images]


def map_mask(path: Path, classes: FolderClasses) -> np.ndarray:
    """Decode a mask and map it to uint8 class indices (255 = void); DataError names unknown values or colours."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if classes.colour:
                if mode in ("1", "L", "I;16", "I;16B", "I;16L", "I"):
                    raise DataError(f"{path}: single-channel mask (mode {mode}), but {classes.source} gives colours: "
                                    f"save RGB colour masks, or list class names only for index masks")
                if mode == "RGBA" and im.getextrema()[3][0] < 255:
                    raise DataError(f"{path}: RGBA mask with transparent pixels; save masks as opaque RGB")
                raw = np.array(im.convert("RGB"), dtype=np.uint8)
            else:
                if mode not in _INDEX_MODES:
                    raise DataError(f"{path}: {mode} mask, but {classes.source} gives no colours: save single-channel "
                                    f"index masks, or give each class its colour [R, G, B] for colour masks")
                raw = np.array(im)
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for broken files
        raise DataError(f"{path}: cannot read mask ({type(e).__name__}: {e})") from None
    if classes.colour:
        return _map_colours(raw, path, classes)
    return _map_values(raw, path, classes)


def _map_values(raw: np.ndarray, path: Path, classes: FolderClasses) -> np.ndarray:
    lut = np.full(65536, -1, dtype=np.int16)
    lut[list(classes.values)] = np.arange(len(classes.values))
    lut[list(classes.void)] = IGNORE
    raw = raw.astype(np.int64)
    inside = (raw >= 0) & (raw < len(lut))
    mapped = np.where(inside, lut[np.clip(raw, 0, len(lut) - 1)], -1)
    if (mapped < 0).any():
        vals, counts = np.unique(raw[mapped < 0], return_counts=True)
        bad = ", ".join(f"{v} ({c} pixels)" for v, c in zip(vals[:8].tolist(), counts[:8].tolist()))
        above = " (index above the class count)" if all(v >= len(classes.names) for v in vals.tolist()) else ""
        raise DataError(f"{path}: mask values that are no class{above}: {bad}; {classes.describe()}")
    return mapped.astype(np.uint8)


def _map_colours(rgb: np.ndarray, path: Path, classes: FolderClasses) -> np.ndarray:
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    known = {(r << 16) | (g << 8) | b: c for c, (r, g, b) in enumerate(classes.values)}
    known.update({(r << 16) | (g << 8) | b: IGNORE for r, g, b in classes.void})
    keys = np.array(sorted(known), dtype=np.int32)
    target = np.array([known[k] for k in keys.tolist()], dtype=np.uint8)
    idx = np.clip(np.searchsorted(keys, code), 0, len(keys) - 1)
    ok = keys[idx] == code
    if not ok.all():
        vals, counts = np.unique(code[~ok], return_counts=True)
        order = np.argsort(-counts)[:8]
        bad = ", ".join(f"({v >> 16}, {(v >> 8) & 255}, {v & 255}) in {c} pixels"
                        for v, c in zip(vals[order].tolist(), counts[order].tolist()))
        raise DataError(f"{path}: unknown colour{'s' if len(vals) > 1 else ''} {bad}"
                        f"{f' ({len(vals)} colours in all)' if len(vals) > 8 else ''}; {classes.describe()}")
    return target[idx]


class FolderDataset(FileDataset):
    """`folder:PATH`: images and masks in PATH/SPLIT/{images,masks}, classes from PATH/classes.yaml (or .txt)."""

    kind = "folder"
    SPLITS = ("train", "val", "test")

    def __init__(self, root, split: str, input_size, train: bool = False, ignore_index: int = 255):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: folder data root not found ({LAYOUT})")
        self.classes = read_classes(root)
        self.classes_file = self.classes.source  # named in class-count errors
        self.NUM_CLASSES = len(self.classes.names)
        self.CLASS_NAMES = self.classes.names
        super().__init__(root, split, input_size, train, ignore_index)

    def scan(self, root, split):
        return scan_folder(root, split)

    def label_table(self) -> np.ndarray:
        return np.zeros(0, dtype=np.int16)  # masks are mapped by map_mask (values or colours)

    def load_label(self, i: int, size: tuple[int, int]) -> np.ndarray:
        """Mapped mask of item i (uint8, 255 = void), checked against the image size (W, H)."""
        mask = map_mask(self.labels[i], self.classes)
        if mask.shape[::-1] != tuple(size):
            raise DataError(f"{self.labels[i]}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                            f"{self.images[i]} is {size[0]}x{size[1]}")
        return mask

    def check(self, deep: bool = False) -> None:
        """Decode every mask (values or colours, size against the image header); `deep` decodes images too.
        A mask already verified in this process (same bytes, classes and image size) is not decoded again:
        pipeline and train both check before any work."""
        for i in range(len(self)):
            if deep:
                self.load(i)
                continue
            size = _header(self.images[i], "image")[0]
            key = (hashlib.blake2b(self.labels[i].read_bytes(), digest_size=16).digest(), self.classes, size)
            if key not in _VERIFIED:
                self.load_label(i, size)
                _VERIFIED.add(key)


_VERIFIED: set = set()  # masks that passed check(), keyed by content hash, classes and image size
