"""Two-stage MESS training on a tiny space: frozen parts, positive filtering, resume, checkpoints, errors, Ray Train."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from messearch.checkpoint import load_checkpoint, save_checkpoint
from messearch.cli import main
from messearch.errors import DataError, MessError
from messearch.model import MESSNetwork
from messearch.space import space_from_text
from messearch.train import make_plan, train
from messearch.train_stages import (STAGE2, LossWeights, StageModule, make_optimizer,
                                    positive_filtering_distillation_loss, positive_mask, set_trainable, stage_loss)

TINY = """
name: tiny
model: deeplabv3_resnet18
num_classes: {classes}
input_size: [32, 32]
positions: [backbone.layer1.1, backbone.layer2.1, backbone.layer3.1]
heads:
  - {{name: lin, reduction: 4, layers: 0}}
  - {{name: c1, reduction: 4, layers: 1}}
thresholds: [0.5, 0.9]
train: {{batch_size: 4, epochs_stage1: {e1}, epochs_stage2: {e2}, lr: 0.01, lr_stage2: 0.01,
        train_images: {n}, val_images: 8}}
"""
DATA = "synthetic:seed=1,mix=easy"


def tiny(classes=4, e1=1, e2=1, n=8):
    return space_from_text(TINY.format(classes=classes, e1=e1, e2=e2, n=n), "tiny.yaml")


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    """Stage 1 into DIR, a copy of its mess.pt, then stage 2 from that copy into the same DIR."""
    out = tmp_path_factory.mktemp("two_stage")
    space = tiny(e1=2, e2=2, n=16)
    train(space, DATA, out, stage="1", progress=False)
    shutil.copy(out / "mess.pt", out / "stage1.pt")
    train(space, DATA, out, stage="2", init_checkpoint=str(out / "stage1.pt"), progress=False)
    return out


def test_stage2_leaves_backbone_and_final_head_unchanged(two_stage):
    before, _, _ = load_checkpoint(two_stage / "stage1.pt")
    after, _, _ = load_checkpoint(two_stage / "mess.pt")
    assert states_equal(before.base.state_dict(), after.base.state_dict())  # parameters and BN buffers
    changed = [not torch.equal(a, b) for a, b in zip(before.heads.state_dict().values(), after.heads.state_dict().values())]
    assert all(changed[i] for i, k in enumerate(before.heads.state_dict()) if k.endswith("classifier.weight"))


def test_stage2_step_touches_only_heads():
    torch.manual_seed(0)
    net = MESSNetwork(tiny())
    set_trainable(net, STAGE2)
    module = StageModule(net, STAGE2).train()
    assert not net.base.training and net.heads.training
    base0 = {k: v.clone() for k, v in net.base.state_dict().items()}
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4, 32, 32))
    for _ in range(2):
        exits, final = module(x)
        loss = stage_loss(STAGE2, exits, final, y, LossWeights())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert states_equal(base0, net.base.state_dict())
    assert all(p.grad is None for p in net.base.parameters())


def test_optimizer_is_fused_adamw_with_no_decay_on_bn_and_biases():
    # the fused kernel (where torch has it) must make the same steps as torch's reference AdamW on the same groups
    torch.manual_seed(0)
    # no bias before the BN: its gradient is rounding noise, which Adam would blow up to steps of size lr
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    ref = copy.deepcopy(net)
    opt = make_optimizer(net, 0.01, 0.1)
    decay = [p for p in ref.parameters() if p.ndim > 1]
    no_decay = [p for p in ref.parameters() if p.ndim <= 1]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=0.01, foreach=False, fused=False)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [tuple(p.shape) for p in opt.param_groups[1]["params"]] == [(4,), (4,), (2,)]   # BN weight, bias; bias
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4):
        assert opt.defaults["fused"] is True
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        for m, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max()


def test_positive_filtering_masks_exactly_the_right_pixels():
    # Final head predicts class argmax; labels agree on pixels (0,0) and (1,1) only; (0,1) is ignored.
    final = torch.zeros(1, 3, 2, 2)
    final[0, 0, 0, 0] = final[0, 1, 0, 1] = final[0, 2, 1, 0] = final[0, 1, 1, 1] = 3.0
    labels = torch.tensor([[[0, 255], [1, 1]]])
    expected = torch.tensor([[[True, False], [False, True]]])
    assert torch.equal(positive_mask(final, labels, 255), expected)
    # An exit equal to the final head on the positive pixels has zero loss however wrong it is elsewhere.
    exit_logits = final.clone()
    exit_logits[0, :, 0, 1] = torch.tensor([9.0, -9.0, 0.0])
    exit_logits[0, :, 1, 0] = torch.tensor([-5.0, 7.0, 1.0])
    exit_logits.requires_grad_(True)
    loss = positive_filtering_distillation_loss(exit_logits, final, labels, T=2.0, ignore_index=255)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7)
    # Move one positive pixel: the loss is T^2 * KL there, averaged over the two positive pixels,
    # and no gradient reaches the filtered-out pixels.
    moved = exit_logits.detach().clone()
    moved[0, :, 1, 1] = torch.tensor([2.0, 0.0, -1.0])
    moved.requires_grad_(True)
    loss = positive_filtering_distillation_loss(moved, final, labels, T=2.0, ignore_index=255)
    p_t = F.softmax(final[0, :, 1, 1] / 2, dim=0)
    kl = (p_t * (p_t.log() - F.log_softmax(moved[0, :, 1, 1].detach() / 2, dim=0))).sum()
    assert float(loss.detach()) == pytest.approx(float(4.0 * kl / 2), rel=1e-5)
    loss.backward()
    assert torch.all(moved.grad[0, :, 0, 1] == 0) and torch.all(moved.grad[0, :, 1, 0] == 0)
    assert torch.any(moved.grad[0, :, 1, 1] != 0)


def test_checkpoint_loads_weights_only_and_has_every_exit(two_stage):
    payload = torch.load(two_stage / "mess.pt", weights_only=True)
    space = tiny(e1=2, e2=2, n=16)
    keys = {f"{p}/{h}" for p in space.positions for h in space.head_names} | {"final"}
    assert set(payload["exit_miou"]) == keys
    assert payload["data"] == DATA and "TINY" not in payload["space_text"] and payload["versions"]["torch"]
    net, _, _ = load_checkpoint(two_stage / "mess.pt")
    assert len(net.heads) == len(space.positions) * len(space.heads)


def test_training_learns(two_stage):
    import csv

    from messearch.data import build_dataset
    from messearch.train_stages import Runtime, validate_exits

    rows = list(csv.DictReader(open(two_stage / "train_log.csv")))
    losses = [float(r["loss"]) for r in rows if r["stage"] == "2"]
    assert len(losses) == 2 and losses[-1] < losses[0]
    # The floor: the same network before any training (same seed), on the same validation images.
    space = tiny(e1=2, e2=2, n=16)
    torch.manual_seed(space.train.seed)
    untrained = MESSNetwork(space)
    val = torch.utils.data.Subset(build_dataset(DATA, "val", space.input_size, num_classes=4), range(8))
    floor = validate_exits(untrained, torch.utils.data.DataLoader(val, batch_size=4), Runtime(progress=False))
    miou = torch.load(two_stage / "mess.pt", weights_only=True)["exit_miou"]
    # A 32x32 input and 8 stage-1 steps learn little beyond the background: assert a clear gain, not a level. The
    # final head sees a 2x2 map here and may stay at the background-only floor, so the gain is asserted on average
    # over every head and on the deepest exits.
    gains = [miou[k] - floor[k] for k in miou]
    assert sum(gains) / len(gains) > 0.02, (miou, floor)
    deepest = [k for k in miou if k.startswith("backbone.layer3")]
    assert max(miou[k] for k in deepest) > max(floor[k] for k in deepest) + 0.02, (miou, floor)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    space = tiny(e1=2, e2=1)
    straight = train(space, DATA, tmp_path / "a", progress=False)

    class Killed(Exception):
        pass

    def kill(stage, epoch, row):
        if (stage, epoch) == ("1", 1):
            raise Killed

    with pytest.raises(Killed):
        train(space, DATA, tmp_path / "b", progress=False, on_epoch_end=kill)
    assert not (tmp_path / "b" / "mess.pt").exists()
    resumed = train(space, DATA, tmp_path / "b", resume=True, progress=False)
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert states_equal(a["state_dict"], b["state_dict"])
    assert a["exit_miou"] == b["exit_miou"]


def _init_checkpoint(tmp_path, what: str) -> str:
    """A local init file: a torchvision state dict or a mess.pt, of the tiny space with 4 or 5 classes."""
    net = MESSNetwork(tiny(classes=int(what[-1])))
    path = tmp_path / f"{what}.{'pth' if what.startswith('tv') else 'pt'}"
    if what.startswith("tv"):
        torch.save(net.base.state_dict(), path)
    else:
        save_checkpoint(path, net, DATA)
    return str(path)


# case -> (make_plan arguments beyond the space and --out, an init file to make first or None, error, message)
PLAN_ERRORS = {
    "mess.pt of another class count": ({}, "mess5", MessError, "5 classes"),
    "data of another class count": ({"data_spec": "synthetic:classes=5"}, None, DataError, "classes"),
    "resume without a state": ({"resume": True}, None, MessError, "does not exist"),
    "stage 2 without stage 1": ({"stage": "2"}, None, MessError, "stage-1 checkpoint"),
    "stage 2 on the original model": ({"stage": "2"}, "tv4", MessError, "no-stage1"),
}


@pytest.mark.parametrize("case", list(PLAN_ERRORS))
def test_errors_before_training(tmp_path, case):
    kwargs, init, error, message = PLAN_ERRORS[case]
    kwargs = {"data_spec": DATA, **kwargs}
    if init is not None:
        kwargs["init_checkpoint"] = _init_checkpoint(tmp_path, init)
    with pytest.raises(error, match=message):
        make_plan(tiny(), tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(TINY.format(classes=4, e1=1, e2=1, n=8))
    rc = main(["train", "--space", str(tmp_path / "tiny.yaml"), "--data", DATA, "--out", str(tmp_path / "o"),
               "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --resume") and err.count("\n") == 1


def test_ray_train_two_cpu_workers(ray_local, tmp_path):
    space = tiny()
    path = train(space, DATA, tmp_path / "ray", stage="1", gpus=2, progress=False, max_steps=1)
    payload = torch.load(path, weights_only=True)
    assert payload["extra"]["world_size"] == 2 and 0.0 <= payload["exit_miou"]["final"] <= 1.0


def test_on_epoch_end_returning_true_ends_that_stage_cleanly(tmp_path):
    """A caller's time budget: True after stage 1's first epoch ends stage 1 there; stage 2 still runs, mess.pt is whole."""
    seen = []

    def budget(stage, epoch, row):
        seen.append((stage, epoch))
        return stage == "1"

    path = train(tiny(e1=3, e2=2), DATA, tmp_path, progress=False, max_steps=1, on_epoch_end=budget)
    assert seen == [("1", 1), ("2", 1), ("2", 2)]
    net, _, _ = load_checkpoint(path)
    payload = torch.load(path, weights_only=True)
    assert payload["extra"]["heads_trained"] and len(payload["exit_miou"]) == len(net.exits) + 1
    assert (tmp_path / "train_log.csv").read_text().count("\n") == 1 + 3


def test_head_val_every_zero_validates_heads_after_the_last_epoch_or_an_early_end(tmp_path):
    """head_val_every: 0 validates stage 2's heads after its last epoch only (the other stage-2 rows carry the frozen
    final head's figure), or after the epoch where a caller's budget ends the stage; mess.pt has every head's mIoU."""
    import csv

    text = TINY.format(classes=4, e1=1, e2=3, n=8).replace("val_images: 8}", "val_images: 8, head_val_every: 0}")
    space = space_from_text(text, "tiny.yaml")
    head = "miou:backbone.layer1.1/lin"

    def log(run):
        with open(tmp_path / run / "train_log.csv", newline="") as f:
            return list(csv.DictReader(f))

    path = train(space, DATA, tmp_path / "a", progress=False, max_steps=1)
    rows = log("a")
    assert [r["stage"] for r in rows] == ["1", "2", "2", "2"]
    assert [bool(r[head]) for r in rows] == [False, False, False, True]
    assert len({r["miou:final"] for r in rows}) == 1   # the final head is frozen in stage 2
    n_exits = len(load_checkpoint(path)[0].exits)
    assert len(torch.load(path, weights_only=True)["exit_miou"]) == n_exits + 1
    path = train(space, DATA, tmp_path / "b", progress=False, max_steps=1, on_epoch_end=lambda s, e, r: s == "2")
    assert [bool(r[head]) for r in log("b")] == [False, True]
    assert len(torch.load(path, weights_only=True)["exit_miou"]) == n_exits + 1
