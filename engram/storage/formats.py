"""Row formats of stored Engram tables: how a row's d_h values become bytes, and back.

Legend: n rows, d d_h (row width), S scales per row.

Training keeps fp32 tables; these formats are for storage and serving (``export_tables(dtype=...)``, the
host and disk tiers, the row cache). A format has codes (n, d) and, for the quantised ones, scales:

| format    | code (bytes/value) | scales                                   | bound on abs(x - decode(encode(x)))   |
|-----------|--------------------|------------------------------------------|---------------------------------------|
| float32   | fp32 (4)           | -                                        | 0 (exact)                             |
| float16   | fp16 (2)           | -                                        | IEEE fp16 rounding (overflow refused) |
| bfloat16  | bf16 (2)           | -                                        | abs(x) / 256 + 2^-134                 |
| int8      | int8 (1)           | one fp32 per row, s = amax(row) / 127    | s / 2 + abs(x) * 2^-22 + 2^-142       |
| fp8_e4m3  | e4m3fn (1)         | one ue8m0 byte per block of 32 values:   | max(abs(x) / 16, s / 1024)            |
|           |                    | s = 2^ceil(log2(amax(block) / 448))      |                                       |

fp8_e4m3 is DeepSeek-V4.1's table format: e4m3 (3 mantissa bits, largest 448) codes with a power-of-two
scale per 32 values of a row, stored as its biased exponent byte e (s = 2^(e - 127), e in 0..254; 255,
the format's NaN, is refused). s is the smallest power of two with amax / s <= 448, so nothing saturates;
the bound is half an e4m3 step (2^-4 relative for normal codes, 2^-10 * s for subnormal ones). The small
additive terms are fp32's own subnormal rounding (a row of values near 1e-40). A zero row or block
decodes to exact zeros in every format; fp16 overflow (beyond 65504) is refused at export.

Codes and scales travel as torch tensors in memory (fp8 codes as their uint8 bytes) and as
little-endian arrays on disk (``numpy_dtype``); ``decode`` returns fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engram.quant import E8M0_VALUES, FP8_MAX, FP8_VALUES, encode_blocks  # noqa: F401 (FP8_MAX: its name here before)

FP8_BLOCK = 32  # values per ue8m0 scale (DeepSeek-V4.1's tables: 8 scales per 256-wide row)
INT8_MAX = 127


@dataclass(frozen=True)
class RowFormat:
    """One storage format: ``encode`` fp32 rows (n, d) -> codes (n, d) + scales (n, S) or None;
    ``decode`` back to fp32."""

    name: str
    code_dtype: torch.dtype  # in memory (fp8 codes as uint8 bytes)
    numpy_dtype: str  # on disk, little-endian (bfloat16 as uint16)
    scale: str | None = None  # None, "row" (one fp32 per row) or "block" (one ue8m0 byte per FP8_BLOCK values)
    block: int = 0

    @property
    def quantised(self) -> bool:
        return self.scale is not None

    @property
    def code_bytes(self) -> int:
        return np.dtype(self.numpy_dtype).itemsize

    @property
    def scale_dtype(self) -> torch.dtype | None:
        return {None: None, "row": torch.float32, "block": torch.uint8}[self.scale]

    @property
    def scale_numpy_dtype(self) -> str | None:
        return {None: None, "row": "<f4", "block": "u1"}[self.scale]

    def scales_per_row(self, dim: int) -> int:
        """S: scales of one row (0 for the float formats)."""
        return {None: 0, "row": 1, "block": -(-dim // max(1, self.block))}[self.scale]

    def row_bytes(self, dim: int) -> int:
        """Bytes of one stored row, codes and scales."""
        scale_bytes = 0 if self.scale is None else np.dtype(self.scale_numpy_dtype).itemsize
        return dim * self.code_bytes + self.scales_per_row(dim) * scale_bytes

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """rows (n, d) finite -> codes (n, d) ``code_dtype``, scales (n, S) or None."""
        x = rows.detach().float()
        if self.scale is None:
            return x.to(self.code_dtype), None
        if self.scale == "row":
            scale = x.abs().amax(dim=1) / INT8_MAX  # (n,)
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            codes = torch.round(x / safe[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
            return codes, scale[:, None]  # (n, 1)
        return encode_blocks(x, (1, self.block))  # (n, d) codes, (n, S) scale bytes (engram.quant)

    def decode(self, codes: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """codes (n, d), scales (n, S) or None -> fp32 rows (n, d). Few ops: it runs on every gather of a
        serving tier (fp8 through two 256-entry tables, ~2x faster than casting float8 on a CPU)."""
        if self.scale is None:
            return codes.float()
        if self.scale == "row":
            return torch.mul(codes, scales)  # int8 * fp32 -> fp32 in one op
        n, d = codes.shape
        # index_select with int32 indices: ~2x faster than indexing with int64 on a CPU (one gather of n*d values)
        values = torch.index_select(_FP8_VALUES, 0, codes.reshape(-1).int())  # (n*d,)
        scale = torch.index_select(_E8M0_VALUES, 0, scales.reshape(-1).int()).view(scales.shape)  # (n, S)
        if scale.shape[1] == 1:
            return values.view(n, d).mul_(scale)
        if d % self.block == 0:
            return values.view(n, d // self.block, self.block).mul_(scale[..., None]).view(n, d)
        return values.view(n, d).mul_(scale.repeat_interleave(self.block, dim=1)[:, :d])

    def scales_finite(self, scales: np.ndarray) -> np.ndarray:
        """(n, S) stored scales -> (n,) True where every scale of the row is usable."""
        if self.scale == "row":
            return np.isfinite(scales).all(axis=1) & (scales >= 0).all(axis=1)
        return (scales != 255).all(axis=1)  # 0xFF is e8m0's NaN

    def codes_finite(self, codes: np.ndarray) -> np.ndarray:
        """(n, d) stored codes -> (n,) True where every code of the row is a finite value."""
        if self.name == "bfloat16":  # non-finite iff every exponent bit is set
            return ((codes & 0x7F80) != 0x7F80).all(axis=1)
        if self.name == "fp8_e4m3":  # e4m3fn has no inf; NaN is S.1111.111
            return ((codes & 0x7F) != 0x7F).all(axis=1)
        if self.name == "int8":
            return np.ones(len(codes), dtype=bool)
        return np.isfinite(codes).all(axis=1)


_FP8_VALUES, _E8M0_VALUES = FP8_VALUES, E8M0_VALUES  # byte -> value; e8m0's NaN (255) is refused at verification


FORMATS = {
    "float32": RowFormat("float32", torch.float32, "<f4"),
    "float16": RowFormat("float16", torch.float16, "<f2"),
    "bfloat16": RowFormat("bfloat16", torch.bfloat16, "<u2"),
    "int8": RowFormat("int8", torch.int8, "i1", scale="row"),
    "fp8_e4m3": RowFormat("fp8_e4m3", torch.uint8, "u1", scale="block", block=FP8_BLOCK),
}


def row_format(name: str | torch.dtype, block: int | None = None) -> RowFormat:
    """The format called ``name`` (a name of ``FORMATS`` or a float torch dtype); ``block`` overrides the
    fp8 block size (a stored manifest's)."""
    if isinstance(name, torch.dtype):
        name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(name, str(name))
    if name not in FORMATS:
        raise ValueError(f"unknown table format {name!r}; known: {sorted(FORMATS)}")
    fmt = FORMATS[name]
    if block is not None and fmt.scale == "block" and block != fmt.block:
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"{name}: block must be an int >= 1, got {block!r}")
        fmt = RowFormat(fmt.name, fmt.code_dtype, fmt.numpy_dtype, fmt.scale, block)
    return fmt


def to_numpy(t: torch.Tensor, numpy_dtype: str) -> np.ndarray:
    """A code or scale tensor as the little-endian array written to disk (bf16 through its int16 bytes)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    arr, target = t.contiguous().numpy(), np.dtype(numpy_dtype)
    if arr.dtype.kind != target.kind:  # bf16's int16 bytes stored as uint16: same bits
        arr = arr.view(target.newbyteorder("="))
    return arr.astype(target, copy=False)


def from_numpy(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """An array read from disk (any byte order) as the in-memory tensor of ``dtype``."""
    native = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(native).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(native))
