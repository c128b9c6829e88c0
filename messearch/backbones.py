"""torchvision segmentation models, built without downloads and cut into segments at candidate exit positions.

A model's backbone is flattened into an ordered list of units (one per residual or inverted-residual
block, plus the stem and tail modules), named by module path (`backbone.layer3.2`, `backbone.7`).
Every block is a candidate position; running the units in order and then the original head gives
exactly the original model's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenetv3, resnet
from torchvision.models import segmentation as tvseg
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from .errors import MessError

_BLOCKS = (resnet.BasicBlock, resnet.Bottleneck, mobilenetv3.InvertedResidual)


def _small_resnet_model(kind: str, depth: int, num_classes: int, aux: bool) -> nn.Module:
    """DeepLabV3 / FCN on ResNet-18/34. BasicBlock cannot be dilated, so layer4 keeps its resolution by
    dropping its stride instead: output stride 16, no dilation, and ASPP rates (6, 12, 18) to match."""
    r = {18: resnet.resnet18, 34: resnet.resnet34}[depth](weights=None)
    _drop_stride(r.layer4)
    layers = {"layer4": "out", "layer3": "aux"} if aux else {"layer4": "out"}
    backbone = IntermediateLayerGetter(r, return_layers=layers)
    aux_head = FCNHead(256, num_classes) if aux else None
    if kind == "deeplabv3":
        return tvseg.DeepLabV3(backbone, DeepLabHead(512, num_classes, atrous_rates=(6, 12, 18)), aux_head)
    return tvseg.FCN(backbone, FCNHead(512, num_classes), aux_head)


def _small_resnet_lraspp(depth: int, num_classes: int, aux: bool, output_stride: int = 16) -> nn.Module:
    """LR-ASPP (torchvision's LRASPP) on ResNet-18/34: layer4 at output stride 16 as above, plus layer1's
    stride-4 features as the low-level branch, so the final head keeps object boundaries that an 8x8 map
    at 128x128 loses. output_stride 8: layer3 and layer4 dilated (2 and 4) instead of strided, so every exit
    from layer2 on reads a stride-8 map. LR-ASPP has no auxiliary classifier; `aux` is ignored, as for the
    MobileNet variant."""
    r = {18: resnet.resnet18, 34: resnet.resnet34}[depth](weights=None)
    if output_stride == 8:
        _dilate(r.layer3, 2)
        _dilate(r.layer4, 4)
    else:
        _drop_stride(r.layer4)
    backbone = IntermediateLayerGetter(r, return_layers={"layer1": "low", "layer4": "high"})
    return tvseg.LRASPP(backbone, low_channels=64, high_channels=512, num_classes=num_classes, inter_channels=128)


def _drop_stride(layer: nn.Sequential) -> None:
    """`layer` keeps its input's resolution: its first block's conv and shortcut no longer stride."""
    layer[0].conv1.stride = (1, 1)
    if layer[0].downsample is not None:
        layer[0].downsample[0].stride = (1, 1)


def _dilate(layer: nn.Sequential, dilation: int) -> None:
    """Drop `layer`'s stride and dilate its 3x3 convs as torchvision's replace_stride_with_dilation does for
    Bottleneck (the first conv keeps the previous dilation); BasicBlock refuses dilation only when built."""
    _drop_stride(layer)
    for i, block in enumerate(layer):
        for conv in (block.conv1, block.conv2):
            d = dilation // 2 if (i == 0 and conv is block.conv1) else dilation
            conv.dilation, conv.padding = (d, d), (d, d)


def _torchvision(builder):
    def build(num_classes: int, aux: bool) -> nn.Module:
        return builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux)

    return build


def _lraspp(num_classes: int, aux: bool) -> nn.Module:
    # LR-ASPP has no auxiliary classifier; torchvision refuses aux_loss for it.
    return tvseg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)


MODELS = {
    "deeplabv3_resnet50": _torchvision(tvseg.deeplabv3_resnet50),
    "deeplabv3_resnet101": _torchvision(tvseg.deeplabv3_resnet101),
    "fcn_resnet50": _torchvision(tvseg.fcn_resnet50),
    "fcn_resnet101": _torchvision(tvseg.fcn_resnet101),
    "deeplabv3_mobilenet_v3_large": _torchvision(tvseg.deeplabv3_mobilenet_v3_large),
    "lraspp_mobilenet_v3_large": _lraspp,
    "deeplabv3_resnet18": lambda nc, aux: _small_resnet_model("deeplabv3", 18, nc, aux),
    "deeplabv3_resnet34": lambda nc, aux: _small_resnet_model("deeplabv3", 34, nc, aux),
    "fcn_resnet18": lambda nc, aux: _small_resnet_model("fcn", 18, nc, aux),
    "fcn_resnet34": lambda nc, aux: _small_resnet_model("fcn", 34, nc, aux),
    "lraspp_resnet18": lambda nc, aux: _small_resnet_lraspp(18, nc, aux),
    "lraspp_resnet18_os8": lambda nc, aux: _small_resnet_lraspp(18, nc, aux, output_stride=8),
}

# torchvision's published weights, for the cost check against their recorded GFLOPS (never downloaded).
PUBLISHED_WEIGHTS = {
    "deeplabv3_resnet50": tvseg.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
    "deeplabv3_resnet101": tvseg.DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1,
    "fcn_resnet50": tvseg.FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
    "fcn_resnet101": tvseg.FCN_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1,
    "deeplabv3_mobilenet_v3_large": tvseg.DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
    "lraspp_mobilenet_v3_large": tvseg.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
}


def build_torchvision_model(name: str, num_classes: int, aux: bool = False) -> nn.Module:
    """The torchvision model `name` with random weights (nothing is downloaded, ever)."""
    if name not in MODELS:
        raise MessError(f"unknown model {name!r}; allowed: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes, aux)


@dataclass
class Unit:
    """One step of the flattened backbone."""

    name: str
    module: nn.Module
    is_block: bool


def flatten_backbone(model: nn.Module) -> tuple[list[Unit], dict[str, int]]:
    """The backbone as ordered units, and for each feature the original head reads ('out', 'low', 'high'),
    the index of the unit that produces it."""
    backbone = model.backbone
    units: list[Unit] = []
    taps: dict[str, int] = {}
    for name, child in backbone.named_children():
        if isinstance(child, nn.Sequential) and len(child) and all(isinstance(b, _BLOCKS) for b in child):
            for i, block in enumerate(child):
                units.append(Unit(f"backbone.{name}.{i}", block, True))
        else:
            units.append(Unit(f"backbone.{name}", child, isinstance(child, _BLOCKS)))
        key = backbone.return_layers.get(name)
        if key is not None and key != "aux":
            taps[key] = len(units) - 1
    return units, taps


def candidate_positions(model_name: str) -> list[str]:
    """Every candidate exit position of a model, in depth order (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = build_torchvision_model(model_name, num_classes=2)
    units, _ = flatten_backbone(model)
    return [u.name for u in units if u.is_block]


def run_final_head(model: nn.Module, taps: dict[str, torch.Tensor], size) -> torch.Tensor:
    """The original model's head on the tapped features, upsampled exactly as torchvision does."""
    if isinstance(model, tvseg.LRASPP):
        out = model.classifier(taps)
    else:
        out = model.classifier(taps["out"])
    return F.interpolate(out, size=size, mode="bilinear", align_corners=False)
