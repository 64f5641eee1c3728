"""Tables directories: round trip, and each broken state refused with a TableError naming it."""

import json
import shutil

import numpy as np
import pytest
import torch

from engram.storage import DiskStore, TableError, export_tables, open_tables


@pytest.fixture
def copy(tables, tmp_path):
    target = tmp_path / "tables"
    shutil.copytree(tables[1], target)
    return target


def test_round_trip(tables, model_builder):
    model = model_builder()
    model.load_state_dict(tables[0])
    manifest = open_tables(tables[1], model.hasher, verify="sha256")
    raw = json.loads((tables[1] / "manifest.json").read_text())
    assert raw["format"] == "engram.tables/1" and raw["layout"] == json.loads(json.dumps(model.hasher.layout()))
    weight = model.engram_layers[1].embedding.weight.detach()
    entry = manifest.layers[1]
    assert (entry.rows, entry.dim, entry.dtype, entry.bytes) == (*weight.shape, "float32", weight.numel() * 4)
    rows = torch.tensor([0, 5, 3, entry.rows - 1])
    assert torch.equal(DiskStore.from_entry(manifest.layers[1]).gather(rows), weight[rows])
    assert torch.equal(torch.from_numpy(np.fromfile(entry.path, dtype="<f4")).view_as(weight), weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_export(tables, model_builder, tmp_path, dtype):
    model = model_builder()
    model.load_state_dict(tables[0])
    export_tables(model, tmp_path, dtype=dtype)
    entry = open_tables(tmp_path, model.hasher, verify="sha256").layers[1]
    assert entry.bytes == entry.rows * entry.dim * 2
    rows = torch.tensor([4, 1, 99])
    expected = model.engram_layers[1].embedding.weight.detach()[rows].to(dtype).float()
    assert torch.equal(DiskStore.from_entry(entry).gather(rows), expected)


def test_missing_manifest(copy):
    (copy / "manifest.json").unlink()
    with pytest.raises(TableError, match="manifest.json is missing"):
        open_tables(copy)


def test_missing_file(copy):
    (copy / "layer_1.bin").unlink()
    with pytest.raises(TableError, match="layer_1.bin is missing"):
        open_tables(copy)


def test_truncated_file(copy):
    path = copy / "layer_1.bin"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(TableError, match="layer_1.bin has .* bytes.*truncated"):
        open_tables(copy)


def test_corrupted_file_needs_sha256(copy):
    path = copy / "layer_1.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    open_tables(copy)  # size check alone cannot see it
    with pytest.raises(TableError, match="layer_1.bin: sha256 mismatch"):
        open_tables(copy, verify="sha256")


def test_layout_mismatch(copy, model_builder):
    other = model_builder(seed=7)
    with pytest.raises(TableError, match=r"hash layout mismatch in \[.*'multipliers'.*'seed'"):
        open_tables(copy, other.hasher)


def test_reexport_removes_the_old_manifest_first(copy, model_builder, monkeypatch):
    import engram.storage.export as export

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write_table", boom)
    with pytest.raises(OSError):
        export_tables(model_builder(), copy)
    with pytest.raises(TableError, match="did not finish"):
        open_tables(copy)
