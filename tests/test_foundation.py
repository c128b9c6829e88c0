"""The foundation: segmented backbones, heads, spaces, costs and `messearch info`."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from messearch.cli import main
from messearch.backbones import MODELS, PUBLISHED_WEIGHTS, build_torchvision_model, candidate_positions
from messearch.costs import mac_table, model_macs, unit_macs
from messearch.errors import MessError, SpaceError
from messearch.weights import build_mess_network
from messearch.config import count_configs
from messearch.space import load_space, space_from_text

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "messearch" / "spaces").glob("*.yaml"))

SMALL = """
model: {model}
num_classes: 5
input_size: [64, 64]
heads:
  - {{name: lin, reduction: 8, layers: 0}}
  - {{name: c2_dil, reduction: 4, layers: 2, rfe: dilated}}
  - {{name: aspp, reduction: 2, layers: 1, rfe: aspp, rates: [2, 3]}}
  - {{name: w16, width: 16, layers: 1}}
thresholds: [0.5, 0.75, 0.9]
max_exits: 2
"""


@pytest.mark.parametrize("model", sorted(MODELS))
def test_segments_then_head_equal_the_original_model_bit_for_bit(model):
    torch.manual_seed(0)
    space = space_from_text(SMALL.format(model=model), "test")
    net = build_mess_network(space).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        exits, final = net(x)
        expected = net.base(x)["out"]
    assert torch.equal(final, expected)
    assert len(exits) == len(space.positions) * len(space.heads) == len(net.exits)
    for logits in exits:  # every candidate head at every position gives logits of the input size
        assert logits.shape == (2, 5, 64, 64)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("model", sorted(MODELS))
def test_segment_costs_sum_to_the_whole_model(model):
    names, macs, final = unit_macs(model, 21, (520, 520))
    assert sum(macs) + final == model_macs(model, 21, (520, 520))
    assert all(m >= 0 for m in macs) and final > 0


def test_output_stride_8_variant_keeps_layer3_and_layer4_at_stride_8_with_dilated_convs():
    from messearch.model import feature_shapes

    shapes = feature_shapes("lraspp_resnet18_os8", 5, (96, 96))
    assert shapes["backbone.layer1.1"][1:] == (24, 24)
    assert [shapes[f"backbone.layer{k}.1"][1:] for k in (2, 3, 4)] == [(12, 12)] * 3
    assert feature_shapes("lraspp_resnet18", 5, (96, 96))["backbone.layer4.1"][1:] == (6, 6)
    r = build_torchvision_model("lraspp_resnet18_os8", 5).backbone
    # torchvision's dilation rule: the first conv of a dilated layer keeps the previous layer's dilation
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in (*r.layer3, *r.layer4)] == [(1, 2), (2, 2), (2, 4), (4, 4)]


@pytest.mark.parametrize("model", sorted(PUBLISHED_WEIGHTS))
def test_costs_agree_with_torchvision_published_gflops(model):
    # torchvision measured its figures at 520x520 on the published weights, which carry the auxiliary
    # classifier (LR-ASPP has none): add it back for the comparison.
    published = PUBLISHED_WEIGHTS[model].meta["_ops"] * 1e9
    ours = model_macs(model, 21, (520, 520), aux=model != "lraspp_mobilenet_v3_large")
    assert abs(ours - published) / published < 0.01


def test_cost_table_is_cumulative_and_matches_the_model():
    space = space_from_text(SMALL.format(model="deeplabv3_resnet18"), "test")
    table = mac_table(space)
    assert list(table.backbone_to) == sorted(table.backbone_to)
    assert sum(table.segment(k) for k in range(len(space.positions) + 1)) == table.backbone_total
    assert table.reference == model_macs("deeplabv3_resnet18", 5, (64, 64))
    assert table.head.shape == (len(space.positions), len(space.heads))
    assert (table.head > 0).all()
    # a wider head costs more than the linear one at every position
    assert (table.head[:, 2] > table.head[:, 0]).all()


def test_torchvision_format_state_dict_loads(tmp_path):
    torch.manual_seed(1)
    reference = build_torchvision_model("deeplabv3_mobilenet_v3_large", 5, aux=True).eval()
    path = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), path)  # the published format, auxiliary classifier included
    space = space_from_text(SMALL.format(model="deeplabv3_mobilenet_v3_large"), "test")
    net = build_mess_network(space, init_checkpoint=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x)[1], reference(x)["out"])
    with pytest.raises(MessError, match="cannot start fcn_resnet18"):
        build_mess_network(space_from_text(SMALL.format(model="fcn_resnet18"), "t"), init_checkpoint=str(path))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_space_loads_and_reports(path, capsys):
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    space = load_space(path)
    assert info["model"] == space.model
    assert info["positions"] == list(space.positions) == candidate_positions(space.model)
    assert info["heads"] == space.head_names
    assert info["total_gmacs"] == pytest.approx(model_macs(space.model, space.num_classes, space.input_size) / 1e9)
    assert info["n_configs"] == count_configs(len(space.positions), len(space.heads), len(space.thresholds),
                                              space.max_exits, "shared", space.mode)


@pytest.mark.parametrize("thresholds_mode", ["shared", "per-exit"])
@pytest.mark.parametrize("mode", ["cascade", "single"])
def test_config_count_matches_enumeration(thresholds_mode, mode):
    P, H, T, K = 5, 3, 4, 3
    n = 1  # the reference
    for k in range(1, K + 1):
        for _ in itertools.combinations(range(P), k):
            for _ in itertools.product(range(H), repeat=k):
                n += T if thresholds_mode == "shared" else T ** k
    n += P * H if mode == "single" else 0
    assert count_configs(P, H, T, K, thresholds_mode, mode) == n


BAD_SPACES = [
    ("colour: red\n", "unknown field 'colour'"),
    ("positions: [backbone.layer9.0]\n", "field 'positions': bad value 'backbone.layer9.0'"),
    ("thresholds: [0.5, 1.5]\n", "field 'thresholds': bad value 1.5; allowed: a number in [0.0, 1.0]"),
    ("heads: [{name: h, width: 0}]\n", "field 'heads[0].width': bad value 0; allowed: an integer >= 1"),
    ("heads: [{name: h, width: -3}]\n", "field 'heads[0].width': bad value -3"),
    ("heads: [{name: h, rfe: huge}]\n", "field 'heads[0].rfe': bad value 'huge'"),
    ("model: vgg16\n", "field 'model': bad value 'vgg16'"),
    ("policy: {kind: fraction, pixel_threshold: 0.33}\n", "field 'policy.pixel_threshold'"),
    ("mode: sometimes\n", "field 'mode': bad value 'sometimes'; allowed: cascade, single"),
]


def _space_with(override: str) -> str:
    base = {"model": "model: deeplabv3_resnet18\n", "num_classes": "num_classes: 4\n",
            "input_size": "input_size: [64, 64]\n", "heads": "heads: [{name: h}]\n", "thresholds": "thresholds: [0.5]\n"}
    key = override.split(":")[0]
    base[key] = override
    return "".join(base.values())


@pytest.mark.parametrize("override,message", BAD_SPACES)
def test_bad_space_errors_name_file_field_value(tmp_path, override, message):
    path = tmp_path / "bad.yaml"
    path.write_text(_space_with(override))
    with pytest.raises(SpaceError) as err:
        load_space(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_cli_reports_a_bad_space_with_status_2_and_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(_space_with("thresholds: [-0.1]\n"))
    out = subprocess.run([sys.executable, "-m", "messearch.cli", "info", str(path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") and "thresholds" in out.stderr and str(path) in out.stderr


def test_missing_space_file_is_a_clear_error(tmp_path):
    with pytest.raises(SpaceError, match="not found"):
        load_space(tmp_path / "nope.yaml")


def test_space_validates_types():
    space = space_from_text(_space_with("thresholds: {start: 0.5, stop: 0.9, num: 5}\n"), "t")
    assert space.thresholds == (0.5, 0.6, 0.7, 0.8, 0.9)
    assert math.isclose(sum(space.thresholds), 3.5)
