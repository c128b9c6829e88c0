"""Initial weights of a MESS network (`--init-checkpoint`), recognised by their shape.

Accepted, each loaded with torch.load(weights_only=True):
- a messearch `mess.pt` of the same model and class count (backbone and final head);
- a torchvision segmentation state dict of the same model. The auxiliary head, which MESS does not
  use, is skipped; with another class count the last classifier layer is skipped and starts fresh;
- an ImageNet classification state dict of the backbone (torchvision resnet18/34/50/101,
  mobilenet_v3_large): the backbone loads, the classification layer (`fc` / `classifier`) is skipped,
  the segmentation head starts fresh (torchvision's own `weights_backbone` recipe);
- either state dict wrapped as torchvision's reference scripts save it (`{"model": ..., "args": ...}`)
  or with DataParallel's `module.` prefix.
Anything else is a MessError that says what the file looks like and what is accepted. The returned
InitReport says, tensor by tensor, what was loaded and what was left; it is the provenance in mess.pt.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .backbones import MODELS, build_torchvision_model
from .checkpoint import FORMAT, check_payload
from .errors import MessError
from .files import load_weights_only, sha256_file
from .model import MESSNetwork
from .space import Space, space_from_text

# Classification layer and backbone-key prefix of each ImageNet classifier a segmentation backbone comes from.
CLASSIFIERS = {"resnet18": ("fc.", ""), "resnet34": ("fc.", ""), "resnet50": ("fc.", ""),
               "resnet101": ("fc.", ""), "mobilenet_v3_large": ("classifier.", "features.")}
AUX = "aux_classifier."


@dataclass
class InitReport:
    """What `--init-checkpoint` loaded: the file, its shape, and every tensor loaded, skipped (with why) or left fresh."""

    path: str
    kind: str  # "mess", "segmentation" or "classification"
    source: str  # the model the file holds, e.g. "deeplabv3_resnet18 (21 classes)" or "resnet18 (ImageNet)"
    wrapped: str = ""  # "model" for reference-script checkpoints, "module." for DataParallel prefixes
    sha256: str = ""
    loaded: list[str] = field(default_factory=list)  # keys of the model's base (backbone + final head)
    skipped: dict[str, str] = field(default_factory=dict)  # file key -> why it was not loaded
    fresh: list[str] = field(default_factory=list)  # model keys left newly initialised

    @property
    def complete(self) -> bool:
        """True when the whole original model (backbone and final head) came from the file."""
        return not self.fresh

    def provenance(self) -> dict:
        """Plain values for mess.pt's `extra.init`."""
        return asdict(self)

    def summary(self) -> str:
        """A few lines for the terminal: what was loaded, skipped (and why) and left newly initialised."""
        how = {"model": ", a reference-script checkpoint ({'model': ...})", "module.": ", 'module.' prefix removed"}
        lines = [f"init: {self.path}: {self.kind} weights of {self.source}{how.get(self.wrapped, '')}; "
                 f"{len(self.loaded)} tensors loaded"]
        by_reason: dict[str, list[str]] = {}
        for k, why in self.skipped.items():
            by_reason.setdefault(why, []).append(k)
        for why, keys in by_reason.items():
            lines.append(f"  skipped {_names(keys)}: {why}")
        if self.fresh:
            lines.append(f"  newly initialised: {_names(self.fresh)}")
        return "\n".join(lines)


def _names(keys: list[str]) -> str:
    if len(keys) <= 4:
        return ", ".join(keys)
    prefixes = sorted({k.split(".")[0] + "." for k in keys})
    return f"{len(keys)} tensors ({', '.join(p + '*' for p in prefixes)})"


def backbone_arch(model_name: str) -> str:
    """The torchvision classifier a segmentation model's backbone is (`deeplabv3_resnet50` -> `resnet50`; a dilated
    `_os8` variant has the same weights as its plain backbone)."""
    return model_name.split("_", 1)[1].removesuffix("_os8")


def last_layer_keys(model_name: str) -> list[str]:
    """Keys of the final head's last classifier layer(s): the tensors whose first dimension is the class count."""
    with torch.device("meta"):
        a, b = (build_torchvision_model(model_name, n).state_dict() for n in (3, 5))
    return [k for k in a if a[k].shape != b[k].shape]


def _num_classes(state: dict, model_name: str) -> int | None:
    last = [k for k in last_layer_keys(model_name) if k in state and state[k].ndim]
    return int(state[last[0]].shape[0]) if last else None


def _read(path: str):
    # torchvision's reference scripts store their argparse.Namespace beside the weights: plain data, allowed.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_weights_only(path, "init checkpoint")


def _unwrap(payload, path: str) -> tuple[dict, str]:
    wrapped = ""
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        payload, wrapped = payload["model"], "model"
    if not isinstance(payload, dict) or not payload or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        raise MessError(f"{path}: not a state dict (a mapping of names to tensors) but {_describe(payload)}; "
                        f"{ACCEPTED}")
    if all(k.startswith("module.") for k in payload):
        payload, wrapped = {k[len("module."):]: v for k, v in payload.items()}, wrapped or "module."
    return payload, wrapped


def _describe(obj) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {sorted(map(str, obj))[:5]}" if obj else "an empty dict"
    return f"a {type(obj).__name__}"


ACCEPTED = ("accepted: a messearch mess.pt of the same model, a torchvision segmentation state dict of the same "
            "model (any class count), or an ImageNet classification state dict of its backbone (torchvision "
            "resnet18/34/50/101, mobilenet_v3_large), each optionally wrapped as {'model': ...}")


def load_init(net: nn.Module, path: str) -> InitReport:
    """Load `path` into a MESSNetwork's base (backbone + final head) and return what was loaded and left.

    MessError (naming the file, what it looks like and what is accepted) for anything that does not fit."""
    payload = _read(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        report = _load_mess(net, payload, path)
    else:
        state, wrapped = _unwrap(payload, path)
        report = load_state_dict_into(net.base, state, net.space.model, net.space.num_classes, path)
        report.wrapped = wrapped
    report.sha256 = sha256_file(path)
    return report


def _load_mess(net: nn.Module, payload: dict, path: str) -> InitReport:
    check_payload(payload, path)
    other = space_from_text(payload["space_text"], f"{path}:space")
    space = net.space
    if (other.model, other.num_classes) != (space.model, space.num_classes):
        raise MessError(f"{path}: a checkpoint of {other.model} with {other.num_classes} classes; the space "
                        f"{space.source} needs {space.model} with {space.num_classes} classes")
    base = {k[len("base."):]: v for k, v in payload["state_dict"].items() if k.startswith("base.")}
    own = net.base.state_dict()
    if set(base) != set(own) or any(own[k].shape != v.shape for k, v in base.items()):
        raise MessError(f"{path}: its backbone does not match {space.model} with {space.num_classes} classes")
    net.base.load_state_dict(base)
    return InitReport(path=str(path), kind="mess", source=f"{other.model} ({other.num_classes} classes)",
                      loaded=sorted(own))


def load_state_dict_into(model: nn.Module, state: dict, model_name: str, num_classes: int, path: str) -> InitReport:
    """Load a torchvision segmentation or ImageNet classification state dict into `model` (a torchvision
    segmentation model named `model_name`, without auxiliary head); see the module docstring."""
    own = model.state_dict()
    seg = _match_segmentation(own, state, model_name, num_classes, path)
    if seg is not None:
        mapped, report = seg
    else:
        cls = _match_classification(own, state, model_name, path)
        if cls is None:
            raise MessError(_diagnose(own, state, model_name, num_classes, path))
        mapped, report = cls
    model.load_state_dict({**own, **mapped})
    report.loaded = sorted(mapped)
    report.fresh = sorted(set(own) - set(mapped))
    return report


def _match_segmentation(own: dict, state: dict, model_name: str, num_classes: int, path: str):
    body = {k: v for k, v in state.items() if not k.startswith(AUX)}
    if set(body) != set(own):
        return None
    skipped, mapped = {}, {}
    have, last = _num_classes(state, model_name), set(last_layer_keys(model_name))
    for k, v in body.items():
        w = own[k]
        if v.shape == w.shape:
            mapped[k] = v
        elif k in last and v.shape[1:] == w.shape[1:]:
            skipped[k] = f"last classifier layer for {have} classes, the space has {num_classes} (left newly initialised)"
        else:
            return None
    for k in state:
        if k.startswith(AUX):
            skipped[k] = "auxiliary head (training-time only; MESS does not use it)"
    return mapped, InitReport(path=str(path), kind="segmentation", source=f"{model_name} ({have} classes)",
                              skipped=skipped)


def _match_classification(own: dict, state: dict, model_name: str, path: str):
    arch = backbone_arch(model_name)
    if arch not in CLASSIFIERS:
        return None
    head, prefix = CLASSIFIERS[arch]
    backbone = {k for k in own if k.startswith("backbone.")}
    mapped = {"backbone." + k[len(prefix):]: v for k, v in state.items() if not k.startswith(head)
              and k.startswith(prefix)}
    if len(mapped) != len(state) - sum(k.startswith(head) for k in state) or set(mapped) != backbone \
            or any(own[k].shape != v.shape for k, v in mapped.items()):
        return None
    skipped = {k: f"ImageNet classification layer of {arch} (ignored; the segmentation head starts fresh)"
               for k in state if k.startswith(head)}
    return mapped, InitReport(path=str(path), kind="classification", source=f"{arch} (ImageNet classifier)",
                              skipped=skipped)


def _known_shapes() -> dict[str, dict]:
    """State-dict shapes of every model this file could be: torchvision segmentation models (the class count
    left out) and the ImageNet classifiers; built on the meta device (no memory, no download)."""
    import torchvision

    out = {}
    with torch.device("meta"):
        for name in MODELS:
            sd = build_torchvision_model(name, 3, aux=name != "lraspp_mobilenet_v3_large").state_dict()
            out[name] = {k: tuple(v.shape) for k, v in sd.items()}
        for arch in CLASSIFIERS:
            sd = getattr(torchvision.models, arch)(weights=None).state_dict()
            out[f"{arch} (ImageNet classifier)"] = {k: tuple(v.shape) for k, v in sd.items()}
    return out


def _diagnose(own: dict, state: dict, model_name: str, num_classes: int, path: str) -> str:
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    backbone = [k for k in own if k.startswith("backbone.")]
    head = [k for k in own if not k.startswith("backbone.")]
    n_bb = sum(shapes.get(k) == tuple(own[k].shape) for k in backbone)
    n_head = sum(shapes.get(k) == tuple(own[k].shape) for k in head)
    arch = backbone_arch(model_name)
    head_cls, prefix = CLASSIFIERS.get(arch, ("fc.", ""))
    n_cls = sum(shapes.get(prefix + k[len("backbone."):]) == tuple(own[k].shape) for k in backbone)
    looks = "no known torchvision model"
    for name, ref in _known_shapes().items():
        if set(ref) == set(shapes) or set(ref) - {k for k in ref if k.startswith(AUX)} == set(shapes):
            # the class count may differ: compare everything but the classifier layers' first dimension
            if all(ref[k][1:] == shapes[k][1:] for k in shapes):
                looks = name if "ImageNet" in name else f"{name} ({_num_classes(state, name)} classes)"
                break
    return (f"{path}: cannot start {model_name} ({num_classes} classes) from it: {len(state)} tensors, which "
            f"look like {looks}; {n_bb}/{len(backbone)} match the backbone and {n_head}/{len(head)} the final head "
            f"as a segmentation state dict, {n_cls}/{len(backbone)} the backbone as an ImageNet {arch} "
            f"classification state dict; {ACCEPTED}")


def build_mess_network(space: Space, init_checkpoint: str | None = None) -> MESSNetwork:
    """The MESS network of a space, optionally starting from local weights (any shape messearch.weights accepts)."""
    net = MESSNetwork(space)
    if init_checkpoint:
        load_init(net, init_checkpoint)
    return net
