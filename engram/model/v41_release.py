"""DeepSeek-V4.1's released Engram weights, in and out of our ``EngramV41`` (``EngramV41.from_release_state_dict``,
``EngramV41.to_release_state_dict``; ``engram.compat.deepseek`` has the same functions and the checkpoint
directory reader).

Legend: N table rows (the sum of the layer's head primes: the release stores no padding), d_h row width,
M = d_mem, G branches, D model width.

Per Engram layer L the release holds, under DeepSeek's names ``layers.{L}.engram.*`` (transformers' add a
``model.`` in front):

    embed.weight    (N, d_h)        the table: fp8 e4m3 codes, or bf16 / fp32
    embed.scale     (N, d_h / 32)   ue8m0 scale per 32 values of a row (fp8 tables only)
    wkv.weight      ((G+1) D, M)    the fused keys (G row blocks) and value: fp8 e4m3, or bf16 / fp32
    wkv.scale       (.., ..)        ue8m0 scale per 2-D block of wkv (fp8 only; transformers' FP8
                                    convention names it wkv.weight_scale_inv, ue8m0 or fp32)
    q_weight        (G, D)          the query norm's gain (bf16 or fp32)
    k_weight        (G, D)          the key norm's gain

Reading checks every name, shape, dtype and the table's rows against our hash layout before copying
anything, and refuses a mismatch by name. Tensors are decoded to fp32 (fp8 through ``engram.quant``); the
gains keep their exact values, so a bf16 release computes with the fp32 product of its two bf16 gains.
"""

from __future__ import annotations

import torch

from engram.hashing import table_geometry
from engram.model.table_config import EngramConfig
from engram.quant import decode_blocks, encode_blocks

FP8 = torch.float8_e4m3fn
TABLE_BLOCK = 32  # values per ue8m0 scale along a table row
WKV_BLOCK = (32, 32)  # rows x columns of wkv per ue8m0 scale, as V4.1 stores it
NAMES = ("deepseek", "transformers")
DTYPES = ("float32", "bfloat16", "fp8_e4m3")
_SCALE_NAMES = ("wkv.scale", "wkv.weight_scale_inv")


def release_prefix(layer_id: int, names: str) -> str:
    """``layers.{L}.engram.`` (DeepSeek's names) or ``model.layers.{L}.engram.`` (transformers')."""
    if names not in NAMES:
        raise ValueError(f"names must be one of {NAMES}, got {names!r}")
    return f"{'model.' if names == 'transformers' else ''}layers.{layer_id}.engram."


def _find_prefix(state_dict, layer_id: int) -> str:
    found = [p for p in (release_prefix(layer_id, n) for n in NAMES) if p + "embed.weight" in state_dict]
    if not found and "embed.weight" in state_dict:
        return ""  # the module's own names
    if len(found) != 1:
        seen = sorted(k for k in state_dict if ".engram." in k or k.startswith("engram."))[:6]
        raise ValueError(f"no Engram layer {layer_id} in this state dict: expected layers.{layer_id}.engram.embed.weight "
                         f"(DeepSeek's names) or model.layers.{layer_id}.engram.embed.weight (transformers'); "
                         f"Engram keys seen: {seen}")
    return found[0]


def _fp32(name: str, tensor: torch.Tensor, scale: torch.Tensor | None, block) -> torch.Tensor:
    """A released tensor as fp32: fp8 through its scales, bf16 / fp32 as it is."""
    if tensor.dtype in (FP8, torch.uint8):
        if scale is None:
            raise ValueError(f"{name} is fp8 but its scale tensor is missing")
        try:
            return decode_blocks(tensor, scale, block)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    if scale is not None:
        raise ValueError(f"{name} is {tensor.dtype} but has a scale tensor (only fp8 tensors have scales)")
    if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} has dtype {tensor.dtype}; the release stores fp8 e4m3, bf16 or fp32")
    return tensor.float()


def _check_table_dtypes(prefix: str, ours: dict) -> None:
    """The table's codes and scales agree with each other (fp8 needs (N, d_h / 32) scales, others none)."""
    weight, scale = ours["embed.weight"], ours.get("embed.scale")
    if weight.dtype in (FP8, torch.uint8):
        if scale is None:
            raise ValueError(f"{prefix}embed.weight is fp8 but its scale tensor is missing")
        if tuple(scale.shape) != (weight.shape[0], -(-weight.shape[1] // TABLE_BLOCK)):
            raise ValueError(f"{prefix}embed.scale has shape {tuple(scale.shape)}, the table needs "
                             f"{(weight.shape[0], -(-weight.shape[1] // TABLE_BLOCK))} (one per {TABLE_BLOCK} values)")
    elif scale is not None:
        raise ValueError(f"{prefix}embed.weight is {weight.dtype} but has a scale tensor (only fp8 tensors have scales)")
    elif weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{prefix}embed.weight has dtype {weight.dtype}; the release stores fp8 e4m3, bf16 or fp32")


def from_release_state_dict(cls, state_dict, config: EngramConfig, layer_id: int | None = None, *,
                            sparse_table: bool = False, table=None):
    """``cls`` (``EngramV41``) holding the released weights of Engram layer ``layer_id`` (needed when
    ``config`` has several; the primes are searched over all of them). G and D are read from the gains.

    ``table``: a ``HashedTable`` that already serves the released rows (a storage tier over the shards);
    the table's entries are then checked by shape and dtype only (they may be meta tensors) and never read."""
    if config.variant != "v4.1":
        raise ValueError(f"the V4.1 release's weights need EngramConfig.variant='v4.1', got {config.variant!r}")
    layer_id = config.resolve_layer(layer_id)
    prefix = _find_prefix(state_dict, layer_id)
    ours = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    scale_names = [n for n in _SCALE_NAMES if n in ours]
    known = {"embed.weight", "embed.scale", "wkv.weight", "q_weight", "k_weight", *_SCALE_NAMES}
    unexpected = sorted(prefix + k for k in set(ours) - known)
    missing = sorted(prefix + k for k in ("embed.weight", "wkv.weight", "q_weight", "k_weight") if k not in ours)
    if missing or unexpected or len(scale_names) > 1:
        raise ValueError(f"Engram layer {layer_id} of the release: missing {missing}, unexpected {unexpected}"
                         + (f", two wkv scales {[prefix + n for n in scale_names]}" if len(scale_names) > 1 else ""))
    q, k = ours["q_weight"], ours["k_weight"]
    if q.dim() != 2 or q.shape != k.shape:
        raise ValueError(f"{prefix}q_weight {tuple(q.shape)} and {prefix}k_weight {tuple(k.shape)} must both be (G, D)")
    G, D = q.shape
    geometry = table_geometry(config, config.layer_ids)[layer_id]
    rows = sum(geometry.sizes)  # the release stores no padding rows
    expected = {"embed.weight": (rows, config.head_dim), "wkv.weight": ((G + 1) * D, config.memory_dim)}
    for name, shape in expected.items():
        if tuple(ours[name].shape) != shape:
            raise ValueError(f"{prefix}{name} has shape {tuple(ours[name].shape)}, our layout of layer {layer_id} needs "
                             f"{shape} ({geometry.n_heads} heads of {rows} rows in all, d_h "
                             f"{config.head_dim}, G={G}, D={D}): another table size, seed or set of Engram layers?")
    _check_table_dtypes(prefix, ours)
    wkv = _fp32(prefix + "wkv.weight", ours["wkv.weight"], ours[scale_names[0]] if scale_names else None, None)
    with torch.device("meta"):
        module = cls(config, D, geometry, branches=G, sparse_table=sparse_table)
    if table is not None:  # served where it lies: only the projection and the gains are materialised
        if (table.num_rows, table.dim) != (rows, config.head_dim):
            raise ValueError(f"the table given has {(table.num_rows, table.dim)} rows x width, the release "
                             f"{(rows, config.head_dim)}")
        module.embedding = table
        module.wkv.to_empty(device="cpu")
        module.q_weight, module.k_weight = (torch.nn.Parameter(torch.empty(G, D)) for _ in range(2))
    else:
        decoded = _fp32(prefix + "embed.weight", ours["embed.weight"], ours.get("embed.scale"), (1, TABLE_BLOCK))
        module.to_empty(device="cpu")
        module.embedding.reset_buffers()
        with torch.no_grad():
            module.embedding.weight.zero_()
            module.embedding.weight[:rows].copy_(decoded)
    with torch.no_grad():
        module.wkv.weight.copy_(wkv)
        module.q_weight.copy_(_fp32(prefix + "q_weight", q, None, None))
        module.k_weight.copy_(_fp32(prefix + "k_weight", k, None, None))
    return module


def to_release_state_dict(module, layer_id: int | None = None, names: str = "deepseek",
                          dtype: str = "float32") -> dict[str, torch.Tensor]:
    """``module``'s weights under the release's names (``names``: "deepseek" or "transformers") in ``dtype``:
    "float32", "bfloat16", or "fp8_e4m3" (table and wkv as e4m3 codes with ue8m0 scales; the gains in
    fp32). ``layer_id`` defaults to the config's only Engram layer."""
    config = module.config
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    layer_id = config.resolve_layer(layer_id)
    prefix = release_prefix(layer_id, names)
    table = module.embedding.weight.detach().float().cpu()[: sum(module.embedding.geometry.sizes)]
    wkv = module.wkv.weight.detach().float().cpu()
    gains = {"q_weight": module.q_weight.detach().float().cpu(), "k_weight": module.k_weight.detach().float().cpu()}
    if dtype == "fp8_e4m3":
        codes, scales = encode_blocks(table, (1, TABLE_BLOCK))
        wkv_codes, wkv_scales = encode_blocks(wkv, WKV_BLOCK)
        out = {"embed.weight": codes.view(FP8), "embed.scale": scales.view(torch.float8_e8m0fnu),
               "wkv.weight": wkv_codes.view(FP8)}
        if names == "transformers":
            out["wkv.weight_scale_inv"] = wkv_scales.view(torch.float8_e8m0fnu)
        else:
            out["wkv.scale"] = wkv_scales.view(torch.float8_e8m0fnu)
        out |= gains
    else:
        cast = torch.float32 if dtype == "float32" else torch.bfloat16
        out = {"embed.weight": table.to(cast), "wkv.weight": wkv.to(cast)} | {k: v.to(cast) for k, v in gains.items()}
    return {prefix + k: v.contiguous() for k, v in out.items()}
