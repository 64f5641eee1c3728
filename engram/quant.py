"""FP8 e4m3 codes with power-of-two (ue8m0) scales per block: DeepSeek-V4.1's format for its Engram tables
(one scale per 32 values of a row) and its fp8 projections (one scale per 2-D block of the weight). The
storage tiers (``engram.storage.formats``) and the V4.1 release loader (``engram.model.v41_release``)
share it.

Legend: R, C a tensor's rows and columns; (br, bc) a block's; a block's scale is s = 2^(e - 127), stored as
its biased exponent byte e (0..254; 255 is e8m0's NaN). Encoding picks the smallest power of two with
amax(block) / s <= 448 (e4m3's largest value), so nothing saturates; decoding is code * s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_MAX = 448.0  # largest finite e4m3fn value
E8M0_BIAS = 127

FP8_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()  # byte -> value
E8M0_VALUES = torch.ldexp(torch.ones(256), torch.arange(256) - E8M0_BIAS)  # byte -> 2^(byte - 127)
E8M0_VALUES[255] = float("nan")  # the format's NaN


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 codes or e8m0 scales as their uint8 bytes, whether stored as uint8 or as torch's float8 dtypes."""
    if t.dtype == torch.uint8:
        return t
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu):
        return t.view(torch.uint8)
    raise ValueError(f"expected fp8 bytes (uint8, float8_e4m3fn or float8_e8m0fnu), got {t.dtype}")


def scale_values(scales: torch.Tensor) -> torch.Tensor:
    """Scales as fp32 multipliers: e8m0 bytes (uint8 / float8_e8m0fnu) through their table, or fp32 as given
    (transformers' ``weight_scale_inv`` convention)."""
    if scales.dtype in (torch.uint8, torch.float8_e8m0fnu):
        return E8M0_VALUES[as_bytes(scales).long()]
    return scales.float()


def scale_exponents(amax: torch.Tensor) -> torch.Tensor:
    """The biased exponent bytes e of the smallest power-of-two scales with amax / 2^(e-127) <= 448."""
    ratio = amax / FP8_MAX
    mantissa, exponent = torch.frexp(ratio)  # ratio = m * 2^k, m in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)  # ceil(log2): an exact power of two stays
    # amax / 448 underflows to 0 below ~2^-141 (and is 0 for a zero block): the smallest scale then
    exponent = torch.where(ratio > 0, exponent, torch.full_like(exponent, -E8M0_BIAS))
    exponent = exponent.clamp(-E8M0_BIAS, E8M0_BIAS)
    exponent = exponent + (amax / torch.ldexp(torch.ones_like(amax), exponent) > FP8_MAX).to(exponent.dtype)
    return (exponent + E8M0_BIAS).to(torch.uint8)


def _tiles(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(R, C) -> (R/br, C/bc, br, bc) blocks, zero-padded to whole blocks."""
    (R, C), (br, bc) = x.shape, block
    Rb, Cb = -(-R // br), -(-C // bc)
    padded = F.pad(x, (0, Cb * bc - C, 0, Rb * br - R))
    return padded.view(Rb, br, Cb, bc).transpose(1, 2)


def encode_blocks(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (R, C) finite -> e4m3 code bytes (R, C) uint8 and scale bytes (ceil(R/br), ceil(C/bc)) uint8."""
    x = x.detach().float()
    tiles = _tiles(x, block)  # (Rb, Cb, br, bc)
    exponents = scale_exponents(tiles.abs().amax(dim=(-2, -1)))  # (Rb, Cb)
    scale = E8M0_VALUES[exponents.long()]  # powers of two: dividing is exact
    codes = (tiles / scale[..., None, None]).to(torch.float8_e4m3fn).view(torch.uint8)  # (Rb, Cb, br, bc)
    R, C = x.shape
    full = codes.transpose(1, 2).reshape(codes.shape[0] * block[0], codes.shape[1] * block[1])
    return full[:R, :C].contiguous(), exponents


def decode_blocks(codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """e4m3 codes (R, C) and per-block scales (Rb, Cb) -> fp32 (R, C). ``block`` defaults to the one the
    shapes imply (ceil(R / br) == Rb and ceil(C / bc) == Cb with powers of two br, bc)."""
    values = FP8_VALUES[as_bytes(codes).long()]  # (R, C)
    scale = scale_values(scales)
    (R, C), (Rb, Cb) = values.shape, scale.shape
    br, bc = block or (block_size(R, Rb), block_size(C, Cb))
    if -(-R // br) != Rb or -(-C // bc) != Cb:
        raise ValueError(f"scales {tuple(scale.shape)} do not tile codes {tuple(values.shape)} in blocks of {(br, bc)}")
    return values * scale.repeat_interleave(br, dim=0)[:R].repeat_interleave(bc, dim=1)[:, :C]


def block_size(n: int, blocks: int) -> int:
    """The power-of-two block (1 .. n) that cuts n values into ``blocks`` blocks; ValueError when none does."""
    size = 1
    while size < max(n, 1) and -(-n // size) != blocks:
        size *= 2
    if -(-n // size) != blocks:
        raise ValueError(f"{blocks} scales do not cut {n} values into power-of-two blocks")
    return size
