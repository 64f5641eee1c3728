"""Compatibility with DeepSeek's own Engram code: the official demo's module weights (``engram_demo_v1.py``),
imported into and exported from our ``Engram``, and DeepSeek-V4.1's released Engram weights
(``from_release_state_dict`` / ``to_release_state_dict``, the same as ``EngramV41``'s methods, in
``engram.model.v41_release``) and its checkpoint directory, the tables served from the shards in place
(``open_v41``, in ``engram.compat.v41_checkpoint``).

The demo's module is ours with three numerics switched on (``DEMO_MODULE``): biases on W_K and W_V,
``nn.RMSNorm``'s default eps (None: the fp32 machine epsilon) on the gate's norms, and eps 1e-5 on the
conv's norms (docs/ALGORITHM.md, "The demo's exact module"). Its state dict keys and shapes map onto ours
as follows (G branches, D width, M memory width, K taps):

    multi_head_embedding.embedding.weight (N, d_h)   embedding.weight
    multi_head_embedding.offsets (H,)                checked against our hash layout, not stored
    key_projs.{g}.weight (D, M), .bias (D,)          key_proj.weight[g], key_proj.bias[g]
    value_proj.weight (D, M), .bias (D,)             value_proj.weight, value_proj.bias
    norm1.{g}.weight (D,)                            norm_key.weight[g]    (the demo's norm1 normalises the key)
    norm2.{g}.weight (D,)                            norm_query.weight[g]  (and norm2 the hidden state)
    short_conv.conv.weight (G*D, 1, K)               conv_weight (G, D, K), channel g*D + d
    short_conv.norms.{g}.weight (D,)                 norm_conv.weight[g]

docs/DEEPSEEK.md says what was checked against the demo.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Mapping

import torch

from engram.hashing import TableGeometry, table_geometry
from engram.model.engram import Engram
from engram.model.table_config import EngramConfig
from engram.model.v41_release import from_release_state_dict as _from_release
from engram.model.v41_release import release_prefix, to_release_state_dict
from engram.compat.v41_checkpoint import ReleaseEngram, open_v41

__all__ = ["DEMO_MODULE", "ReleaseEngram", "from_demo_state_dict", "from_release_state_dict", "open_v41",
           "release_prefix", "to_demo_state_dict", "to_release_state_dict"]

# The official demo module's numerics: biased W_K and W_V, nn.RMSNorm's default eps (None: the fp32
# machine epsilon) on the gate's norms and eps 1e-5 on the conv's.
DEMO_MODULE = {"proj_bias": True, "gate_norm_eps": None, "conv_norm_eps": 1e-5}


def from_demo_state_dict(state_dict: Mapping[str, torch.Tensor], config: EngramConfig, dim: int, *,
                         layer_id: int | None = None, sparse_table: bool = False) -> Engram:
    """The official demo's Engram module, from its ``state_dict``: our module with the demo's biases
    and norm eps switched on (``DEMO_MODULE``), whose output equals the demo module's.

    ``config``: our ``EngramConfig`` for that model (its table sizes, orders, heads, kernel, seed and
    every Engram layer, since the primes are searched over all of them); ``layer_id`` picks the layer
    (needed when the config has more than one); ``dim``: D. G is read from the state dict. Every key,
    shape and the offsets are checked against our hash layout before anything is copied; a missing,
    unexpected or mis-shaped entry raises ``ValueError`` naming it.
    """
    if config.gate != "signed_sqrt" or not config.short_conv or not config.branch_keys:
        raise ValueError("the demo module has the signed-sqrt gate, the short conv and one W_K per branch; "
                         f"got gate={config.gate!r}, short_conv={config.short_conv}, "
                         f"branch_keys={config.branch_keys}")
    layer_id = config.resolve_layer(layer_id)
    config = dataclasses.replace(config, **DEMO_MODULE)
    geometry = table_geometry(config, config.layer_ids)[layer_id]
    branches = sum(1 for key in state_dict if key.startswith("key_projs.") and key.endswith(".weight"))
    if branches < 1:
        raise ValueError("not a demo Engram state dict: no key_projs.{g}.weight entries")
    expected = _demo_shapes(config, dim, branches, geometry)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"demo state dict (G={branches}): missing keys {missing}, unexpected keys {unexpected}")
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != shape:
            raise ValueError(f"demo state dict: {key} has shape {tuple(state_dict[key].shape)}, "
                             f"expected {shape} (layer {layer_id}, D={dim}, G={branches})")
    offsets = [int(x) for x in state_dict["multi_head_embedding.offsets"].tolist()]
    if offsets != list(geometry.offsets):
        raise ValueError(f"demo state dict: multi_head_embedding.offsets {_clip(offsets)} differ from our hash "
                         f"layout's {_clip(list(geometry.offsets))} for layer {layer_id}: another table "
                         "size, seed or set of Engram layers")
    with torch.device("meta"):
        module = Engram(config, dim, geometry, branches=branches, sparse_table=sparse_table)
    module.to_empty(device=state_dict["multi_head_embedding.embedding.weight"].device)
    module.embedding.reset_buffers()
    with torch.no_grad():
        for ours, tensor in _demo_views(module).items():
            tensor.copy_(state_dict[ours].reshape(tensor.shape))
    return module


def to_demo_state_dict(module: Engram) -> dict[str, torch.Tensor]:
    """This module's weights under the demo module's key names and shapes (``from_demo_state_dict``'s
    inverse). A module without biases writes zero biases; one built with other norm eps warns, since
    the demo module would compute with its own."""
    c = module.config
    if c.gate != "signed_sqrt" or not c.short_conv or not c.branch_keys:
        raise ValueError("only the demo's module shape (signed-sqrt gate, short conv, W_K per branch) has a "
                         "demo state dict")
    if (c.gate_norm_eps, c.conv_norm_eps) != (DEMO_MODULE["gate_norm_eps"], DEMO_MODULE["conv_norm_eps"]):
        warnings.warn("this Engram's norm eps differ from the demo's (None on the gate norms, 1e-5 on the "
                      "conv norms): the demo module will compute slightly different outputs", stacklevel=2)
    out = {key: tensor.detach().clone() for key, tensor in _demo_views(module).items()}
    out["multi_head_embedding.offsets"] = module.embedding.offsets.detach().clone()
    return {key: out[key].reshape(shape) if key in out else
            torch.zeros(shape, dtype=module.value_proj.weight.dtype, device=module.value_proj.weight.device)
            for key, shape in _demo_shapes(c, module.dim, module.branches, module.embedding.geometry).items()}


def _demo_views(module: Engram) -> dict[str, torch.Tensor]:
    """Demo key -> our tensor (or a view of it) holding the same numbers; biases only when present."""
    G = module.branches
    views = {"multi_head_embedding.embedding.weight": module.embedding.weight,
             "value_proj.weight": module.value_proj.weight,
             "short_conv.conv.weight": module.conv_weight}  # (G, D, K) is the demo's (G*D, 1, K), channel g*D+d
    if module.value_proj.bias is not None:
        views["value_proj.bias"] = module.value_proj.bias
    for g in range(G):
        views[f"key_projs.{g}.weight"] = module.key_proj.weight[g]
        if module.key_proj.bias is not None:
            views[f"key_projs.{g}.bias"] = module.key_proj.bias[g]
        views[f"norm1.{g}.weight"] = module.norm_key.weight[g]  # the demo's norm1 normalises the key
        views[f"norm2.{g}.weight"] = module.norm_query.weight[g]  # and norm2 the hidden state
        views[f"short_conv.norms.{g}.weight"] = module.norm_conv.weight[g]
    return views


def _demo_shapes(config: EngramConfig, dim: int, branches: int, geometry: TableGeometry) -> dict[str, tuple]:
    """Every key of the demo module's state dict and its shape."""
    M, K = config.memory_dim, config.kernel_size
    shapes = {"multi_head_embedding.embedding.weight": (geometry.num_rows, config.head_dim),
              "multi_head_embedding.offsets": (geometry.n_heads,),
              "value_proj.weight": (dim, M), "value_proj.bias": (dim,),
              "short_conv.conv.weight": (branches * dim, 1, K)}
    for g in range(branches):
        shapes |= {f"key_projs.{g}.weight": (dim, M), f"key_projs.{g}.bias": (dim,),
                   f"norm1.{g}.weight": (dim,), f"norm2.{g}.weight": (dim,), f"short_conv.norms.{g}.weight": (dim,)}
    return shapes


def _clip(values: list, limit: int = 6) -> str:
    return str(values) if len(values) <= limit else f"[{', '.join(map(str, values[:limit]))}, ...]"


def from_release_state_dict(state_dict, config: EngramConfig, layer_id: int | None = None, *,
                            sparse_table: bool = False, table=None):
    """DeepSeek-V4.1's released weights of Engram layer ``layer_id`` as an ``EngramV41`` (see
    ``EngramV41.from_release_state_dict``)."""
    from engram.model.engram_v41 import EngramV41

    return _from_release(EngramV41, state_dict, config, layer_id, sparse_table=sparse_table, table=table)
