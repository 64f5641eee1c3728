"""Named random streams for initial weights: what makes a seed *pair* two models.

``EngramLM.init_weights`` takes one draw of torch's generator and gives every parameter its own stream,
``derive_seed(seed, name)``, so a weight's initial value depends on the seed and its name alone, not on
what was drawn before it. Two models that hold a weight of the same name and shape (an MoE and its
Engram twin) start it equal. Along the dimensions that twins resize, each slice has its own stream: a
routed expert (``MoE.init_weights``) and a hidden unit of a SwiGLU (``normal_units_``), so a narrower
FFN starts as the first units of a wider one.

``INIT_SCHEME`` names this scheme. Results trained under another scheme (0.1's one global stream, or
scheme 1's one stream per module) are not retrained equal by the same seed; the sweep runner records
the scheme and refuses to mix them.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch

INIT_SCHEME = 2


def reset_derived_buffers(module: torch.nn.Module) -> None:
    """Recompute every buffer under ``module`` that its config decides (hashers, RoPE, table offsets, MoE
    state: each module with a ``reset_buffers``), e.g. after ``to_empty``, which leaves buffers unset."""
    for sub in module.modules():
        if hasattr(sub, "reset_buffers"):
            sub.reset_buffers()


def derive_seed(seed: int, name: str) -> int:
    """A weight's own seed from the model's seed and the weight's (module) name. (The "engram.table"
    prefix is from when only tables were seeded by name: kept, so a seed still fills the same tables.)"""
    digest = hashlib.sha256(f"engram.table:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextlib.contextmanager
def seeded(seed: int):
    """Inside the block torch's generators draw from ``seed``; the caller's streams are restored after.
    For modules that initialise themselves with ``nn.init`` (Engram, hyper-connections, OverEncoding).
    The CPU generator always; CUDA devices already initialised too (an uninitialised one is left alone:
    seeding it would queue a seed for later)."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for device in cuda:
            torch.cuda.default_generators[device].manual_seed(seed)
        yield


@torch.no_grad()
def normal_(weight: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """Fill ``weight`` with N(0, std) drawn on the CPU from its own generator (the same values on every
    device)."""
    if weight.device.type == "meta":
        return weight
    generator = torch.Generator().manual_seed(seed)
    weight.copy_(torch.randn(weight.shape, generator=generator, dtype=torch.float32).mul_(std))
    return weight


@torch.no_grad()
def normal_units_(inputs: list[torch.Tensor], outputs: list[torch.Tensor], std: float, out_std: float,
                  seed: int) -> None:
    """A SwiGLU's weights by hidden unit: unit j's rows of ``inputs`` (each (F, D)) and columns of
    ``outputs`` (each (D, F)) from the stream ``derive_seed(seed, "unit.j")``. A SwiGLU of F' < F units
    then starts as the first F' units of one of F."""
    if any(w.device.type == "meta" for w in inputs + outputs):
        return
    units, dim = inputs[0].shape
    generator = torch.Generator()
    for j in range(units):
        generator.manual_seed(derive_seed(seed, f"unit.{j}"))
        draws = torch.randn(len(inputs) + len(outputs), dim, generator=generator)
        for k, w in enumerate(inputs):
            w[j].copy_(draws[k] * std)
        for k, w in enumerate(outputs):
            w[:, j].copy_(draws[len(inputs) + k] * out_std)
