"""Where a tensor lies inside a safetensors file, read from its header alone: what serving a released
table in place needs (``DiskStore.from_safetensors``).

A safetensors file is an 8-byte little-endian header length n, then n bytes of JSON (name -> dtype,
shape, data_offsets [begin, end) into the data section), then the data section.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype -> torch dtype, for the dtypes tables and weights are released in
TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn,
                "F8_E8M0": torch.float8_e8m0fnu, "U8": torch.uint8}
BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


@dataclass(frozen=True)
class SafetensorsTensor:
    """One tensor of a safetensors file: ``offset`` is its first byte in ``path``."""

    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * BYTES[self.dtype]


def read_header(path: str | Path) -> tuple[dict, int]:
    """(the header's tensors by name, the data section's first byte) of a safetensors file."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise ValueError(f"{path} is not a safetensors file (a header of {n} bytes)")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def weight_map(directory: str | Path) -> dict[str, str]:
    """Tensor name -> the file under ``directory`` that holds it: a sharded checkpoint's
    ``model.safetensors.index.json``, else the names in its one ``model.safetensors``."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = directory / "model.safetensors"
    if single.is_file():
        return dict.fromkeys(read_header(single)[0], single.name)
    raise ValueError(f"{directory} has neither model.safetensors.index.json nor model.safetensors")


def tensor_in(path: str | Path, name: str) -> SafetensorsTensor:
    """``name`` in the safetensors file ``path``, located without reading its data; refused by name when
    absent or when its byte range does not match its dtype and shape, or runs past the file's end."""
    return tensors_in(path, [name])[name]


def tensors_in(path: str | Path, names) -> dict[str, SafetensorsTensor]:
    """Several tensors of one file located from one read of its header (``tensor_in``'s checks on each)."""
    header, start = read_header(path)
    size = Path(path).stat().st_size
    found = {}
    for name in names:
        if name not in header:
            raise ValueError(f"{path} holds no tensor {name!r}")
        entry = header[name]
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in BYTES:
            raise ValueError(f"{path}: {name} has dtype {dtype}, which this reader does not know")
        tensor = SafetensorsTensor(Path(path), name, dtype, shape, start + begin)
        if end - begin != tensor.nbytes or start + end > size:
            raise ValueError(f"{path}: {name}'s bytes [{begin}, {end}) do not hold {dtype} {list(shape)} (the file is "
                             "truncated or damaged)")
        found[name] = tensor
    return found
