"""Atomic file writing: a crash never leaves half a file in place."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from .errors import MessError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; on success move it into place, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_with(path: str | os.PathLike, write) -> None:
    """Call write(f) on a binary file that becomes `path` atomically, flushed to disk (e.g. torch.save(obj, f)
    straight to disk, without a copy in memory)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_text(text: str) -> str:
    """Hex SHA-256 of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_weights_only(path, what: str, map_location="cpu"):
    """torch.load(weights_only=True), with a MessError naming the file and `what` it should be when it fails."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise MessError(f"{path}: {what} not found") from None
    except Exception as e:  # a corrupt file, or one holding code rather than tensors
        raise MessError(f"{path}: not {'an' if what[:1] in 'aeiou' else 'a'} {what} that torch.load(weights_only=True) "
                        f"reads ({_why_unreadable(path, e)})") from None


def _why_unreadable(path, e: Exception) -> str:
    """Why torch.load refused a file, in words: what its first bytes say it is, else torch's own message."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = None
    if head == b"":
        return "the file is empty"
    if head is not None and head != b"PK\x03\x04" and head[:1] != b"\x80":
        # torch.save writes a zip archive (PK..), older versions a pickle (protocol byte 0x80)
        return f"it is not a torch.save file: it starts with {head!r}, not a zip archive or a pickle"
    if "Weights only load failed" in str(e):
        return "it holds Python objects other than tensors, which weights_only=True refuses to unpickle"
    if head == b"PK\x03\x04":
        return "a damaged zip archive (truncated or corrupt): " + " ".join(str(e).split())[:120]
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:300]


def check_writable(path: str | os.PathLike, folder: bool = False, flag: str = "--out") -> None:
    """Refuse, before any work starts, an output path that cannot be written: a file path that is a folder (or a
    folder path that is a file), a path under a file, or one whose folder is not writable (tried, not guessed)."""
    import tempfile

    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise MessError(f"{flag} {path}: is a file; give a folder")
    if not folder and path.is_dir():
        raise MessError(f"{flag} {path}: is a folder; give a file path (e.g. {path / 'NAME'})")
    parent = path if folder else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MessError(f"{flag} {path}: {parent} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".messearch-probe-"):
            pass
    except OSError as e:
        raise MessError(f"{flag} {path}: cannot write in {parent} ({e.strerror or e})") from None


def check_not_input(path: str | os.PathLike, inputs: dict, flag: str = "--out") -> None:
    """Refuse an output path that is one of the command's inputs, or a file in an input folder (a cache's manifest or
    shard): writing it would destroy what the command reads. `inputs` maps a name (`--front`) to a path, a list of
    paths, or None."""
    out = Path(path).resolve()
    for name, given in inputs.items():
        for p in [given] if isinstance(given, (str, os.PathLike)) else given or []:
            p = Path(p).resolve()
            if out == p:
                raise MessError(f"{flag} {path}: is the {name} {'folder' if p.is_dir() else 'file'} this command "
                                f"reads; give another path")
            if p.is_dir() and p in out.parents and out.exists():
                raise MessError(f"{flag} {path}: is a file of the {name} folder this command reads; give another "
                                f"path")
