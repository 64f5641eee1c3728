"""Finding what the adapter needs in a base model: its decoder blocks, its width, and the identity an
adapter must match (type and shape, not weights)."""

from __future__ import annotations

from torch import nn


def n_layers(config) -> int | None:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the base model's decoder blocks: the one ``nn.ModuleList`` holding
    ``config.num_hidden_layers`` modules (Llama, Mistral, Qwen2/3, Gemma, Phi: ``model.layers``; GPT-2:
    ``transformer.h``; GPT-NeoX: ``gpt_neox.layers``); a clear error naming what was found otherwise."""
    n = n_layers(getattr(model, "config", None))
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    found = [(name, m) for name, m in lists if n is not None and len(m) == n]
    if len(found) != 1:
        seen = ", ".join(f"{name or '<root>'} ({len(m)})" for name, m in lists) or "none"
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: expected one nn.ModuleList of "
                         f"num_hidden_layers={n} modules, found ModuleLists: {seen}")
    return found[0]


def model_dim(model: nn.Module) -> int:
    config = model.config
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(model).__name__}'s config names no hidden size (hidden_size / n_embd / d_model)")


def base_identity(model: nn.Module) -> dict:
    """What an adapter must match in a base model: its type and shape (not its weights)."""
    config = model.config
    return {"model_type": getattr(config, "model_type", None), "hidden_size": model_dim(model),
            "num_hidden_layers": n_layers(config), "vocab_size": getattr(config, "vocab_size", None)}
