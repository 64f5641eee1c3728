"""Engram tables as plain files: one raw little-endian (rows, d_h) array per layer plus a manifest.

Layout of a tables directory::

    layer_{id}.bin          rows x d_h codes, C order, little-endian, in the manifest's ``dtype``
                            (a format of ``engram.storage.formats``: float32, float16, bfloat16, int8, fp8_e4m3)
    layer_{id}.scales.bin   quantised formats only: rows x S scales (int8: one fp32 per row; fp8_e4m3: one
                            ue8m0 byte per ``block`` values)
    manifest.json           written LAST: format, the hasher layout, per layer {file, rows, dim, dtype, bytes,
                            sha256[, scales: {file, block, bytes, sha256}]}, and ``source``: the checkpoint
                            the rows came from ({path, step, identity}), when known

A directory without ``manifest.json`` is an unfinished export. Every file is written atomically
(``engram.fileio``), and an old manifest is removed before any table is rewritten, so a crash never
leaves a manifest that describes other bytes than the files hold. The hasher layout travels with the tables
because a row is meaningless without the addresses that chose it (docs/PITFALLS.md §3, §4), and the source
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
from engram.model.tables import as_table_host
from engram.storage.formats import FORMATS, RowFormat, row_format, to_numpy

FORMAT = "engram.tables/1"
MANIFEST = "manifest.json"


class TableError(ValueError):
    """A tables directory that cannot be used as is (missing, truncated, corrupt or for another layout)."""


@dataclass(frozen=True)
class ScalesEntry:
    path: Path
    block: int  # values per scale (fp8_e4m3); 0 for one scale per row
    bytes: int
    sha256: str


@dataclass(frozen=True)
class TableEntry:
    layer_id: int
    path: Path
    rows: int
    dim: int
    dtype: str  # key of engram.storage.formats.FORMATS
    bytes: int
    sha256: str
    scales: ScalesEntry | None = None  # quantised formats only

    @property
    def format(self) -> RowFormat:
        return row_format(self.dtype, None if self.scales is None else self.scales.block or None)


@dataclass(frozen=True)
class TableManifest:
    directory: Path
    layout: dict
    layers: dict[int, TableEntry]
    source: dict | None = None  # the checkpoint exported from: {path, step, identity}; None before 0.2


def _check_finite(weight: torch.Tensor, what: str) -> None:
    """Raise TableError naming the first row of ``weight`` (rows, d_h) holding a NaN or inf."""
    step = max(1, CHUNK_BYTES // max(1, weight.shape[1] * weight.element_size()))
    for start in range(0, weight.shape[0], step):
        bad = (~torch.isfinite(weight[start: start + step])).any(dim=1).nonzero()
        if bad.numel():
            raise TableError(f"row {start + int(bad[0])} of {what}'s table is not finite (NaN or inf); refusing to "
                             "export it")


def _write_table(read, rows: int, dim: int, path: Path, fmt: RowFormat
                 ) -> tuple[tuple[int, str], tuple[int, str] | None]:
    """Stream a table of ``rows`` x ``dim`` (``read(a, b)``: rows [a, b) fp32 on the CPU) to ``path`` (codes)
    and, for a quantised format, its scales to the ``.scales.bin`` beside it, encoding slice by slice in one
    pass, each file atomically; returns (bytes, sha256) of the codes and of the scales (None for a float
    format). A row that is not finite, before or after encoding, is refused by number."""
    step = max(1, CHUNK_BYTES // max(1, 4 * dim))
    digests = [hashlib.sha256(), hashlib.sha256()]
    totals = [0, 0]

    def write(codes_file, scales_file=None) -> None:
        for start in range(0, rows, step):
            values = read(start, min(rows, start + step))  # (n, d_h) fp32
            bad = (~torch.isfinite(values)).any(dim=1).nonzero()
            if bad.numel():
                raise TableError(f"row {start + int(bad[0])} of {path.name}'s table is not finite (NaN or inf); "
                                 "refusing to export it")
            codes, scales = fmt.encode(values)
            finite = torch.isfinite(fmt.decode(codes, scales)).all(dim=1)  # (n,)
            if not bool(finite.all()):  # finite in fp32 but not in a narrower format (fp16 overflow)
                raise TableError(f"row {start + int((~finite).nonzero()[0])} of {path.name}'s table is not finite "
                                 f"as {fmt.name}; refusing to export it (choose a wider format)")
            for i, (f, part, np_dtype) in enumerate(((codes_file, codes, fmt.numpy_dtype),
                                                     (scales_file, scales, fmt.scale_numpy_dtype))):
                if f is None:
                    continue
                data = to_numpy(part, np_dtype).tobytes()
                digests[i].update(data)
                f.write(data)
                totals[i] += len(data)

    if fmt.quantised:
        atomic_write(_scales_path(path), lambda scales_file: atomic_write(
            path, lambda codes_file: write(codes_file, scales_file), fsync=True), fsync=True)
        return (totals[0], digests[0].hexdigest()), (totals[1], digests[1].hexdigest())
    atomic_write(path, write, fsync=True)
    return (totals[0], digests[0].hexdigest()), None


def _scales_path(path: Path) -> Path:
    return path.with_name(path.stem + ".scales.bin")


@torch.no_grad()
def export_tables(model, directory: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                  source: dict | None = None) -> Path:
    """Write every Engram layer's table of ``model`` to ``directory``; returns the manifest path. A table a
    tier serves (host, disk, a release's or a checkpoint's shards) is read back slice by slice, never whole.

    ``dtype``: the stored format, a name of ``engram.storage.formats.FORMATS`` (float32, float16, bfloat16,
    int8, fp8_e4m3) or a float torch dtype. Only float32 reproduces the model exactly; the others' bounds
    are in ``engram.storage.formats``.

    ``source``: the checkpoint the model was loaded from, ``{"path", "step", "identity"}``
    (``Checkpoint.identity``), recorded so that ``open_tables`` can refuse these rows for another one."""
    model = as_table_host(model, "export_tables")
    if model.hasher is None or not model.engram_layers:
        raise TableError("the model has no Engram layers: nothing to export")
    fmt = row_format(dtype)
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
        table = layer.embedding
        if table.trainable:
            if table.weight.device.type == "meta":
                raise TableError(f"layer {layer_id}'s table was never allocated (meta device): no rows to export")
            _check_finite(table.weight, f"layer {layer_id}")
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # the old manifest must not vouch for half-rewritten files
    layers = {}
    for layer_id, layer in sorted(model.engram_layers.items()):
        table = layer.embedding  # a parameter, or rows served by a tier (read back in slices)
        file = f"layer_{layer_id}.bin"
        if not fmt.quantised:
            _scales_path(directory / file).unlink(missing_ok=True)  # left by an earlier quantised export
        rows, dim = table.num_rows, table.dim
        (nbytes, sha), scales = _write_table(table.rows, rows, dim, directory / file, fmt)
        layers[str(layer_id)] = {"file": file, "rows": int(rows), "dim": int(dim), "dtype": fmt.name, "bytes": nbytes,
                                 "sha256": sha}
        if scales is not None:
            layers[str(layer_id)]["scales"] = {"file": _scales_path(directory / file).name, "block": fmt.block,
                                               "bytes": scales[0], "sha256": scales[1]}
    extra = {"source": dict(source)} if source is not None else {}
    return write_manifest(manifest_path, FORMAT, layout=model.hasher.layout(), layers=layers, **extra)


def _scan(path: Path, numpy_dtype: str, width: int, sha256: str, finite, what: str) -> None:
    """Read one file once: its sha256 must match and ``finite(values (n, width))`` hold on every row."""
    np_dtype = np.dtype(numpy_dtype)
    row_bytes = width * np_dtype.itemsize
    rows_per_block = max(1, CHUNK_BYTES // max(1, row_bytes))
    digest, row = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(rows_per_block * row_bytes):
            digest.update(block)
            values = np.frombuffer(block, dtype=np_dtype).reshape(-1, width)  # (n, width)
            bad = np.flatnonzero(~finite(values))
            if bad.size:
                raise TableError(f"{path}: row {row + int(bad[0])} (of {what}) is not finite (NaN or inf); export the "
                                 "tables again from an intact checkpoint")
            row += len(values)
    if digest.hexdigest() != sha256:
        raise TableError(f"{path}: sha256 mismatch with the manifest; {path.name} is corrupted or replaced")


def _entry(directory: Path, manifest_path: Path, key: str, info: dict) -> TableEntry:
    """One layer's manifest entry, its sizes checked against its format (files not read yet)."""
    if info.get("dtype") not in FORMATS:
        raise TableError(f"{manifest_path}: layer {key} has unknown dtype {info.get('dtype')!r} (known: "
                         f"{sorted(FORMATS)}); it was written by a newer engram, upgrade to read it")
    fmt = FORMATS[info["dtype"]]
    scales_info = info.get("scales")
    if fmt.quantised != (scales_info is not None):
        raise TableError(f"{manifest_path}: layer {key} is {fmt.name} but "
                         f"{'has no scales entry' if fmt.quantised else 'has a scales entry'}; the manifest is damaged")
    expected = info["rows"] * info["dim"] * fmt.code_bytes
    if expected != info["bytes"]:
        raise TableError(f"{manifest_path}: layer {key} claims {info['bytes']} bytes but "
                         f"{info['rows']}x{info['dim']} {info['dtype']} is {expected}")
    scales = None
    if scales_info is not None:
        if not isinstance(scales_info, dict) or any(not isinstance(scales_info.get(k), t) for k, t in
                                                     (("file", str), ("sha256", str), ("bytes", int))):
            raise TableError(f"{manifest_path}: layer {key}'s scales entry must hold file, bytes and sha256; the "
                             "manifest is damaged")
        block = scales_info.get("block")
        if fmt.scale == "block" and block != fmt.block:  # the exporter writes one block size per format
            raise TableError(f"{manifest_path}: layer {key}'s scales have block {block!r}, but {fmt.name} tables are "
                             f"written with block {fmt.block}; the manifest is damaged or from another writer")
        scale_bytes = info["rows"] * fmt.scales_per_row(info["dim"]) * np.dtype(fmt.scale_numpy_dtype).itemsize
        if scale_bytes != scales_info.get("bytes"):
            raise TableError(f"{manifest_path}: layer {key}'s scales claim {scales_info.get('bytes')} bytes, "
                             f"{fmt.name} with block {block} needs {scale_bytes}")
        scales = ScalesEntry(directory / scales_info["file"], block if fmt.scale == "block" else 0, scale_bytes,
                             scales_info["sha256"])
    for name in (info["file"], None if scales is None else scales_info["file"]):
        if name is not None and Path(name).name != name:  # a file of this directory, never a path out of it
            raise TableError(f"{manifest_path}: layer {key} names the file {name!r}; files must be plain names")
    return TableEntry(int(key), directory / info["file"], info["rows"], info["dim"], info["dtype"], expected,
                      info["sha256"], scales)


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
        entry = _entry(directory, manifest_path, key, info)
        fmt, what = entry.format, f"layer {key}"
        check_file(entry.path, entry.bytes, None, TableError)
        if entry.scales is not None:
            check_file(entry.scales.path, entry.scales.bytes, None, TableError)
        if verify == "sha256":
            _scan(entry.path, fmt.numpy_dtype, entry.dim, entry.sha256, fmt.codes_finite, what)
            if entry.scales is not None:
                _scan(entry.scales.path, fmt.scale_numpy_dtype, fmt.scales_per_row(entry.dim), entry.scales.sha256,
                      fmt.scales_finite, f"{what}'s scales")
        layers[int(key)] = entry
    return TableManifest(directory, manifest["layout"], layers, manifest.get("source"))
