"""The MESS checkpoint `mess.pt`: backbone, final head and every candidate head, with the space that built them.

Plain tensors, strings, numbers, lists and dicts only, so that `torch.load(weights_only=True)` reads it.
"""

from __future__ import annotations

import io
import platform

import torch
import torchvision

from . import __version__
from .errors import MessError
from .files import atomic_write_bytes, load_weights_only
from .model import MESSNetwork
from .space import Space, space_from_text

FORMAT = "messearch/mess-checkpoint-v1"


def versions() -> dict:
    """Versions of what produced a file, recorded for provenance."""
    return {"messearch": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version()}


def save_checkpoint(path, net: MESSNetwork, data_spec: str, exit_miou: dict | None = None, extra: dict | None = None) -> None:
    """Write `net` and its space to `path` atomically."""
    payload = {
        "format": FORMAT,
        "space_text": net.space.text,
        "space_source": net.space.source,
        "data": data_spec,
        "exits": [list(e) for e in net.exits],
        # contiguous: training may run channels_last; the file stays in one layout whatever trained it
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
        "exit_miou": dict(exit_miou or {}),
        "versions": versions(),
        "extra": dict(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


# The fields every reader of a checkpoint indexes, with their types.
_FIELDS = {"space_text": str, "exits": list, "state_dict": dict}


def check_payload(payload: dict, path) -> dict:
    """`payload` (a MESS checkpoint's dict) when it holds the fields readers index; a MessError naming the field."""
    for name, kind in _FIELDS.items():
        if not isinstance(payload.get(name), kind):
            raise MessError(f"{path}: field {name!r} is missing or not a {kind.__name__}; not a whole messearch MESS "
                            f"checkpoint (train again, or use the file `messearch train` wrote)")
    return payload


def read_checkpoint(path, map_location="cpu") -> dict:
    """The raw checkpoint dict, loaded with weights_only=True; a clear error if it is not a MESS checkpoint."""
    payload = load_weights_only(path, "checkpoint", map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise MessError(f"{path}: not a messearch MESS checkpoint (expected format {FORMAT!r})")
    return check_payload(payload, path)


def load_checkpoint(path, map_location="cpu") -> tuple[MESSNetwork, Space, dict]:
    """The MESS network (eval mode) and space stored in `path`, and the checkpoint's other fields."""
    payload = read_checkpoint(path, map_location)
    space = space_from_text(payload["space_text"], payload.get("space_source") or f"{path}:space")
    net = MESSNetwork(space, exits=[tuple(e) for e in payload["exits"]])
    try:
        net.load_state_dict(payload.pop("state_dict"))
    except RuntimeError as e:   # missing, unexpected or mis-shaped tensors
        first = " ".join(str(e).split())[:200]
        raise MessError(f"{path}: its weights do not fit the network of its own space ({first})") from None
    return net.eval(), space, payload
