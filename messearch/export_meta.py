"""What an exported model says about itself (`ExportMeta`): the configuration, the exit policy, the input it expects
(size, preprocessing mean and std, class names), its costs and where it came from.

It travels inside every export (the torch.save payload, or TorchScript's `messearch.json`), as plain JSON values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .config import Config
from .dataset import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class ExportMeta:
    """The exported model's metadata; `model.meta` of every exported model."""

    space_text: str
    space_source: str
    model: str                       # torchvision model name
    config: Config
    policy: dict                     # kind, pixel_threshold_bin, n_bins: the exit policy the search assumed
    costs: dict                      # input_size, segments, heads, final, reference, backbone_total (MACs)
    provenance: dict                 # config_id, checkpoint (+ sha256), front, cache_sha256, predicted figures
    num_classes: int
    ignore_index: int
    input_size: list                 # [H, W] the model was searched at
    class_names: list = field(default_factory=list)
    # preprocessing, as evaluation does it: RGB resized to input_size, then (x / pixel_max - mean) / std per channel
    # in float32, NCHW
    mean: list = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list = field(default_factory=lambda: list(IMAGENET_STD))
    pixel_max: float = 255.0
    resize: str = "bilinear (PIL), stretched to input_size"

    @property
    def exits(self) -> list[list[str]]:
        """[position, head] of each early exit, in depth order."""
        return [list(e) for e in zip(self.config.positions, self.config.heads)]

    def to_dict(self) -> dict:
        """Plain JSON values (what the export files hold)."""
        d = asdict(self)
        d["config"] = self.config.to_dict()
        d["exits"] = self.exits
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ExportMeta":
        """The metadata of an export file's dict (fields added later take their defaults in older files)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["config"] = Config.from_dict(d["config"])
        return cls(**kw)

    def format_summary(self, path=None, torchscript: bool = False, onnx_dir=None) -> str:
        """One line for `messearch export`: the row, its exits, the final head, the file and/or the ONNX folder."""
        cfg = self.config
        written = [f"{path}{' (TorchScript)' if torchscript else ''}"] if path else []
        if onnx_dir:
            n = cfg.n_exits + (cfg.kind != "static")
            written.append(f"{onnx_dir}/ (ONNX, {n} stage graph{'s' * (n != 1)} + cascade.json)")
        return (f"exported {self.provenance.get('config_id') or cfg.config_id} ({cfg.kind}; exits: {cfg.exits_text()}; "
                f"final head {'kept' if cfg.kind != 'static' else 'pruned'}) to {' and '.join(written)}; "
                f"reference {self.costs['reference'] / 1e9:.3f} GMACs")
