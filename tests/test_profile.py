"""Latency profiles: every segment, candidate head and the final head timed, stored with the device, read back
as a CostTable in the shape of the MACs table."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from messearch.checkpoint import save_checkpoint
from messearch.cli import main
from messearch.costs import mac_table
from messearch.errors import MessError
from messearch.weights import build_mess_network
from messearch.profile import load_profile, profile_latency
from messearch.space import space_from_text

SPACE = """
name: tiny
model: deeplabv3_resnet18
num_classes: 4
input_size: [32, 32]
positions: [backbone.layer1.1, backbone.layer3.1]
heads:
  - {name: lin, reduction: 4, layers: 0}
  - {name: c1, reduction: 8, layers: 1}
thresholds: [0.5]
max_exits: 2
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    space = space_from_text(SPACE, "tiny.yaml")
    path = tmp_path_factory.mktemp("p") / "mess.pt"
    save_checkpoint(path, build_mess_network(space), "synthetic:0:4")
    return str(path), space


def test_profile_rows_and_cost_table(ckpt, tmp_path):
    path, space = ckpt
    out = tmp_path / "profiles" / "cpu.parquet"
    df = profile_latency(path, "cpu", batch_size=2, out=out, min_run_time=0.01, threads=1, progress=False)
    assert sorted(df.kind.unique()) == ["final", "head", "segment"]
    assert (df.kind == "segment").sum() == 3 and (df.kind == "head").sum() == 4 and (df.ms > 0).all()
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(out).metadata.items()}
    assert meta["batch_size"] == "2" and meta["threads"] == "1" and meta["torch_version"] == torch.__version__
    name, table = load_profile(out)
    assert name == meta["device_name"] and name
    macs = mac_table(space)
    assert table.unit == "ms" and table.positions == macs.positions and table.heads == macs.heads
    assert table.head.shape == macs.head.shape
    seg = df[df.kind == "segment"].sort_values("index").ms.to_numpy()
    np.testing.assert_allclose(table.backbone_to, np.cumsum(seg)[:2])
    assert table.backbone_total == pytest.approx(seg.sum()) and table.backbone_total >= table.backbone_to[-1]
    row = df[(df.kind == "head") & (df.position == "backbone.layer3.1") & (df["head"] == "c1")]
    assert table.head[1, 1] == row.ms.iloc[0]
    assert table.final == df[df.kind == "final"].ms.iloc[0]
    assert table.segment(2) == pytest.approx(seg[2])


def test_profile_cli_and_errors(ckpt, tmp_path, capsys):
    path, _ = ckpt
    out = tmp_path / "cpu.parquet"
    assert main(["profile", "--checkpoint", path, "--device", "cpu", "--out", str(out), "--min-run-time", "0.005",
                 "--threads", "1", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "backbone.layer3.1" in text and "final head" in text and out.exists()
    assert main(["profile", "--checkpoint", path, "--device", "tpu", "--out", str(out)]) == 2
    assert "allowed: cpu, cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["profile", "--checkpoint", path, "--device", "cuda", "--out", str(out)]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(MessError, match="not a messearch latency profile"):
        pq.write_table(pq.read_table(out).replace_schema_metadata({}), tmp_path / "bad.parquet")
        load_profile(tmp_path / "bad.parquet")
