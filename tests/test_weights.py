"""--init-checkpoint in every usual shape: state dicts of real torchvision models (random weights, nothing
downloaded), checked tensor by tensor for what was loaded and what was left newly initialised."""

from __future__ import annotations

import argparse

import pytest
import torch
import torchvision

from messearch.backbones import build_torchvision_model
from messearch.cli import main
from messearch.errors import MessError
from messearch.model import MESSNetwork
from messearch.space import space_from_text
from messearch.train import make_plan
from messearch.weights import load_init

SPACE = """
name: w
model: {model}
num_classes: {classes}
input_size: [32, 32]
positions: [{position}]
heads: [{{name: lin, reduction: 4, layers: 0}}]
thresholds: [0.5]
train: {{batch_size: 4, epochs_stage1: 1, epochs_stage2: 1, train_images: 8, val_images: 4}}
"""
DATA = "synthetic:seed=1,train=8,val=4,mix=easy"


def space(model="deeplabv3_resnet18", classes=4, position="backbone.layer2.1"):
    return space_from_text(SPACE.format(model=model, classes=classes, position=position), "w.yaml")


def load_and_compare(sp, path, file_state, key_map=lambda k: k):
    """Load `path` into a fresh network; check every base tensor is the file's (when loaded) or the untouched
    initial one (when left); return the report and the keys left fresh."""
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in MESSNetwork(sp).base.state_dict().items()}
    torch.manual_seed(0)
    net = MESSNetwork(sp)
    report = load_init(net, str(path))
    after = net.base.state_dict()
    assert set(report.loaded) | set(report.fresh) == set(after) and not set(report.loaded) & set(report.fresh)
    source = {key_map(k): v for k, v in file_state.items()}
    for k, v in after.items():
        if k in report.loaded:
            assert torch.equal(v, source[k]), k
        else:
            assert torch.equal(v, initial[k]), k
    changed = [k for k in report.loaded if not torch.equal(source[k], initial[k]) and source[k].is_floating_point()]
    assert changed  # the file's weights really differ from the fresh ones, so the comparison above has teeth
    return report, net


def test_segmentation_state_dict_with_another_class_count(tmp_path):
    torch.manual_seed(1)
    state = build_torchvision_model("deeplabv3_resnet18", 21, aux=True).state_dict()
    torch.save(state, tmp_path / "seg21.pth")
    report, _ = load_and_compare(space(), tmp_path / "seg21.pth", state)
    assert report.kind == "segmentation" and not report.complete
    assert report.fresh == ["classifier.4.bias", "classifier.4.weight"]
    assert "21 classes, the space has 4" in report.skipped["classifier.4.weight"]
    aux = sorted(k for k in state if k.startswith("aux_classifier."))
    assert aux and all("auxiliary head" in report.skipped[k] for k in aux)
    assert set(report.skipped) == set(aux) | {"classifier.4.weight", "classifier.4.bias"}
    text = report.summary()
    assert "classifier.4.weight, classifier.4.bias" in text and "aux_classifier.*" in text


@pytest.mark.parametrize("wrap", ["reference-script", "module."])
def test_whole_model_wrapped_loads_exactly(tmp_path, wrap):
    torch.manual_seed(2)
    tv = build_torchvision_model("deeplabv3_resnet18", 4, aux=True).eval()
    state = tv.state_dict()
    if wrap == "module.":
        payload = {f"module.{k}": v for k, v in state.items()}
    else:  # what torchvision/references/segmentation/train.py saves, argparse.Namespace included
        payload = {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]},
                   "lr_scheduler": {"last_epoch": 3}, "epoch": 3,
                   "args": argparse.Namespace(model="deeplabv3_resnet18", lr=0.02, aux_loss=True)}
    torch.save(payload, tmp_path / "ckpt.pth")
    report, net = load_and_compare(space(), tmp_path / "ckpt.pth", state)
    assert report.complete and report.wrapped == ("model" if wrap != "module." else "module.")
    assert set(report.skipped) == {k for k in state if k.startswith("aux_classifier.")}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net.eval()(x)[1], tv(x)["out"])


def test_imagenet_resnet18_backbone(tmp_path):
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    report, _ = load_and_compare(space(), tmp_path / "resnet18.pth",
                                 {k: v for k, v in state.items() if not k.startswith("fc.")}, lambda k: "backbone." + k)
    assert report.kind == "classification" and report.source.startswith("resnet18")
    assert set(report.skipped) == {"fc.weight", "fc.bias"} and "classification layer" in report.skipped["fc.weight"]
    assert report.loaded == sorted(k for k in MESSNetwork(space()).base.state_dict() if k.startswith("backbone."))
    assert report.fresh and all(k.startswith("classifier.") for k in report.fresh)


def test_imagenet_mobilenet_v3_large_backbone(tmp_path):
    torch.manual_seed(4)
    state = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    torch.save({"model": state}, tmp_path / "mnv3.pth")  # as the classification reference script saves it
    sp = space("lraspp_mobilenet_v3_large", 3, "backbone.4")
    feats = {k: v for k, v in state.items() if k.startswith("features.")}
    report, _ = load_and_compare(sp, tmp_path / "mnv3.pth", feats, lambda k: "backbone." + k[len("features."):])
    assert report.kind == "classification" and report.wrapped == "model"
    assert set(report.skipped) == {k for k in state if k.startswith("classifier.")}
    assert sorted(report.fresh) == sorted(k for k in MESSNetwork(sp).base.state_dict() if k.startswith("classifier."))


def test_anything_else_is_named_with_what_it_looks_like(tmp_path, capsys):
    sp = space()
    torch.save(build_torchvision_model("fcn_resnet18", 4).state_dict(), tmp_path / "fcn.pth")
    with pytest.raises(MessError) as e:
        load_init(MESSNetwork(sp), str(tmp_path / "fcn.pth"))
    msg = str(e.value)
    assert str(tmp_path / "fcn.pth") in msg and "look like fcn_resnet18 (4 classes)" in msg
    assert "120/120 match the backbone" in msg and "accepted:" in msg and "ImageNet classification" in msg
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(MessError, match=r"look like resnet18 \(ImageNet classifier\).*0/\d+ the backbone as an "
                                        r"ImageNet mobilenet_v3_large"):
        load_init(MESSNetwork(space("lraspp_mobilenet_v3_large", 3, "backbone.4")), str(tmp_path / "r18.pth"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(MessError, match="not a state dict .* but a Tensor"):
        load_init(MESSNetwork(sp), str(tmp_path / "tensor.pth"))
    with pytest.raises(MessError, match="init checkpoint not found"):
        load_init(MESSNetwork(sp), str(tmp_path / "nope.pth"))
    # A partial model cannot stand in for the original one in the no-stage1 ablation.
    torch.save(build_torchvision_model("deeplabv3_resnet18", 21).state_dict(), tmp_path / "seg21.pth")
    with pytest.raises(MessError, match="2 of its tensors newly initialised"):
        make_plan(sp, tmp_path / "o", DATA, stage="2", baseline="no-stage1",
                  init_checkpoint=str(tmp_path / "seg21.pth"), progress=False)
    (tmp_path / "w.yaml").write_text(SPACE.format(model="deeplabv3_resnet18", classes=4, position="backbone.layer2.1"))
    rc = main(["train", "--space", str(tmp_path / "w.yaml"), "--data", DATA, "--out", str(tmp_path / "o"),
               "--init-checkpoint", str(tmp_path / "tensor.pth")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_train_says_what_it_loaded_and_records_it(tmp_path, capsys):
    torch.manual_seed(5)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    (tmp_path / "w.yaml").write_text(SPACE.format(model="deeplabv3_resnet18", classes=4, position="backbone.layer2.1"))
    rc = main(["train", "--space", str(tmp_path / "w.yaml"), "--data", DATA, "--out", str(tmp_path / "o"),
               "--stage", "1", "--max-steps", "1", "--quiet", "--init-checkpoint", str(tmp_path / "resnet18.pth")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "classification weights of resnet18" in out and "skipped fc.weight, fc.bias" in out
    assert "newly initialised: 44 tensors (classifier.*)" in out
    init = torch.load(tmp_path / "o" / "mess.pt", weights_only=True)["extra"]["init"]
    from messearch.files import sha256_file

    assert init["kind"] == "classification" and init["sha256"] == sha256_file(tmp_path / "resnet18.pth")
    assert set(init["skipped"]) == {"fc.weight", "fc.bias"} and len(init["loaded"]) == 120


def test_pipeline_checks_the_init_checkpoint_before_training(tmp_path):
    from messearch.pipeline import run_pipeline

    (tmp_path / "w.yaml").write_text(SPACE.format(model="deeplabv3_resnet18", classes=4, position="backbone.layer2.1"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "odd.pth")
    with pytest.raises(MessError, match=r"odd.pth: cannot start deeplabv3_resnet18 \(4 classes\) from it: 1 tensors"):
        run_pipeline(str(tmp_path / "w.yaml"), DATA, tmp_path / "run", init_checkpoint=str(tmp_path / "odd.pth"))
    assert not (tmp_path / "run" / "mess.pt").exists()
    # A run folder trained from other weights is not silently reused as if it came from these.
    from messearch.checkpoint import save_checkpoint

    torch.save(build_torchvision_model("deeplabv3_resnet18", 4).state_dict(), tmp_path / "seg4.pth")
    save_checkpoint(tmp_path / "run" / "mess.pt", MESSNetwork(space()), DATA)
    with pytest.raises(MessError, match="mess.pt exists and was not trained from it"):
        run_pipeline(str(tmp_path / "w.yaml"), DATA, tmp_path / "run", init_checkpoint=str(tmp_path / "seg4.pth"))


@pytest.mark.parametrize("model", sorted(__import__("messearch.backbones", fromlist=["MODELS"]).MODELS))
def test_every_model_accepts_its_imagenet_backbone_and_published_segmentation_shape(model):
    """Key and shape matching for every shipped model, on the meta device (no memory, no download): its ImageNet
    classifier loads the whole backbone, and a 21-class segmentation state dict all but the last classifier layer."""
    from messearch.weights import _match_classification, _match_segmentation, backbone_arch, last_layer_keys

    with torch.device("meta"):
        own = build_torchvision_model(model, 19).state_dict()
        imagenet = getattr(torchvision.models, backbone_arch(model))(weights=None).state_dict()
        published = build_torchvision_model(model, 21, aux=model != "lraspp_mobilenet_v3_large").state_dict()
    mapped, report = _match_classification(own, imagenet, model, "x.pth")
    assert set(mapped) == {k for k in own if k.startswith("backbone.")} and report.kind == "classification"
    mapped, report = _match_segmentation(own, published, model, 19, "x.pth")
    last = set(last_layer_keys(model))
    assert last and set(mapped) == set(own) - last and report.source == f"{model} (21 classes)"
    assert {k for k, why in report.skipped.items() if "last classifier" in why} == last
