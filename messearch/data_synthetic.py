"""Built-in synthetic segmentation scenes with a graded, recorded difficulty.

Spec grammar (fields after `synthetic` are separated by ':' or ','):

    synthetic[:FIELD[:FIELD...]]
    FIELD := SEED | N | MIX            positional, in this order
           | seed=INT | n=INT | train=INT | val=INT | test=INT | mix=MIX | classes=INT
    MIX   := E/M/H                     weights of easy/medium/hard images (normalised), e.g. 2/1/1
           | easy | medium | hard      every image of that level

Examples: `synthetic`, `synthetic:3:200`, `synthetic:3:200:1/0/1`, `synthetic:seed=3,train=400,val=100,mix=hard`.
Defaults: seed 0, 512 train / 128 val / 128 test images, mix 1/1/1, 8 classes (class 0 = background;
the space's num_classes is used when the spec does not say `classes=`); at most 1,000,000 images a split.

Every image has its own numpy Generator seeded by (seed, split, index), so any item is generated
independently, in any worker, identically on every machine. Image i's level (easy/medium/hard) comes
from a low-discrepancy sequence over the mix (so any prefix has close to the requested fractions and
changing N never changes image i); its hardness h in [0, 1] is drawn inside the level's third.

What h controls (easy h -> 0, hard h -> 1):
- objects: 2-3 large ones (radius 0.2-0.3 of the image side) that never touch (easy, h < 1/3) ... 3-5 a little
  smaller (0.8x) that overlap partly (hard), large against the 16-pixel cells of a deep feature map; every class has its own shape (disc, square, triangle, cross, cycled);
- colour: each class has its own hue; every object is painted in its class hue up to h = 0.8, then the
  probability falls to 1/3 (h = 1); otherwise its two colours come from random classes;
- texture: each class has a stripe/checker/dot pattern (orientation, period); up to h = 0.55 an object carries
  its class's texture, beyond that more and more often another class's (a distractor; h >= 0.85 always);
  texture contrast grows with h;
- background: plain grey (every easy scene) ... blended (up to 60%) with a smooth two-colour field in class hues;
- camouflage: a random colour offset per block of about S/4 pixels (20 at the quickstart's 80x80; sigma 0 on
  easy scenes, up to 0.25 when h = 1), so that a small neighbourhood's colour misleads and only a view of the whole object averages it out;
- Gaussian pixel noise with sigma 0.15 * h**1.5 (below 0.03 for easy scenes);
- off in the default design: from h = rim_from on, the class hue only on a rim of each object, its inside neutral
  grey or another class's hue (a probe of what needs depth: results/README.md).
- off in the default design: a frame at the image border, in the hue of the class of the scene's anonymous objects
  (neutral grey, random shape and texture; from medium scenes on), so that only a view reaching the frame names it
  (another probe: results/README.md).
- off in the default design: scenes below h = odd_until hold only the odd classes, whose hues lie between the even
  ones' (a third probe: results/README.md).
So colour solves easy scenes with a shallow feature; hard scenes need a large receptive field (depth).
"""

from __future__ import annotations

import colorsys
import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from .dataset import SegDataset
from .errors import DataError

LEVELS = ("easy", "medium", "hard")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
DEFAULT_COUNTS = {"train": 512, "val": 128, "test": 128}
DEFAULT_CLASSES = 8
_SHAPES = ("disc", "square", "triangle", "cross")
# (pattern, orientation in degrees, period kind); ordered so the first classes differ the most.
_TEXTURES = [
    ("stripes", 0, "fine"), ("checker", 0, "fine"), ("stripes", 90, "fine"), ("dots", 0, "fine"),
    ("stripes", 45, "fine"), ("checker", 45, "fine"), ("stripes", 135, "fine"),
    ("stripes", 0, "coarse"), ("checker", 0, "coarse"), ("stripes", 90, "coarse"), ("dots", 0, "coarse"),
    ("stripes", 45, "coarse"), ("checker", 45, "coarse"), ("stripes", 135, "coarse"),
]
MAX_CLASSES = 1 + len(_TEXTURES) * len(_SHAPES)  # every object class a distinct (texture, shape) pair
# Images per split: a data set lists its images' ids and levels up front (about 50 s and 300 MB per million here),
# so a mistyped count is refused rather than filling the machine's memory.
MAX_IMAGES = 1_000_000
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
# Rendering uses only IEEE-exact arithmetic and sqrt (no sin/cos/pow, whose last bit varies between
# libm and SIMD builds), so a seed gives the same bytes on every machine with the same numpy.
_R2, _R3 = math.sqrt(0.5), math.sqrt(3.0) / 2.0
_COS_SIN = {0: (1.0, 0.0), 45: (_R2, _R2), 90: (0.0, 1.0), 135: (-_R2, _R2)}
_TRIANGLE_NORMALS = ((0.0, 1.0), (-_R3, -0.5), (_R3, -0.5))


@dataclass(frozen=True)
class SceneDesign:
    """How hardness h in [0, 1] maps to what a scene holds (see the module docstring); one frozen default, DESIGN.
    A ramp (a, b) is 0 up to h = a and rises linearly to 1 at h = b."""

    radius: tuple[float, float] = (0.2, 0.3)       # object radius, as a fraction of the image side
    colour_kept_until: float = 0.8                  # objects in their class hue up to this h (1/3 of them at h = 1)
    texture_kept_until: float = 0.55                # objects carry their class's texture up to this h
    field_weight: float = 0.6                       # background blended this far towards a field in class hues
    camo_block: float = 1 / 4                       # camouflage block, as a fraction of the image side
    camo_sigma: float = 0.25                        # camouflage colour offset at full strength
    camo_ramp: tuple[float, float] = (1 / 3, 1.0)
    cast_sigma: float = 0.0                         # one colour cast over the whole image, at full strength
    cast_ramp: tuple[float, float] = (1 / 3, 2 / 3)
    noise: float = 0.15                             # Gaussian pixel noise sigma at h = 1 (grows as h**1.5)
    rim_from: float = 2.0                           # from this h on, the class hue only on a rim (2: never)
    rim_width: float = 0.06                         # the rim, as a fraction of the image side
    rim_decoy: bool = False                         # the inside in another class's hue (else a neutral grey)
    frame_width: float = 0.0                        # context (0: off): a frame of this width (fraction of the side)
    anon_ramp: tuple[float, float] = (1 / 3, 2 / 3)  # in the hue of the class of the scene's anonymous objects (neutral
    anon_p: float = 0.5                             # looks; each object with probability anon_p * ramp(h)), else dark
    odd_until: float = 0.0                          # scenes below this h hold only the odd classes (hues far apart)


DESIGN = SceneDesign()


def _ramp(h: float, ab: tuple[float, float]) -> float:
    a, b = ab
    return float(np.clip((h - a) / max(b - a, 1e-9), 0.0, 1.0))


_GRAMMAR = "synthetic[:SEED[:N[:MIX]]] or synthetic:key=value,... with keys seed, n, train, val, test, mix, classes"


@dataclass(frozen=True)
class SyntheticSpec:
    """A parsed `synthetic...` spec."""

    seed: int = 0
    train: int = DEFAULT_COUNTS["train"]
    val: int = DEFAULT_COUNTS["val"]
    test: int = DEFAULT_COUNTS["test"]
    mix: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    classes: int | None = None  # None: the space's num_classes, else DEFAULT_CLASSES

    def count(self, split: str) -> int:
        """Number of images in `split`."""
        return getattr(self, split)


def _int_field(spec: str, name: str, text: str, lo: int, hi: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise DataError(f"data spec {spec!r}: {name}={text!r} is not an integer") from None
    if value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise DataError(f"data spec {spec!r}: {name}={value} must be {allowed}")
    return value


def _mix_field(spec: str, text: str) -> tuple[float, float, float]:
    if text in LEVELS:
        return tuple(float(level == text) for level in LEVELS)
    parts = text.split("/")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if len(weights) != 3 or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"data spec {spec!r}: mix={text!r} must be E/M/H (three non-negative weights of "
                        f"easy/medium/hard with a positive sum, e.g. 1/1/1) or one of easy, medium, hard")
    total = sum(weights)
    return tuple(w / total for w in weights)


def parse_synthetic(spec: str) -> SyntheticSpec:
    """Parse a `synthetic...` spec (grammar in the module docstring); DataError names the bad field."""
    if spec != "synthetic" and not spec.startswith("synthetic:"):
        raise DataError(f"data spec {spec!r} is not synthetic; expected {_GRAMMAR}")
    fields = [f for f in spec[len("synthetic:"):].replace(",", ":").split(":")] if ":" in spec else []
    values: dict[str, str] = {}
    positional = ("seed", "n", "mix")
    seen_keyword = False
    for i, field in enumerate(fields):
        field = field.strip()
        if not field:
            raise DataError(f"data spec {spec!r}: empty field {i + 1}; expected {_GRAMMAR}")
        if "=" in field:
            key, _, value = field.partition("=")
            key = key.strip()
            if key not in ("seed", "n", "train", "val", "test", "mix", "classes"):
                raise DataError(f"data spec {spec!r}: unknown key {key!r}; allowed: seed, n, train, val, test, mix, classes")
            seen_keyword = True
        else:
            if seen_keyword or i >= len(positional):
                raise DataError(f"data spec {spec!r}: unexpected positional field {field!r}; expected {_GRAMMAR}")
            key, value = positional[i], field
        if key in values:
            raise DataError(f"data spec {spec!r}: {key} given twice")
        values[key] = value.strip()
    counts = dict(DEFAULT_COUNTS)
    if "n" in values:
        n = _int_field(spec, "n", values["n"], 1, MAX_IMAGES)
        counts = {s: n for s in counts}
    for split in counts:
        if split in values:
            counts[split] = _int_field(spec, split, values[split], 1, MAX_IMAGES)
    return SyntheticSpec(
        seed=_int_field(spec, "seed", values.get("seed", "0"), 0, 2**63 - 1),
        mix=_mix_field(spec, values["mix"]) if "mix" in values else (1 / 3, 1 / 3, 1 / 3),
        classes=_int_field(spec, "classes", values["classes"], 2, MAX_CLASSES) if "classes" in values else None,
        **counts,
    )


def class_names(num_classes: int) -> list[str]:
    """Names of the synthetic classes: background, then shape_pattern+orientation_period."""
    names = ["background"]
    for c in range(1, num_classes):
        pattern, angle, period = _TEXTURES[(c - 1) % len(_TEXTURES)]
        names.append(f"{_class_shape(c)}_{pattern}{angle}_{period}")
    return names


def _class_shape(c: int) -> str:
    # Shift the shape cycle once per texture cycle so (texture, shape) pairs never repeat.
    k = c - 1
    return _SHAPES[(k + k // len(_TEXTURES)) % len(_SHAPES)]


@functools.lru_cache(maxsize=64)
def class_colours(num_classes: int) -> np.ndarray:
    """[K, 3] float32 RGB in [0, 1]: grey for background, evenly spaced saturated hues for objects."""
    colours = [(0.5, 0.5, 0.5)]
    for c in range(1, num_classes):
        value = 0.95 if c % 2 else 0.75  # alternate brightness so neighbouring hues stay apart
        colours.append(colorsys.hsv_to_rgb((c - 1) / (num_classes - 1), 0.85, value))
    out = np.asarray(colours, dtype=np.float32)
    out.flags.writeable = False  # cached and shared: never modified in place
    return out


@functools.lru_cache(maxsize=16)
def _grid(H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    ys.flags.writeable = False
    xs.flags.writeable = False
    return ys, xs


def image_level(seed: int, index: int, mix: tuple[float, float, float]) -> int:
    """Difficulty level (0 easy, 1 medium, 2 hard) of image `index` under `mix`."""
    offset = (seed % 1_000_003) * _GOLDEN  # a per-seed phase so seeds do not share the pattern
    u = (offset + index * _GOLDEN) % 1.0
    cdf = np.cumsum(mix)
    return int(min(np.searchsorted(cdf, u, side="right"), 2))


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def image_hardness(seed: int, split: str, index: int, mix) -> tuple[int, float]:
    """(level, hardness in [0, 1]) of one image, without rendering it."""
    level = image_level(seed, index, mix)
    return level, (level + float(_image_rng(seed, split, index).random())) / 3.0


def _texture(pattern: str, angle: float, period: float, xs: np.ndarray, ys: np.ndarray, phase) -> np.ndarray:
    """A {0, 1} float32 pattern over global coordinates (class identity: pattern, angle, period)."""
    c, s = _COS_SIN[angle]
    u = (xs * c + ys * s) / period + phase[0]
    if pattern == "stripes":
        return ((u - np.floor(u)) < 0.5).astype(np.float32)
    v = (-xs * s + ys * c) / period + phase[1]
    if pattern == "checker":
        return ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    du, dv = u - np.floor(u) - 0.5, v - np.floor(v) - 0.5
    return (du * du + dv * dv < 0.09).astype(np.float32)


def _class_texture(c: int, periods: dict, xs: np.ndarray, ys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class c's texture over (xs, ys) at a random phase drawn from rng."""
    pattern, angle, period = _TEXTURES[(c - 1) % len(_TEXTURES)]
    return _texture(pattern, angle, periods[period], xs, ys, rng.uniform(0, 1, size=2))


def _far(dx: float, dy: float, dist: float) -> bool:
    return dx * dx + dy * dy >= dist * dist


def _tri(x: np.ndarray) -> np.ndarray:
    """A triangle wave in [0, 1] with period 1 (a smooth-enough stand-in for a sinusoid)."""
    return 2.0 * np.abs(x - np.floor(x) - 0.5)


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    """`mask` shrunk by k pixels (k steps of a 3x3 erosion; outside the box counts as outside)."""
    m = mask
    for _ in range(k):
        p = np.pad(m, 1)
        m = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:] & p[:-2, :-2] & p[2:, 2:] & p[:-2, 2:] & p[2:, :-2]
    return m


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Inside test in object coordinates (u, v already rotated and centred)."""
    if shape == "disc":
        ua, vb = u / a, v / b
        return ua * ua + vb * vb <= 1.0
    if shape == "square":
        return (np.abs(u) <= a * 0.85) & (np.abs(v) <= b * 0.85)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= a) & (av <= 0.35 * b)) | ((au <= 0.35 * a) & (av <= b))
    # Equilateral triangle with circumradius a: inside all three half-planes.
    inside = np.ones(u.shape, dtype=bool)
    for nx, ny in _TRIANGLE_NORMALS:
        inside &= u * nx + v * ny <= a * 0.5
    return inside


def render_scene(seed: int, split: str, index: int, size: tuple[int, int], num_classes: int = DEFAULT_CLASSES,
                 mix=(1 / 3, 1 / 3, 1 / 3), design: SceneDesign | None = None
                 ) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Render image `index` of `split`: (uint8 HxWx3 image, uint8 HxW mask, level, hardness)."""
    d = DESIGN if design is None else design
    H, W = size
    level = image_level(seed, index, mix)
    rng = _image_rng(seed, split, index)
    h = (level + float(rng.random())) / 3.0
    colours = class_colours(num_classes)
    S = min(H, W)
    periods = {"fine": max(3.0, round(6 * S / 128)), "coarse": max(4.0, round(10 * S / 128))}
    ys, xs = _grid(H, W)

    # Background: plain grey for easy scenes, blended towards a smooth field in class hues when hard.
    grey = np.float32(rng.uniform(0.42, 0.58))
    # Channel-first while rendering: numpy broadcasts a [3, 1, 1] colour far faster than a trailing 3.
    img = np.full((3, H, W), grey, dtype=np.float32)
    w_field = d.field_weight * _ramp(h, (1 / 3, 5 / 6))  # 0 for every easy scene
    ca, cb = colours[rng.integers(1, num_classes, size=2)][:, :, None, None]
    fx, fy = rng.uniform(0.5, 2.0, size=2) / S
    ph = rng.uniform(0, 1, size=2)
    if w_field > 0:
        # Separable field: a row wave plus a column wave, blended per pixel in one broadcast.
        f = 0.5 * (_tri(xs[:1] * fx + ph[0]) + _tri(ys[:, :1] * fy + ph[1]))  # [H, W] in [0, 1]
        start = grey + w_field * (ca - grey)
        img = start + (w_field * (cb - ca)) * f
    mask = np.zeros((H, W), dtype=np.uint8)
    # Context (off by default, and then no draw, so the default scenes keep their bytes): an anonymous object looks
    # like no class, and only the frame, far from most of it, names its class (the same for every one in the scene).
    p_anon = d.anon_p * _ramp(h, d.anon_ramp) if d.frame_width > 0 else 0.0
    ctx = int(rng.integers(1, num_classes)) if p_anon > 0 else 0
    any_anon = False

    # Objects, painted back to front (later ones occlude earlier ones).
    n_obj = int(rng.integers(round(2 + h), round(3 + 2 * h) + 1))
    # Colour names the class on every easy and medium scene; on hard scenes more and more often not.
    p_class_colour = 1.0 - _ramp(h, (d.colour_kept_until, d.colour_kept_until + 0.3))
    # Texture names the class up to h = 0.55; beyond, it is more and more often another class's texture
    # (a distractor), so on hard scenes only the object's shape, seen whole, tells its class.
    p_class_texture = 1.0 - _ramp(h, (d.texture_kept_until, d.texture_kept_until + 0.3))
    amp = 0.3 + 0.7 * h
    placed: list[tuple[float, float, float]] = []
    for _ in range(n_obj):
        cls = int(rng.integers(1, num_classes))
        if h < d.odd_until:
            cls = 2 * int(rng.integers(0, num_classes // 2)) + 1
        anon = p_anon > 0 and bool(rng.random() < p_anon)
        if anon:
            cls, any_anon = ctx, True
        r = S * float(rng.uniform(*d.radius)) * (1.0 - 0.2 * h)
        b = r * float(rng.uniform(0.7, 1.0))
        rx, ry = (float(t) for t in rng.standard_normal(2))
        norm = math.sqrt(rx * rx + ry * ry) or 1.0
        cos_r, sin_r = rx / norm, ry / norm  # a uniformly random rotation, without trigonometry
        sep = min(1.0, max(0.5, 2.0 - 2.0 * h))  # easy: separated; medium and hard: partial overlap
        for _try in range(30):
            cx, cy = float(rng.uniform(0.1 * W, 0.9 * W)), float(rng.uniform(0.1 * H, 0.9 * H))
            if all(_far(cx - px, cy - py, sep * (r + pr + 3)) for px, py, pr in placed):
                break
        else:
            continue  # no room left for a separated object: fewer objects, never overlap in easy scenes
        placed.append((cx, cy, r))
        y0, y1 = max(0, int(cy - r - 1)), min(H, int(math.ceil(cy + r + 1)))
        x0, x1 = max(0, int(cx - r - 1)), min(W, int(math.ceil(cx + r + 1)))
        if y0 >= y1 or x0 >= x1:
            continue
        bx, by = xs[y0:y1, x0:x1], ys[y0:y1, x0:x1]
        dx, dy = bx - cx, by - cy
        u = dx * cos_r + dy * sin_r
        v = dy * cos_r - dx * sin_r
        shape = _SHAPES[int(rng.integers(len(_SHAPES)))] if anon else _class_shape(cls)
        inside = _shape_mask(shape, u, v, r, b)
        tex_cls = cls
        if anon or rng.random() >= p_class_texture:
            tex_cls = int(rng.integers(1, num_classes))
        tex = _class_texture(tex_cls, periods, bx, by, rng)
        if anon:   # a neutral grey: no class's hue
            col_a = np.full(3, np.float32(rng.uniform(0.3, 0.7)), dtype=np.float32)
            col_b = col_a * 0.45
        elif rng.random() < p_class_colour:
            col_a = colours[cls]
            col_b = col_a * 0.45
        else:  # colours shared between classes: only texture and shape tell the class
            ia, ib = rng.integers(1, num_classes, size=2)
            col_a, col_b = colours[ia], colours[ib] * (0.45 if ia == ib else 1.0)
        paint = col_a[:, None, None] + (col_b - col_a)[:, None, None] * (amp * tex)
        if h >= d.rim_from:  # the class hue on a rim only: the inside needs a view that reaches the rim
            inner = _erode(inside, max(1, round(S * d.rim_width)))
            if d.rim_decoy:
                in_a = colours[int(rng.integers(1, num_classes))]
            else:
                in_a = np.full(3, np.float32(rng.uniform(0.3, 0.7)), dtype=np.float32)
            in_tex = _class_texture(int(rng.integers(1, num_classes)), periods, bx, by, rng)
            in_paint = in_a[:, None, None] * (1.0 - 0.55 * amp * in_tex)
            paint = np.where(inner, in_paint, paint)
        img[:, y0:y1, x0:x1] = np.where(inside, paint, img[:, y0:y1, x0:x1])
        mask[y0:y1, x0:x1][inside] = cls
    if d.frame_width > 0:   # background, in the anonymous objects' class hue (dark grey where there are none)
        fw = max(1, round(S * d.frame_width))
        ring = np.ones((H, W), dtype=bool)
        ring[fw:H - fw, fw:W - fw] = False
        img[:, ring] = colours[ctx][:, None] if any_anon else np.float32(0.15)
        mask[ring] = 0

    # Camouflage: a colour offset per block of about S/4 pixels (0 on easy scenes, growing with h), so that a
    # small neighbourhood's colour misleads and only a view of the whole object (a deep feature) averages it out.
    sigma_c = d.camo_sigma * _ramp(h, d.camo_ramp)
    if sigma_c > 0:
        blk = max(2, round(S * d.camo_block))
        gh, gw = H // blk + 2, W // blk + 2
        lo = rng.standard_normal((3, gh, gw), dtype=np.float32) * np.float32(sigma_c)
        oy, ox = (int(v) for v in rng.integers(0, blk, size=2))
        img += np.repeat(np.repeat(lo, blk, axis=1), blk, axis=2)[:, oy:oy + H, ox:ox + W]
    sigma_cast = d.cast_sigma * _ramp(h, d.cast_ramp)
    if sigma_cast > 0:  # one offset for the whole image: only a view that includes the background undoes it
        img += (rng.standard_normal(3) * sigma_cast).astype(np.float32)[:, None, None]
    sigma = d.noise * h * math.sqrt(h)
    if sigma > 0:
        img += rng.standard_normal((3, H, W), dtype=np.float32) * np.float32(sigma)
    img *= 255.0
    img += 0.5
    out = np.clip(img, 0, 255, out=img).astype(np.uint8).transpose(1, 2, 0)
    return np.ascontiguousarray(out), mask, level, h


RENDERED_BYTES = 1 << 28   # renderings a SyntheticDataset keeps in memory (the quickstart's: 4 MB)


class SyntheticDataset(SegDataset):
    """Synthetic scenes rendered on the fly at input_size; `.difficulty` and `.hardness` per image."""

    kind = "synthetic"

    def __init__(self, spec: SyntheticSpec, split: str, input_size, train: bool = False,
                 ignore_index: int = 255, num_classes: int | None = None):
        k = num_classes if num_classes is not None else DEFAULT_CLASSES
        if not 2 <= k <= MAX_CLASSES:
            raise DataError(f"synthetic data supports 2..{MAX_CLASSES} classes, not num_classes={k}")
        n = spec.count(split)
        ids = [f"synthetic-{spec.seed}-{split}-{i:06d}" for i in range(n)]
        super().__init__(split, input_size, train, ignore_index, k, class_names(k), ids)
        self.spec = spec
        levels, hardness = zip(*(image_hardness(spec.seed, split, i, spec.mix) for i in range(n)))
        self.level = np.asarray(levels, dtype=np.int64)  # 0 easy, 1 medium, 2 hard
        self.difficulty = [LEVELS[v] for v in levels]
        self.hardness = np.asarray(hardness, dtype=np.float64)
        self._rendered = {}   # index -> (image, mask): a scene renders once per process, not once per epoch
        h, w = self.input_size
        self._keep = RENDERED_BYTES // (4 * h * w)   # how many renderings fit the budget (image and mask: 4 B/px)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_rendered"] = {}   # a copy renders its own: pickles (DataLoader workers, Ray actors) stay small
        return state

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Render image i at input_size (uint8 image, uint8 mask); copies of the first rendering after the first."""
        if i in self._rendered:
            img, mask = self._rendered[i]
            return img.copy(), mask.copy()
        img, mask, _, _ = render_scene(self.spec.seed, self.split, i, self.input_size, self.num_classes,
                                       self.spec.mix)
        if len(self._rendered) < self._keep:
            self._rendered[i] = (img.copy(), mask.copy())
        return img, mask
