"""Devices: parsing a `--device` value, checking CUDA is there, and a human name of the hardware."""

from __future__ import annotations

import platform

import torch

from .errors import MessError

ALLOWED = "cpu, cuda, cuda:N"


def parse_device(device: str) -> torch.device:
    """The torch.device of a `--device` value (cpu, cuda, cuda:N); MessError when it is not one or CUDA is absent."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MessError(f"--device {device!r}: allowed: {ALLOWED}") from None
    if dev.type not in ("cpu", "cuda"):
        raise MessError(f"--device {device!r}: allowed: {ALLOWED}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MessError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu")
    return dev


def exact_numerics(device: torch.device) -> None:
    """On CUDA, deterministic cuDNN without autotuning: the cache and the evaluation of an exported model then run
    the same kernels on the same shapes, so the model measures the front's figures exactly (training turns
    autotuning on for speed). Nothing to do on a CPU, where the thread count is what must match."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def device_kind(device: str) -> str:
    """'cuda' or 'cpu': the short name a profile file is named after."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


def device_name(device: torch.device) -> str:
    """A human name of the device: the GPU's model, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
