"""What is in a cache, and how to read it: the typed `Manifest`, the shard layout, and `load_cache`.

A cache folder holds `manifest.json` (a Manifest) and one Parquet file per shard (a contiguous range of
the split's images), laid out as SHARD_COLUMNS says. `load_cache` checks every shard against the manifest's
hashes and returns the whole cache as contiguous arrays (`CacheArrays`), the form the search reads.
This module imports neither torch nor Ray: the search runs wherever numpy and pyarrow do.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .errors import MessError
from .files import sha256_file, sha256_text

FORMAT = "messearch/cache-v1"

# One row per image; per-exit arrays are flattened exit-major into fixed-size lists. The layout is data (it is
# written into every manifest), so editing a docstring never changes an artefact.
SHARD_COLUMNS = {
    "index": "int64: position of the image in the split",
    "image_id": "string",
    "n_pixels": "int64: pixels of the image (the denominator of the confidence fraction)",
    "gt": "list<int64>[C]: labelled pixels per class (ignore-index pixels excluded)",
    "tp": "list<int64>[E*C]: true positives per exit and class",
    "pred": "list<int64>[E*C]: predicted pixels per exit and class",
    "conf_mean": "list<double>[E]: mean top-1 softmax probability per exit",
    "n_above": "list<int64>[E*(n_bins+1)]: pixels whose top-1 probability is >= k/n_bins, per exit",
    "confusion": "list<int64>[E*C*C], only with keep_confusion: row = label, column = prediction",
}
EXIT_AXIS = "E = P*H + 1: the candidate exits in net.exits order (position-major, then head order), the final head last"


def shard_layout() -> dict:
    """The layout description every manifest records."""
    return {"columns": dict(SHARD_COLUMNS), "exits": EXIT_AXIS}


# The JSON types of the manifest's fields, by their annotation: a hand-edited one of another type is refused by name.
_FIELD_TYPES = {"str": (str,), "int": (int,), "list": (list,), "dict": (dict,), "bool": (bool,),
                "str | None": (str, type(None))}


@dataclass
class Manifest:
    """manifest.json: what the cache was built from, how, and which shard files (with hashes) it holds.

    `shards[k]` is None until shard k is written, then {index, start, stop, file, rows, sha256, worker}.
    """

    checkpoint: str
    checkpoint_sha256: str
    space_text: str
    space_source: str
    data: str
    split: str
    n_images: int
    num_classes: int
    ignore_index: int
    input_size: list
    n_bins: int
    policy: dict
    positions: list
    heads: list
    exits: list                     # [position, head] per exit, ["<final>", "final"] last
    batch_size: int
    shard_size: int
    keep_confusion: bool
    plan: list                      # [start, stop] per shard
    image_ids: list                 # the image ids of each shard
    shards: list                    # per shard: its record, or None while not written
    format: str = FORMAT
    complete: bool = False
    layout: dict = field(default_factory=shard_layout)
    workers: list = field(default_factory=list)    # {host, pid, device, threads} of each actor that wrote a shard
    retries: list = field(default_factory=list)    # {shard, error} of each shard redone after an actor died
    recomputed: list = field(default_factory=list)  # shards computed by the latest run
    cache_sha256: str | None = None
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON form of manifest.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where) -> "Manifest":
        """The manifest of a parsed manifest.json; a missing field is a MessError naming it."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise MessError(f"{where}: not a messearch cache manifest (expected format {FORMAT!r})")
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise MessError(f"{where}: the cache manifest lacks {missing}; rebuild the cache with `messearch cache`")
        for f in fields(cls):
            kinds = _FIELD_TYPES.get(str(f.type))
            if f.name in d and kinds and not (isinstance(d[f.name], kinds) and not
                                              (isinstance(d[f.name], bool) and bool not in kinds)):
                raise MessError(f"{where}: the cache manifest's {f.name} is {json.dumps(d[f.name])[:40]}, not "
                                f"{str(f.type).replace(' | None', ' or null')}; rebuild the cache with `messearch cache`")
        for k, rec in enumerate(d["shards"]):
            if rec is None and not d.get("complete"):
                continue
            if not (isinstance(rec, dict) and isinstance(rec.get("file"), str) and isinstance(rec.get("sha256"), str)
                    and all(isinstance(rec.get(x), int) and not isinstance(rec.get(x), bool) for x in ("start", "stop"))):
                raise MessError(f"{where}: the cache manifest's shard record {k} is {json.dumps(rec)[:60]}, not "
                                f"{{file, sha256, start, stop}}; rebuild the cache with `messearch cache`")
        return cls(**{k: v for k, v in d.items() if k in known})

    def format_summary(self, out_dir) -> str:
        """One line for the end of `messearch cache`: images, exits, shards (computed now, retried), size, hash."""
        size = sum((Path(out_dir) / s["file"]).stat().st_size for s in self.shards if s)
        return (f"cache {out_dir}: {self.n_images} images x {len(self.exits)} exits ({len(self.exits) - 1} candidates "
                f"+ final), {self.num_classes} classes, {len(self.shards)} shards ({len(self.recomputed)} computed now, "
                f"{len(self.retries)} retried), {size / 1e6:.2f} MB; cache_sha256 {str(self.cache_sha256)[:12]}")

    def meta(self) -> dict:
        """Everything but the shard records, as CacheArrays.meta."""
        return {k: v for k, v in self.to_dict().items() if k != "shards"}



@dataclass
class CacheArrays:
    """The whole cache as contiguous arrays (the form the search wants).

    Exit index e runs over the candidate exits in space order (position-major, then head variant order),
    and the final head is the last index E-1. Counts are int64; nothing the search sums is rounded.
    """

    image_ids: list[str]            # N
    positions: list[str]            # P candidate positions, in depth order
    heads: list[str]                # H head variant names, in space order
    tp: np.ndarray                  # int64 [N, E, C], E = P*H + 1
    pred: np.ndarray                # int64 [N, E, C]
    gt: np.ndarray                  # int64 [N, C]
    conf_mean: np.ndarray           # float64 [N, E] mean top-1 probability
    n_above: np.ndarray             # int64 [N, E, n_bins+1] pixels with top-1 >= k/n_bins
    n_pixels: np.ndarray            # int64 [N] pixels per image (the confidence denominator)
    meta: dict = field(default_factory=dict)  # the manifest's fields but its shard records, and cache_dir

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def n_exits(self) -> int:
        """Number of candidate exits, final head excluded."""
        return len(self.positions) * len(self.heads)

    def exit_index(self, position: str, head: str) -> int:
        """Index of candidate exit (position, head) along the exit axis."""
        return self.positions.index(position) * len(self.heads) + self.heads.index(head)


# ------------------------------------------------------------------------------------------------ reading

def read_manifest(out_dir: Path) -> Manifest | None:
    """The Manifest of the cache in `out_dir`, or None when there is none; an unreadable one is a MessError."""
    path = Path(out_dir) / "manifest.json"
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MessError(f"{path}: unreadable cache manifest ({e})") from None
    return Manifest.from_dict(raw, path)


def shard_ok(out_dir: Path, rec: dict | None) -> bool:
    """True when the shard record's file exists and has the recorded sha256."""
    if not rec:
        return False
    path = Path(out_dir) / rec["file"]
    return path.exists() and sha256_file(path) == rec["sha256"]


# What a cache holds besides its shards' bytes: cache_sha256 covers these fields too, so that a manifest edited by
# hand (exits reordered, another policy or image count) is refused instead of mislabelling every statistic.
IDENTITY_FIELDS = ("format", "checkpoint_sha256", "space_text", "data", "split", "n_images", "num_classes",
                   "ignore_index", "input_size", "n_bins", "policy", "positions", "heads", "exits", "batch_size",
                   "shard_size", "keep_confusion", "plan", "image_ids")


def cache_sha256(m: Manifest) -> str:
    """The cache's hash: of its identity fields (IDENTITY_FIELDS, canonical JSON) and its shards' hashes, in order."""
    identity = json.dumps({k: getattr(m, k) for k in IDENTITY_FIELDS}, sort_keys=True, separators=(",", ":"))
    return sha256_text(identity + "".join(s["sha256"] for s in m.shards))


def check_consistent(m: Manifest, where) -> None:
    """MessError when the manifest's metadata disagrees with its hash or with itself (exits vs space, image counts)."""
    if m.cache_sha256 != cache_sha256(m):
        raise MessError(f"{where}/manifest.json: its metadata no longer matches its cache_sha256 (edited by hand, or "
                        f"written by an older messearch); `messearch cache --checkpoint {m.checkpoint} --out {where} "
                        f"--resume` (with the settings it was built with) re-verifies the shards and rewrites it")
    from_space = [[p, h] for p in m.positions for h in m.heads] + [["<final>", "final"]]
    counts = (m.n_images, sum(len(ids) for ids in m.image_ids), sum(hi - lo for lo, hi in m.plan))
    if [list(e) for e in m.exits] != from_space or len(set(counts)) != 1:
        raise MessError(f"{where}/manifest.json: its exits or image counts disagree with its own positions, heads and "
                        f"shards; rebuild the cache with `messearch cache`")


def check_expected(m: Manifest, where, expect_checkpoint_sha256=None, expect_space_text=None) -> None:
    """MessError when the cache was built from another checkpoint or space than expected."""
    if expect_checkpoint_sha256 is not None and m.checkpoint_sha256 != expect_checkpoint_sha256:
        raise MessError(f"{where}: this cache was built from checkpoint sha256 {str(m.checkpoint_sha256)[:16]}..., "
                        f"not the given one ({expect_checkpoint_sha256[:16]}...); rebuild it with `messearch cache`")
    if expect_space_text is not None and m.space_text != expect_space_text:
        raise MessError(f"{where}: this cache was built for another search space (space_text differs); "
                        f"rebuild it with `messearch cache` from this space's checkpoint")


def _column(table, name: str, shape: tuple) -> np.ndarray:
    col = table.column(name).combine_chunks()
    values = col.flatten() if hasattr(col, "flatten") else col
    return values.to_numpy(zero_copy_only=False).reshape(shape)


def _complete_manifest(out_dir: Path, expect_checkpoint_sha256=None, expect_space_text=None) -> Manifest:
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise MessError(f"{out_dir}: no cache here (manifest.json missing); build one with `messearch cache`")
    check_expected(manifest, out_dir, expect_checkpoint_sha256, expect_space_text)
    if not manifest.complete:
        raise MessError(f"{out_dir}: the cache is incomplete; finish it with `messearch cache ... --resume`")
    check_consistent(manifest, out_dir)
    return manifest


def load_cache(out_dir, expect_checkpoint_sha256: str | None = None, expect_space_text: str | None = None,
               verify: bool = True) -> CacheArrays:
    """The whole cache in `out_dir` as contiguous arrays; every shard's hash is checked, and a cache of another
    checkpoint or space (when expectations are given) is refused with a MessError."""
    out_dir = Path(out_dir)
    manifest = _complete_manifest(out_dir, expect_checkpoint_sha256, expect_space_text)
    n, c, e, k = manifest.n_images, manifest.num_classes, len(manifest.exits), manifest.n_bins + 1
    arrays = {"tp": np.empty((n, e, c), np.int64), "pred": np.empty((n, e, c), np.int64), "gt": np.empty((n, c), np.int64),
              "conf_mean": np.empty((n, e), np.float64), "n_above": np.empty((n, e, k), np.int64),
              "n_pixels": np.empty(n, np.int64)}
    ids: list[str] = []
    for rec in manifest.shards:
        path = out_dir / rec["file"]
        if verify and not shard_ok(out_dir, rec):
            raise MessError(f"{path}: missing or its sha256 does not match the manifest; "
                            f"recompute it with `messearch cache ... --resume`")
        t = pq.read_table(path)
        lo, hi = rec["start"], rec["stop"]
        if t.num_rows != hi - lo or t.column("index").to_pylist() != list(range(lo, hi)):
            raise MessError(f"{path}: rows do not match the manifest's images {lo}..{hi - 1}")
        m = hi - lo
        for name, arr in arrays.items():
            arr[lo:hi] = _column(t, name, (m,) + arr.shape[1:])
        ids.extend(t.column("image_id").to_pylist())
    meta = manifest.meta()
    meta["cache_dir"] = str(out_dir)
    return CacheArrays(image_ids=ids, positions=list(manifest.positions), heads=list(manifest.heads), meta=meta,
                       **arrays)


def load_confusion(out_dir) -> np.ndarray:
    """The per-(image, exit) confusion matrices int64 [N, E, C, C] of a cache built with keep_confusion."""
    out_dir = Path(out_dir)
    load_cache(out_dir)   # verifies completeness and hashes
    manifest = read_manifest(out_dir)
    if not manifest.keep_confusion:
        raise MessError(f"{out_dir}: built without --keep-confusion; rebuild with it to get confusion matrices")
    n, c, e = manifest.n_images, manifest.num_classes, len(manifest.exits)
    shards = manifest.shards
    return np.concatenate([_column(pq.read_table(out_dir / s["file"]), "confusion", (s["stop"] - s["start"], e, c, c))
                           for s in shards]) if shards else np.empty((n, e, c, c), np.int64)
