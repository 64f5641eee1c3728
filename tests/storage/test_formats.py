"""Quantised table formats: each format's documented bound (hypothesis, zero rows and extreme
values included), the files they write, and every tier and the row cache reading them identically."""

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engram.cli.commands import TABLE_FORMATS
from engram.storage import (FORMATS, DiskStore, HostStore, RowCache, TableError, apply_storage, export_tables,
                            open_tables, row_format)
from engram.storage.formats import FP8_BLOCK

QUANTISED = ["int8", "fp8_e4m3"]
finite32 = st.floats(-(2.0**127), 2.0**127, allow_nan=False, allow_infinity=False, width=32)
unit32 = st.floats(-1, 1, width=32)


def bound(fmt, x: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """The documented bound on abs(x - decode(encode(x))) per value (engram.storage.formats)."""
    if fmt.name == "float32":
        return torch.zeros_like(x)
    if fmt.name == "bfloat16":
        return x.abs() / 256 + 2.0**-134
    if fmt.name == "int8":
        return scales.float() / 2 + x.abs() * 2.0**-22 + 2.0**-142
    s = torch.ldexp(torch.ones(scales.shape), scales.to(torch.int32) - 127)  # (n, S)
    s = s.repeat_interleave(fmt.block, dim=1)[:, : x.shape[1]]
    return torch.maximum(x.abs() / 16, s / 1024) + 2.0**-149


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["float32", "bfloat16", "int8", "fp8_e4m3"]), st.integers(1, 5), st.integers(1, 70),
       st.data())
def test_decoded_rows_stay_within_the_documented_bound(name, n, d, data):
    factor = data.draw(st.sampled_from([None, 1e-40, 1e-30, 1e-3, 1.0, 1e30]))
    if factor is None:  # anywhere in fp32's range (up to 2^127)
        x = torch.from_numpy(data.draw(arrays(np.float32, (n, d), elements=finite32)))
    else:  # values of one magnitude, subnormal ones included
        x = torch.from_numpy(data.draw(arrays(np.float32, (n, d), elements=unit32))) * factor
    if data.draw(st.booleans()):
        x[data.draw(st.integers(0, n - 1))] = 0  # a zero row
    fmt = FORMATS[name]
    codes, scales = fmt.encode(x)
    y = fmt.decode(codes, scales)
    assert y.dtype == torch.float32 and y.shape == x.shape and bool(torch.isfinite(y).all())
    assert bool(((x - y).abs() <= bound(fmt, x, scales)).all())
    assert not y[x.abs().amax(dim=1) == 0].any()  # a zero row decodes to zeros
    assert codes.shape == x.shape and (scales is None) == (not fmt.quantised)
    if fmt.quantised:
        assert scales.shape == (n, fmt.scales_per_row(d))


def test_fp8_scales_are_the_smallest_powers_of_two_that_fit():
    x = torch.tensor([[448.0] + [0.0] * 31 + [449.0] + [0.0] * 31 + [1.0] * 32 + [1e-45] * 32 + [0.0] * 32])
    _, scales = FORMATS["fp8_e4m3"].encode(x)
    # 448 fits at 2^0; 449 needs 2^1; 1 fits at 2^-8; a block of 1e-45 (amax / 448 underflows) and a zero
    # block take the smallest scale, 2^-127
    assert (scales.int() - 127).tolist() == [[0, 1, -8, -127, -127]]
    assert FORMATS["fp8_e4m3"].row_bytes(256) == 256 + 8 and FORMATS["int8"].row_bytes(256) == 260


def test_stores_serve_repeated_and_unordered_rows(quantised):
    entry = open_tables(quantised["fp8_e4m3"]).layers[1]
    rows = torch.tensor([9, 2, 9, 0, 2])
    disk, host = DiskStore.from_entry(entry), HostStore.from_entry(entry)
    assert torch.equal(disk.gather(rows), host.gather(rows))
    assert torch.equal(disk.gather(rows)[0], disk.gather(torch.tensor([9]))[0])


def test_a_float64_table_is_kept_as_float32_on_the_host():
    table = torch.randn(10, 4, dtype=torch.float64)
    store = HostStore(table)
    assert store.format.name == "float32" and torch.equal(store.gather(torch.tensor([3])), table[3:4].float())


def test_cli_lists_every_format():
    assert TABLE_FORMATS == sorted(FORMATS)
    with pytest.raises(ValueError, match="unknown table format"):
        row_format("int4")


@pytest.fixture(scope="module")
def quantised(tables, model_builder, tmp_path_factory):
    """{format: tables directory} exported from the tiny model (with its tables scaled to N(0, 1))."""
    model = model_builder()
    model.load_state_dict(tables[0])
    out = {}
    for name in QUANTISED:
        out[name] = tmp_path_factory.mktemp(name)
        export_tables(model, out[name], dtype=name)
    return out


@pytest.mark.parametrize("name", QUANTISED)
def test_export_writes_codes_and_scales_and_every_tier_reads_them_alike(tables, model_builder, quantised, name):
    model = model_builder()
    model.load_state_dict(tables[0])
    fmt = FORMATS[name]
    manifest = open_tables(quantised[name], model.hasher, verify="sha256")
    weight = model.engram_layers[1].embedding.weight.detach()
    entry = manifest.layers[1]
    assert entry.bytes == weight.numel() and entry.scales.bytes == weight.shape[0] * (
        4 if name == "int8" else -(-weight.shape[1] // FP8_BLOCK))
    assert entry.bytes + entry.scales.bytes == entry.rows * fmt.row_bytes(entry.dim)
    expected = fmt.decode(*fmt.encode(weight))  # (rows, d_h): what every tier must serve
    rows = torch.tensor([0, 3, 5, 17, entry.rows - 1])
    disk = DiskStore.from_entry(entry)
    host = HostStore.from_entry(entry)
    in_ram = HostStore(weight, format=name)  # the model's rows encoded in RAM
    for store in (disk, host, in_ram, RowCache(DiskStore.from_entry(entry), 3)):
        assert torch.equal(store.gather(rows), expected[rows])
        assert torch.equal(store.gather(rows.flip(0)), expected[rows.flip(0)])  # any order
    assert host.nbytes == disk.nbytes == entry.bytes + entry.scales.bytes


@pytest.mark.parametrize("name", QUANTISED)
def test_the_cache_keeps_rows_encoded(quantised, tables, model_builder, name):
    entry = open_tables(quantised[name]).layers[1]
    cache = RowCache(DiskStore.from_entry(entry), 64)
    assert cache.slots.dtype == FORMATS[name].code_dtype and cache.slots.element_size() == 1
    first = cache.gather(torch.arange(0, 40))
    again = cache.gather(torch.arange(20, 60))  # half hits
    assert cache.hits == 20 and torch.equal(first[20:], again[:20])
    assert torch.equal(again, DiskStore.from_entry(entry).gather(torch.arange(20, 60)))


@pytest.mark.parametrize("tier", ["host", "disk"])
@pytest.mark.parametrize("name", QUANTISED)
def test_a_model_on_quantised_tables_equals_one_with_the_decoded_rows(tables, model_builder, quantised, tier, name):
    reference = model_builder()
    reference.load_state_dict(tables[0])
    fmt = FORMATS[name]
    with torch.no_grad():
        for layer in reference.engram_layers.values():
            layer.embedding.weight.copy_(fmt.decode(*fmt.encode(layer.embedding.weight)))
    model = model_builder()
    model.load_state_dict(tables[0])
    ids = torch.randint(0, model.config.backbone.vocab_size, (2, 24))
    with apply_storage(model, tier, quantised[name], cache_rows=50 if tier == "disk" else 0):
        assert torch.equal(model(ids).logits, reference(ids).logits)


def _copy(src, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(src, target)
    return target


def _edit_manifest(directory, edit):
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    edit(data["layers"]["1"])
    path.write_text(json.dumps(data))


def test_broken_quantised_tables_are_refused(quantised, tmp_path):
    d = _copy(quantised["fp8_e4m3"], tmp_path / "a")
    (d / "layer_1.scales.bin").unlink()
    with pytest.raises(TableError, match="layer_1.scales.bin"):
        open_tables(d)
    d = _copy(quantised["fp8_e4m3"], tmp_path / "b")
    with open(d / "layer_1.scales.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(TableError, match="layer_1.scales.bin"):
        open_tables(d)
    d = _copy(quantised["fp8_e4m3"], tmp_path / "c")
    with open(d / "layer_1.scales.bin", "r+b") as f:
        f.seek(7)
        f.write(b"\xff")  # e8m0's NaN
    with pytest.raises(TableError, match="scales.*not finite|sha256"):
        open_tables(d, verify="sha256")
    d = _copy(quantised["int8"], tmp_path / "d")
    with open(d / "layer_1.scales.bin", "r+b") as f:
        f.seek(8)
        f.write(np.float32(0.5).tobytes())  # a plausible but altered scale
    with pytest.raises(TableError, match="sha256 mismatch"):
        open_tables(d, verify="sha256")
    open_tables(d)  # the cheap size check cannot see it; sha256 can


@pytest.mark.parametrize("edit, match", [
    (lambda e: e.pop("scales"), "has no scales entry"),
    (lambda e: e.__setitem__("dtype", "float32"), "claims .* bytes|has a scales entry"),
    (lambda e: e["scales"].__setitem__("block", 4), "block 4, but fp8_e4m3 tables are written with block 32"),
    (lambda e: e["scales"].__setitem__("block", 0), "block 0"),
    (lambda e: e["scales"].__setitem__("bytes", 3), "scales claim 3 bytes"),
    (lambda e: e["scales"].pop("sha256"), "must hold file, bytes and sha256"),
    (lambda e: e.__setitem__("scales", "layer_1.scales.bin"), "must hold file, bytes and sha256"),
    (lambda e: e["scales"].__setitem__("file", "../layer_1.scales.bin"), "plain names"),
    (lambda e: e.__setitem__("dtype", "int4"), "unknown dtype 'int4'"),
])
def test_mismatched_quantised_manifests_are_refused(quantised, tmp_path, edit, match):
    d = _copy(quantised["fp8_e4m3"], tmp_path)
    _edit_manifest(d, edit)
    with pytest.raises(TableError, match=match):
        open_tables(d)


def test_fp16_overflow_is_refused_and_float_export_removes_stale_scales(tables, model_builder, tmp_path):
    model = model_builder()
    model.load_state_dict(tables[0])
    export_tables(model, tmp_path, dtype="int8")
    assert (tmp_path / "layer_1.scales.bin").exists()
    export_tables(model, tmp_path, dtype="float32")
    assert not (tmp_path / "layer_1.scales.bin").exists()
    with torch.no_grad():
        model.engram_layers[1].embedding.weight[7, 0] = 1e6
    with pytest.raises(TableError, match="row 7 .* not finite as float16"):
        export_tables(model, tmp_path / "half", dtype="float16")


def e4m3fn_value(byte: int) -> float:
    """OCP FP8 E4M3FN, from its bits: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
    subnormal (2^-6 * m/8); S.1111.111 is NaN; there is no infinity."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return float("nan")
    if exponent == 0:
        return sign * 2.0**-6 * mantissa / 8
    return sign * 2.0 ** (exponent - 7) * (1 + mantissa / 8)


def test_fp8_and_int8_decode_as_their_bits_say_not_as_our_encoder_does():
    """Codes and scales written by hand (every fp8 byte, several ue8m0 scales), decoded against a decoder
    written here from the formats' definitions: the encoder plays no part."""
    assert [e4m3fn_value(b) for b in (0x38, 0x7E, 0x01, 0x08, 0x80, 0xB8)] == [1.0, 448.0, 2.0**-9, 2.0**-6, -0.0, -1.0]
    fmt = row_format("fp8_e4m3")  # 32 values per scale
    finite = [b for b in range(256) if b & 0x7F != 0x7F]  # 254 bytes
    codes = torch.tensor(finite + finite[:2], dtype=torch.uint8).view(8, 32)  # 8 blocks of 32
    scale_bytes = [127, 128, 126, 100, 150, 0, 254, 127]  # 1, 2, 1/2, 2^-27, 2^23, 2^-127, 2^127, 1
    scales = torch.tensor(scale_bytes, dtype=torch.uint8).view(2, 4)  # 2 rows of 128 values, 4 blocks each
    got = fmt.decode(codes.view(2, 128), scales)
    expected = torch.tensor([[e4m3fn_value(int(c)) * 2.0 ** (scale_bytes[i // 32 + 4 * r] - 127)
                              for i, c in enumerate(codes.view(2, 128)[r].tolist())] for r in range(2)],
                            dtype=torch.float64).float()
    assert torch.equal(got, expected)
    int8 = row_format("int8")
    q = torch.tensor([[-127, -1, 0, 1, 127], [5, 6, 7, 8, 9]], dtype=torch.int8)
    s = torch.tensor([[0.5], [2.0**-20]])
    assert torch.equal(int8.decode(q, s), torch.tensor([[-63.5, -0.5, 0.0, 0.5, 63.5],
                                                        [5 * 2.0**-20, 6 * 2.0**-20, 7 * 2.0**-20, 8 * 2.0**-20,
                                                         9 * 2.0**-20]]))


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["float32", "float16", "bfloat16", "int8", "fp8_e4m3"]), st.integers(1, 40), st.integers(1, 70),
       st.data())
def test_a_disk_gather_copies_exactly_the_stored_bytes_of_its_rows(tmp_path_factory, name, n, d, data):
    """The disk tier copies rows out of the map with ``index_select`` on a tensor over the same bytes; a byte
    order other than the CPU's takes numpy's indexing instead. Both give the stored codes and scales, bit for bit."""
    fmt = row_format(name)
    x = torch.from_numpy(data.draw(arrays(np.float32, (n, d), elements=unit32)))
    codes, scales = fmt.encode(x)
    tmp = tmp_path_factory.mktemp("rows")
    files = {"codes": tmp / "codes.bin", "scales": tmp / "scales.bin"}
    files["codes"].write_bytes(codes.contiguous().view(torch.uint8).numpy().tobytes())
    if scales is not None:
        files["scales"].write_bytes(scales.contiguous().view(torch.uint8).numpy().tobytes())
    rows = torch.tensor(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1))))
    store = DiskStore(files["codes"], n, d, fmt, None if scales is None else files["scales"])
    numpy_path = DiskStore(files["codes"], n, d, fmt, None if scales is None else files["scales"])
    numpy_path._tensors = None  # as on a CPU of the other byte order
    for got in (store.gather_encoded(rows), numpy_path.gather_encoded(rows)):
        assert got[0].dtype == codes.dtype and torch.equal(got[0].view(torch.uint8), codes[rows].view(torch.uint8))
        assert (got[1] is None) == (scales is None)
        if scales is not None:
            assert got[1].dtype == scales.dtype
            assert torch.equal(got[1].view(torch.uint8), scales[rows].view(torch.uint8))
