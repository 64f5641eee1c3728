"""Where and in what precision training runs: ``resolve_device`` (the config's device name -> a device)
and ``autocast`` (bf16 on CUDA, fp32 on the CPU)."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA when present, else the CPU; a CUDA device without CUDA is refused by name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device={name!r} but CUDA is not available")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 on CPU (bf16 is emulated there and ~300x slower)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
