"""Data-parallel MESS training with Ray Train: a TorchTrainer (DDP) whose workers each run the same
`train_loop.run_plan` loop as the single-process path, on their shard of every epoch.

One worker per GPU (`use_gpu` when CUDA is present). On a CPU-only machine each worker takes one CPU
slot and DDP runs over gloo: the same code path, useful for tests and for CPU clusters. Rank 0 writes
mess.pt, train_state.pt and train_log.csv into the output folder, so on a multi-node cluster that folder
must be on storage the rank-0 node can write and the driver can read (a shared file system).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from .errors import MessError
from .ray_runtime import connect
from .train_loop import Plan, run_plan
from .train_stages import Runtime


def _worker(config: dict) -> None:
    """train_loop_per_worker: rebuild the Plan and run it with Ray Train's model and loader wrappers."""
    import ray.train
    import ray.train.torch

    plan = Plan(**config["plan"])
    ctx = ray.train.get_context()
    rt = Runtime(device=ray.train.torch.get_device(), rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                 progress=plan.progress)
    if rt.device.type == "cuda":
        plan.device = "cuda"
    run_plan(plan, rt, wrap_model=ray.train.torch.prepare_model,
             wrap_loader=lambda loader: ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False))


def run_ray(plan, workers: int, address: str | None = None) -> Path:
    """Train `plan` on `workers` Ray Train workers (GPUs if this machine or cluster has them, else CPU slots)."""
    ray = connect(address, what="`messearch train --gpus N` (Ray Train)", instead="train in this process without --gpus")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = torch.cuda.is_available() or bool(ray.cluster_resources().get("GPU", 0))
    out = Path(plan.out_dir)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"plan": asdict(plan)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(name="train", storage_path=str(out / "ray")),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Train V2 raises a TrainingFailedError wrapping the worker's exception
        cause = e.__cause__ or e
        if isinstance(cause, MessError):
            raise cause from None
        raise
    if getattr(result, "error", None):
        raise result.error
    path = out / "mess.pt"
    if not path.exists():
        raise MessError(f"Ray Train finished but {path} was not written (is {out} on storage the rank-0 worker shares?)")
    return path
