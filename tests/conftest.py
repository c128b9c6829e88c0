import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray with two CPUs for the whole test session."""
    import ray

    if not ray.is_initialized():
        # address="local": our own Ray, never one that another process on this machine started with `ray start`
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


TINY = """
name: tiny
model: deeplabv3_resnet18
num_classes: 8
input_size: [64, 64]
data: synthetic:seed=0,train=16,val=12
positions: [backbone.layer1.1, backbone.layer2.1, backbone.layer3.1]
heads:
  - {name: lin, reduction: 4, layers: 0}
  - {name: c1, reduction: 4, layers: 1}
thresholds: {start: 0.5, stop: 0.9, num: 5}
max_exits: 2
train: {batch_size: 8, epochs_stage1: 1, epochs_stage2: 1, train_images: 16, val_images: 8}
"""


@pytest.fixture(scope="session")
def journey(tmp_path_factory, ray_local):
    """A whole pipeline run on a tiny space (shared by the journey and README tests)."""
    from messearch.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("journey")
    space = root / "tiny.yaml"
    space.write_text(TINY)
    summary = run_pipeline(str(space), None, root / "run")
    return root, space, summary
