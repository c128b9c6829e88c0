"""The embedded default's design, on a small run of the quickstart space: depth pays off. The original model's
final head is not beaten by any single exit, and the shallowest exit is clearly below it (hard scenes need the
whole network). Figures at full size are measured by `messearch quickstart` (README), not here."""

from __future__ import annotations

import pytest
import torch
import yaml

from messearch.pipeline import QUICKSTART_SPACE
from messearch.space import load_space, space_from_text
from messearch.train import train


def _small_quickstart() -> object:
    # The quickstart's model, scenes and recipe at 48x48, four positions (one per stage) and one head variant.
    raw = yaml.safe_load(load_space(QUICKSTART_SPACE).text)
    raw["input_size"] = [48, 48]
    raw["positions"] = ["backbone.layer1.0", "backbone.layer2.1", "backbone.layer3.1", "backbone.layer4.1"]
    raw["heads"] = raw["heads"][1:2]
    raw["data"] = "synthetic:seed=0,train=96,val=48"
    raw["train"].update({"train_images": 96, "val_images": 48, "epochs_stage1": 5, "epochs_stage2": 1})
    return space_from_text(yaml.safe_dump(raw), "quickstart.yaml at 48x48")


def test_final_head_beats_every_exit_and_the_shallowest_is_clearly_below(tmp_path):
    torch.manual_seed(0)
    space = _small_quickstart()
    ckpt = train(space, None, tmp_path / "run", progress=False)
    miou = torch.load(ckpt, weights_only=True)["exit_miou"]
    exits = {k: v for k, v in miou.items() if k != "final"}
    assert len(exits) == 4
    assert miou["final"] >= max(exits.values()), miou
    assert miou["final"] - miou["backbone.layer1.0/" + space.head_names[0]] >= 0.05, miou


def test_hypervolume_is_the_area_of_the_staircase():
    import pandas as pd

    from messearch.front import hypervolume

    # Reference 1.0 GMACs at mIoU 0.8; rows saving 50% at 0.7 and 75% at 0.5; one row costing more (ignored).
    df = pd.DataFrame({"mean_gmacs": [1.0, 0.5, 0.25, 1.2], "miou": [0.8, 0.7, 0.5, 0.9],
                       "is_reference": [True, False, False, False]})
    assert hypervolume(df) == pytest.approx(0.5 * 0.7 + 0.25 * 0.5)
    assert hypervolume(df, min_miou=0.6) == pytest.approx(0.5 * 0.1)
    assert hypervolume(df.iloc[[0]]) == 0.0


def test_single_exit_miou_and_stage_means_from_counts():
    import numpy as np

    from messearch.cache_format import CacheArrays
    from messearch.exit_quality import single_exit_miou, stage_means, stage_of, structure_report

    assert stage_of("backbone.layer3.1") == "layer3" and stage_of("backbone.7") == "backbone.7"
    # Two images, two classes, exits layer1.0/a, layer2.0/a and the final head.
    gt = np.array([[10, 10], [10, 10]])
    tp = np.array([[[5, 5], [8, 8], [10, 10]], [[5, 5], [9, 9], [10, 10]]])
    pred = np.full_like(tp, 10)
    cache = CacheArrays(image_ids=["a", "b"], positions=["backbone.layer1.0", "backbone.layer2.0"], heads=["a"],
                        tp=tp, pred=pred, gt=gt, conf_mean=np.zeros((2, 3)), n_above=np.zeros((2, 3, 2), np.int64),
                        n_pixels=np.full(2, 20))
    miou = single_exit_miou(cache)
    assert miou == {"backbone.layer1.0/a": pytest.approx(1 / 3), "backbone.layer2.0/a": pytest.approx(17 / 23),
                    "final": 1.0}
    assert single_exit_miou(cache, images=[1])["backbone.layer2.0/a"] == pytest.approx(9 / 11)
    assert list(stage_means(miou)) == ["layer1", "layer2"]
    rep = structure_report(miou, cache.positions)
    assert rep["best_shallowest"] == pytest.approx(1 / 3) and rep["best_before_last_stage"] == pytest.approx(1 / 3)
    assert rep["stage_means_rise"] and rep["best_exit"] == pytest.approx(17 / 23)
