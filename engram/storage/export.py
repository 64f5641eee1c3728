"""Engram tables as plain files: one raw little-endian (rows, d_h) array per layer plus a manifest.

Layout of a tables directory::

    layer_{id}.bin   rows x d_h values, C order, little-endian, dtype from the manifest
    manifest.json    written LAST: format, the hasher layout, per layer {file, rows, dim, dtype, bytes, sha256},
                     and ``source``: the checkpoint the rows came from ({path, step, identity}), when known

A directory without ``manifest.json`` is an unfinished export. Every file is written atomically
(``engram.fileio``), and an old manifest is removed before any table is rewritten, so a crash never
leaves a manifest that describes other bytes than the files hold. The hasher layout travels with the tables
because a row is meaningless without the addresses that chose it (PITFALLS 3, 4), and the source
checkpoint's identity with them, because another run of the same layout addresses the same rows with
other weights. Rows must be finite: export refuses a NaN or infinite value, and a sha256 verification at
open finds one (it reads every byte anyway).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engram.fileio import CHUNK_BYTES, atomic_write, check_file, read_manifest, write_manifest

FORMAT = "engram.tables/1"
MANIFEST = "manifest.json"

# bfloat16 has no numpy dtype: its bytes travel as little-endian uint16 and are reinterpreted on read
DTYPES = {"float32": (torch.float32, "<f4"), "float16": (torch.float16, "<f2"), "bfloat16": (torch.bfloat16, "<u2")}


class TableError(ValueError):
    """A tables directory that cannot be used as is (missing, truncated, corrupt or for another layout)."""


@dataclass(frozen=True)
class TableEntry:
    layer_id: int
    path: Path
    rows: int
    dim: int
    dtype: str  # key of DTYPES
    bytes: int
    sha256: str


@dataclass(frozen=True)
class TableManifest:
    directory: Path
    layout: dict
    layers: dict[int, TableEntry]
    source: dict | None = None  # the checkpoint exported from: {path, step, identity}; None before 0.2


def _dtype_name(dtype: torch.dtype) -> str:
    for name, (torch_dtype, _) in DTYPES.items():
        if torch_dtype == dtype:
            return name
    raise ValueError(f"tables can be exported as {sorted(DTYPES)}, not {dtype}")


def _check_finite(weight: torch.Tensor, what: str) -> None:
    """Raise TableError naming the first row of ``weight`` (rows, d_h) holding a NaN or inf."""
    step = max(1, CHUNK_BYTES // max(1, weight.shape[1] * weight.element_size()))
    for start in range(0, weight.shape[0], step):
        bad = (~torch.isfinite(weight[start: start + step])).any(dim=1).nonzero()
        if bad.numel():
            raise TableError(f"row {start + int(bad[0])} of {what}'s table is not finite (NaN or inf); refusing to "
                             "export it")


def _write_table(weight: torch.Tensor, path: Path, dtype: torch.dtype) -> tuple[int, str]:
    """Stream ``weight`` (rows, d_h) to ``path`` in slices, atomically; returns (bytes, sha256)."""
    torch_dtype, np_dtype = DTYPES[_dtype_name(dtype)]
    rows, dim = weight.shape
    step = max(1, CHUNK_BYTES // max(1, dim * np.dtype(np_dtype).itemsize))
    digest, total = hashlib.sha256(), 0

    def write(f) -> None:
        nonlocal total
        for start in range(0, rows, step):
            chunk = weight[start: start + step].detach().to("cpu", torch_dtype).contiguous()  # (n, d_h)
            if not bool(torch.isfinite(chunk).all()):  # finite in fp32 but not in a narrower dtype
                _check_finite(chunk, f"{path.name} as {torch_dtype} (offset {start})")
            if torch_dtype == torch.bfloat16:
                chunk = chunk.view(torch.int16)  # same bytes; numpy has no bfloat16
            arr = chunk.numpy()
            data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()  # little-endian on any host
            digest.update(data)
            f.write(data)
            total += len(data)

    atomic_write(path, write, fsync=True)
    return total, digest.hexdigest()


@torch.no_grad()
def export_tables(model, directory: str | os.PathLike, dtype: torch.dtype = torch.float32,
                  source: dict | None = None) -> Path:
    """Write every Engram layer's table of ``model`` to ``directory``; returns the manifest path.

    ``source``: the checkpoint the model was loaded from, ``{"path", "step", "identity"}``
    (``Checkpoint.identity``), recorded so that ``open_tables`` can refuse these rows for another one."""
    if model.hasher is None or not model.engram_layers:
        raise TableError("the model has no Engram layers: nothing to export")
    name = _dtype_name(dtype)
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if manifest_path.is_file():
        try:
            found = json.loads(manifest_path.read_text()).get("format")
        except (ValueError, AttributeError):
            found = None
        if found != FORMAT:
            raise TableError(f"{directory} holds a manifest of format {found!r}, not Engram tables: refusing to "
                             "write tables over it (is it a checkpoint?); choose another directory")
    for layer_id, layer in sorted(model.engram_layers.items()):  # refuse before any file is touched
        weight = getattr(layer.embedding, "weight", None)
        if weight is not None:
            _check_finite(weight, f"layer {layer_id}")
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # the old manifest must not vouch for half-rewritten files
    layers = {}
    for layer_id, layer in sorted(model.engram_layers.items()):
        weight = getattr(layer.embedding, "weight", None)
        if weight is None:
            raise TableError(f"layer {layer_id}'s table is not a parameter (already offloaded?); export "
                             "from the model before apply_storage")
        file = f"layer_{layer_id}.bin"
        nbytes, sha = _write_table(weight, directory / file, dtype)
        layers[str(layer_id)] = {"file": file, "rows": int(weight.shape[0]), "dim": int(weight.shape[1]),
                                 "dtype": name, "bytes": nbytes, "sha256": sha}
    extra = {"source": dict(source)} if source is not None else {}
    return write_manifest(manifest_path, FORMAT, layout=model.hasher.layout(), layers=layers, **extra)


def _scan(path: Path, entry: TableEntry) -> None:
    """Read the file once: its sha256 must match and every value must be finite."""
    np_dtype = np.dtype(DTYPES[entry.dtype][1])
    row_bytes = entry.dim * np_dtype.itemsize
    rows_per_block = max(1, CHUNK_BYTES // max(1, row_bytes))
    digest, row = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(rows_per_block * row_bytes):
            digest.update(block)
            values = np.frombuffer(block, dtype=np_dtype).reshape(-1, entry.dim)  # (n, d_h)
            if entry.dtype == "bfloat16":  # non-finite iff every exponent bit is set
                finite = (values & 0x7F80) != 0x7F80
            else:
                finite = np.isfinite(values)
            bad = np.flatnonzero(~finite.all(axis=1))
            if bad.size:
                raise TableError(f"{path}: row {row + int(bad[0])} (of layer {entry.layer_id}) is not finite (NaN or "
                                 "inf); export the tables again from an intact checkpoint")
            row += len(values)
    if digest.hexdigest() != entry.sha256:
        raise TableError(f"{path}: sha256 mismatch with the manifest; {path.name} is corrupted or replaced")


def open_tables(directory: str | os.PathLike, hasher=None, verify: str = "size",
                checkpoint: str | None = None) -> TableManifest:
    """Read and check a tables directory. ``verify``: "size" (cheap, catches truncation) or "sha256"
    (reads every byte once: catches any altered byte and any non-finite value). With ``hasher``, the
    stored layout must equal ``hasher.layout()``. With ``checkpoint`` (``Checkpoint.identity``), the
    tables must have been exported from that checkpoint; tables that record no source (written by
    engram 0.1) are accepted on their layout alone, with a warning."""
    if verify not in ("size", "sha256"):
        raise ValueError(f"verify must be 'size' or 'sha256', got {verify!r}")
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    manifest = read_manifest(manifest_path, FORMAT, TableError, missing_hint="not an Engram tables directory, or "
                             "the export did not finish (the manifest is written last)")
    if hasher is not None:
        try:
            hasher.check_layout(manifest.get("layout"))
        except ValueError as err:
            raise TableError(f"{manifest_path}: {err}") from None
    if checkpoint is not None:
        source = manifest.get("source")
        if source is None:
            warnings.warn(f"{manifest_path} does not say which checkpoint its rows came from (exported by engram "
                          "0.1): only its hash layout was checked; export the tables again to record it",
                          stacklevel=2)
        elif source.get("identity") != checkpoint:
            raise TableError(f"{directory} holds the tables of another checkpoint ({source.get('path')}, step "
                             f"{source.get('step')}), not of the one loaded; export this checkpoint's tables with "
                             "`engram export-tables`")
    layers = {}
    for key, info in manifest["layers"].items():
        path = directory / info["file"]
        if info["dtype"] not in DTYPES:
            raise TableError(f"{manifest_path}: layer {key} has unknown dtype {info['dtype']!r}")
        expected = info["rows"] * info["dim"] * np.dtype(DTYPES[info["dtype"]][1]).itemsize
        if expected != info["bytes"]:
            raise TableError(f"{manifest_path}: layer {key} claims {info['bytes']} bytes but "
                             f"{info['rows']}x{info['dim']} {info['dtype']} is {expected}")
        check_file(path, expected, None, TableError)
        entry = TableEntry(int(key), path, info["rows"], info["dim"], info["dtype"], expected, info["sha256"])
        if verify == "sha256":
            _scan(path, entry)
        layers[int(key)] = entry
    return TableManifest(directory, manifest["layout"], layers, manifest.get("source"))
