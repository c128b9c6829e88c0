"""Search-space files: loaded with yaml.safe_load into one validated, frozen Space object."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .backbones import MODELS, candidate_positions
from .errors import SpaceError
from .heads import RFE_KINDS, HeadSpec

MODES = ("cascade", "single")
POLICY_KINDS = ("mean", "fraction")
# stats.mean_confidence is exact (independent of summation order, so the cache and the deployed model agree bit
# for bit) only for fewer classes than this; see its docstring.
MEAN_EXACT_CLASSES = 256
# ... and only up to this many pixels per image (H * W): a float64 sum of that many float32 values >= 1/256 holds
# every bit (53 = 22 + 31), so its order cannot change it.
MEAN_EXACT_PIXELS = 2 ** 22
MIN_INPUT_SIZE = 32   # each side; the deepest candidate features of every shipped model stay at least 1x1


@dataclass(frozen=True)
class PolicySpec:
    """The exit policy: image-level confidence is the mean top-1 probability, or the fraction of pixels
    whose top-1 probability reaches `pixel_threshold` (a bin edge k/n_bins, so the cache holds it exactly)."""

    kind: str = "mean"
    pixel_threshold: float | None = None
    n_bins: int = 20
    allow_inexact_mean: bool = False   # lifts the MEAN_EXACT_CLASSES and MEAN_EXACT_PIXELS limits of 'mean'

    @property
    def pixel_threshold_bin(self) -> int | None:
        """The bin edge index of the pixel threshold ('fraction' policy), else None."""
        return None if self.pixel_threshold is None else round(self.pixel_threshold * self.n_bins)


@dataclass(frozen=True)
class TrainSpec:
    """Training settings of both stages (defaults suit the small models; space files override them)."""

    batch_size: int = 8
    epochs_stage1: int = 2
    epochs_stage2: int = 2
    lr: float = 0.01
    lr_stage2: float = 0.01
    weight_decay: float = 1e-4
    exit_loss_weight: float = 0.5   # stage 1: weight of each auxiliary exit's loss against the final head's
    distill_weight: float = 1.0     # stage 2: weight of the positive-filtering distillation term
    temperature: float = 2.0        # stage 2: softening of the final head's prediction
    seed: int = 0
    num_workers: int = 0
    train_images: int = 0           # use only the first N training images (0: all); tiny CPU runs
    val_images: int = 0             # use only the first N validation images (0: all)
    head_val_every: int = 1         # stages 2 / joint: validate every head after each Nth epoch and the last (0: last)


@dataclass(frozen=True)
class Space:
    """A validated search space: the model, its candidate exits, the exit policy and the search's grid."""

    source: str
    text: str
    name: str
    model: str
    num_classes: int
    input_size: tuple[int, int]
    positions: tuple[str, ...]
    heads: tuple[HeadSpec, ...]
    policy: PolicySpec
    thresholds: tuple[float, ...]
    max_exits: int
    mode: str = "cascade"
    ignore_index: int = 255
    data: str = "synthetic"
    train: TrainSpec = field(default_factory=TrainSpec)

    def head(self, name: str) -> HeadSpec:
        """The head variant called `name`."""
        for h in self.heads:
            if h.name == name:
                return h
        raise SpaceError(f"{self.source}: no head variant {name!r}; the space has {[h.name for h in self.heads]}")

    @property
    def head_names(self) -> list[str]:
        return [h.name for h in self.heads]


_TOP_KEYS = {"name", "model", "num_classes", "ignore_index", "input_size", "positions", "heads", "policy",
             "thresholds", "max_exits", "mode", "data", "train"}
_REQUIRED = ("model", "num_classes", "input_size", "heads", "thresholds")


class _Checker:
    """Raises SpaceError messages of one shape: file, field, bad value, what is allowed."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, fieldname: str, value, allowed: str):
        raise SpaceError(f"{self.source}: field '{fieldname}': bad value {value!r}; allowed: {allowed}")

    def keys(self, fieldname: str, mapping, allowed: set[str]):
        if not isinstance(mapping, dict):
            self.fail(fieldname, mapping, "a mapping")
        for k in mapping:
            if k not in allowed:
                where = f"{fieldname}.{k}" if fieldname else str(k)
                raise SpaceError(f"{self.source}: unknown field '{where}'; allowed: {', '.join(sorted(allowed))}")

    def integer(self, fieldname: str, value, minimum: int, maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum and value > maximum):
            self.fail(fieldname, value, f"an integer >= {minimum}" if maximum is None else
                      f"an integer in {minimum}..{maximum:,}")
        return value

    def number(self, fieldname: str, value, lo: float, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value <= hi) or math.isnan(value):
            self.fail(fieldname, value, f"a number in [{lo}, {hi}]")
        return float(value)


def _heads(c: _Checker, raw) -> tuple[HeadSpec, ...]:
    if not isinstance(raw, list) or not raw:
        c.fail("heads", raw, "a non-empty list of head variants")
    allowed = {f.name for f in fields(HeadSpec)}
    heads, names = [], set()
    for i, h in enumerate(raw):
        where = f"heads[{i}]"
        c.keys(where, h, allowed)
        name = h.get("name")
        if not isinstance(name, str) or not name or "/" in name or name in names:
            c.fail(f"{where}.name", name, "a unique non-empty name without '/'")
        names.add(name)
        width = h.get("width")
        if width is not None:
            c.integer(f"{where}.width", width, 1)
        rfe = h.get("rfe", "none")
        if rfe not in RFE_KINDS:
            c.fail(f"{where}.rfe", rfe, ", ".join(RFE_KINDS))
        rates = h.get("rates", [2, 4])
        if not isinstance(rates, list) or not rates:
            c.fail(f"{where}.rates", rates, "a non-empty list of positive integers")
        for r in rates:
            c.integer(f"{where}.rates", r, 1)
        heads.append(HeadSpec(name=name, reduction=c.integer(f"{where}.reduction", h.get("reduction", 4), 1),
                              layers=c.integer(f"{where}.layers", h.get("layers", 1), 0), width=width, rfe=rfe,
                              rates=tuple(rates)))
    return tuple(heads)


# Upper bounds that keep a typo from filling the machine: the cache holds n_bins + 1 counts per image and exit, and a
# search's size grows with the thresholds (to the power of the exits, per exit).
MAX_THRESHOLDS = 1000
MAX_BINS = 1000


def _thresholds(c: _Checker, raw) -> tuple[float, ...]:
    if isinstance(raw, dict):
        c.keys("thresholds", raw, {"start", "stop", "num"})
        start = c.number("thresholds.start", raw.get("start"), 0.0, 1.0)
        stop = c.number("thresholds.stop", raw.get("stop"), 0.0, 1.0)
        num = c.integer("thresholds.num", raw.get("num"), 1, MAX_THRESHOLDS)
        raw = [round(start + (stop - start) * i / max(num - 1, 1), 6) for i in range(num)]
    if not isinstance(raw, list) or not raw:
        c.fail("thresholds", raw, "a non-empty list of numbers in [0, 1], or {start, stop, num}")
    if len(raw) > MAX_THRESHOLDS:
        c.fail("thresholds", f"a list of {len(raw):,}", f"at most {MAX_THRESHOLDS:,} values")
    values = [c.number("thresholds", t, 0.0, 1.0) for t in raw]
    if len(set(values)) != len(values):
        c.fail("thresholds", raw, "distinct values")
    return tuple(sorted(values))


def _policy(c: _Checker, raw) -> PolicySpec:
    raw = {} if raw is None else raw
    c.keys("policy", raw, {"kind", "pixel_threshold", "n_bins", "allow_inexact_mean"})
    kind = raw.get("kind", "mean")
    if kind not in POLICY_KINDS:
        c.fail("policy.kind", kind, ", ".join(POLICY_KINDS))
    n_bins = c.integer("policy.n_bins", raw.get("n_bins", 20), 1, MAX_BINS)
    pt = raw.get("pixel_threshold")
    if kind == "fraction":
        pt = c.number("policy.pixel_threshold", pt, 0.0, 1.0)
        if abs(pt * n_bins - round(pt * n_bins)) > 1e-9:
            c.fail("policy.pixel_threshold", pt, f"a bin edge k/{n_bins} (the cache counts pixels exactly there)")
        pt = round(pt * n_bins) / n_bins
    elif pt is not None:
        c.fail("policy.pixel_threshold", pt, "only with kind: fraction")
    lift = raw.get("allow_inexact_mean", False)
    if not isinstance(lift, bool):
        c.fail("policy.allow_inexact_mean", lift, "true or false")
    return PolicySpec(kind=kind, pixel_threshold=pt, n_bins=n_bins, allow_inexact_mean=lift)


def _train(c: _Checker, raw) -> TrainSpec:
    raw = {} if raw is None else raw
    defaults = TrainSpec()
    c.keys("train", raw, {f.name for f in fields(TrainSpec)})
    values = {}
    for f in fields(TrainSpec):
        v = raw.get(f.name, getattr(defaults, f.name))
        if isinstance(getattr(defaults, f.name), int):
            minimum = 1 if f.name in ("batch_size",) else 0
            values[f.name] = c.integer(f"train.{f.name}", v, minimum)
        else:
            values[f.name] = c.number(f"train.{f.name}", v, 0.0, 1e6)
    return TrainSpec(**values)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:   # an unhashable key: SafeLoader reports it
                pass
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, again: int):
        super().__init__(key, first, again)
        self.key, self.first, self.again = key, first, again


def _cross_checks(c: _Checker, space: Space) -> None:
    """Checks between fields: exits vs positions, the ignore index vs the classes, the mean policy's exactness
    (classes and pixels)."""
    n_pos = len(space.positions)
    if space.max_exits > n_pos:
        c.fail("max_exits", space.max_exits, f"an integer from 1 to {n_pos} (the number of candidate positions)")
    if 0 <= space.ignore_index < space.num_classes:
        c.fail("ignore_index", space.ignore_index,
               f"a value outside the classes 0..{space.num_classes - 1} (it marks unlabelled pixels), e.g. 255")
    if space.policy.kind == "mean" and space.num_classes >= MEAN_EXACT_CLASSES and not space.policy.allow_inexact_mean:
        c.fail("num_classes", space.num_classes,
               f"at most {MEAN_EXACT_CLASSES - 1} with policy kind 'mean' (its mean confidence is exact only below "
               f"{MEAN_EXACT_CLASSES} classes); use policy kind 'fraction', or set policy.allow_inexact_mean: true")
    h, w = space.input_size
    if space.policy.kind == "mean" and h * w > MEAN_EXACT_PIXELS and not space.policy.allow_inexact_mean:
        c.fail("input_size", [h, w],
               f"at most {MEAN_EXACT_PIXELS} pixels (4 Mpixel; here {h * w}) with policy kind 'mean' (its mean "
               f"confidence is exact only up to {MEAN_EXACT_PIXELS} pixels and below {MEAN_EXACT_CLASSES} classes); "
               f"use policy kind 'fraction', or set policy.allow_inexact_mean: true")


def space_from_text(text: str, source: str) -> Space:
    """Parse and validate a space file's text; `source` names it in errors."""
    c = _Checker(source)
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)   # a SafeLoader: no tags that build objects
    except _DuplicateKey as e:
        raise SpaceError(f"{source}: field '{e.key}' given twice (lines {e.first} and {e.again}); "
                         f"allowed: each field once") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise SpaceError(f"{source}: not valid YAML{where}: {what}") from None
    c.keys("", raw, _TOP_KEYS)
    for key in _REQUIRED:
        if key not in raw:
            raise SpaceError(f"{source}: missing required field '{key}'")
    model = raw["model"]
    if model not in MODELS:
        c.fail("model", model, ", ".join(sorted(MODELS)))
    size = raw["input_size"]
    if isinstance(size, int):
        size = [size, size]
    if not isinstance(size, list) or len(size) != 2:
        c.fail("input_size", raw["input_size"], f"[height, width] (or one integer), each >= {MIN_INPUT_SIZE}")
    size = tuple(c.integer("input_size", s, MIN_INPUT_SIZE) for s in size)
    available = candidate_positions(model)
    pos = raw.get("positions", "all")
    if pos == "all":
        positions = tuple(available)
    else:
        if not isinstance(pos, list) or not pos:
            c.fail("positions", pos, "'all' or a non-empty list of module paths")
        for p in pos:
            if p not in available:
                c.fail("positions", p, f"candidate positions of {model}: {', '.join(available)}")
        if len(set(pos)) != len(pos):
            c.fail("positions", pos, "distinct positions")
        positions = tuple(p for p in available if p in pos)
    mode = raw.get("mode", "cascade")
    if mode not in MODES:
        c.fail("mode", mode, ", ".join(MODES))
    data = raw.get("data", "synthetic")
    if not isinstance(data, str) or not data:
        c.fail("data", data, "a data spec such as 'synthetic' or 'camvid:/path'")
    name = raw.get("name", Path(source).stem)
    space = Space(
        source=source, text=text, name=str(name), model=model,
        num_classes=c.integer("num_classes", raw["num_classes"], 2),
        ignore_index=c.integer("ignore_index", raw.get("ignore_index", 255), 0),
        input_size=size, positions=positions, heads=_heads(c, raw["heads"]), policy=_policy(c, raw.get("policy")),
        thresholds=_thresholds(c, raw["thresholds"]),
        max_exits=c.integer("max_exits", raw.get("max_exits", min(3, len(positions))), 1), mode=mode, data=data,
        train=_train(c, raw.get("train")),
    )
    _cross_checks(c, space)
    return space


def builtin_spaces() -> list[str]:
    """Names of the spaces shipped inside the package (messearch/spaces/*.yaml), sorted."""
    return sorted(f.name[:-5] for f in _builtin_dir().iterdir() if f.name.endswith(".yaml"))


def _builtin_dir():
    # importlib.resources finds package data in a wheel, a zip or a source tree alike
    from importlib.resources import files

    return files("messearch") / "spaces"


def _is_name(arg: str) -> bool:
    """A built-in space name looks like `quickstart`: no folder separator, no file suffix."""
    return "/" not in arg and "\\" not in arg and not arg.endswith((".yaml", ".yml"))


def load_space(name_or_path: str | Path) -> Space:
    """Load and validate a space: a built-in name (`quickstart`, see builtin_spaces()) or a YAML file path
    (yaml.safe_load); errors name the file and the field."""
    arg = str(name_or_path)
    if isinstance(name_or_path, str) and _is_name(arg) and not Path(arg).is_file():
        resource = _builtin_dir() / f"{arg}.yaml"
        if not resource.is_file():
            raise SpaceError(f"{arg!r} is neither a space file nor a built-in space; built-in spaces: "
                             f"{', '.join(builtin_spaces())} (`messearch spaces` lists them)")
        return space_from_text(resource.read_text(encoding="utf-8"), f"messearch/spaces/{arg}.yaml")
    path = Path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpaceError(f"{path}: space file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpaceError(f"{path}: cannot read the space file ({e})") from None
    return space_from_text(text, str(path))
