"""engram export-tables + engram generate --tier: same text from every tier."""

import json

import pytest

from engram.cli import main


def generate(capsys, ckpt, *flags):
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "def alpha", "--max-new-tokens", "8",
                 "--temperature", "0", *flags]) == 0
    return capsys.readouterr().out


def test_export_then_generate_from_disk(checkpoint, tmp_path, capsys):
    tables = tmp_path / "tables"
    assert main(["export-tables", "--ckpt", str(checkpoint), "--out", str(tables)]) == 0
    assert (tables / "manifest.json").is_file() and (tables / "layer_1.bin").is_file()
    device = generate(capsys, checkpoint)
    assert device.startswith("def alpha") and len(device) > len("def alpha\n")
    assert generate(capsys, checkpoint, "--tier", "disk", "--tables", str(tables)) == device
    assert generate(capsys, checkpoint, "--tier", "disk", "--tables", str(tables), "--cache-rows", "16") == device
    assert generate(capsys, checkpoint, "--tier", "host", "--cache-rows", "16") == device


@pytest.mark.parametrize("flags,message", [
    (["--tier", "disk"], "needs tables_dir"),
    (["--tier", "disk", "--tables", "/nonexistent/tables"], "manifest.json is missing"),
])
def test_generate_errors_are_one_line(checkpoint, capsys, flags, message):
    assert main(["generate", "--ckpt", str(checkpoint), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_bench_offload_smoke(tmp_path, capsys):
    """`engram bench offload` at a tiny size: every tier, identical tokens, JSON written."""
    out = tmp_path / "offload.json"
    code = main(["bench", "offload", "--table-gb", "0.01", "--batch", "2", "--seq", "16", "--new-tokens", "3",
                 "--repeats", "1", "--cache-rows", "64", "--dir", str(tmp_path / "tables"), "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["tokens_identical"] is True
    assert [r["tier"] for r in result["results"]] == ["device", "host", "disk", "disk+cache", "disk-cold"]
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in result["results"])
    paired = {r["tier"]: r["paired_decode_vs_device"] for r in result["results"]}
    assert paired["device"] == 1.0 and paired["disk-cold"] is None  # a tier against itself; cold is not paired
    assert all(paired[t] > 0 for t in ("host", "disk", "disk+cache"))
    assert not list((tmp_path / "tables").glob("layer_*.bin"))  # cleaned up without --keep


def test_bench_offload_in_a_quantised_format(tmp_path):
    """`--format fp8_e4m3`: the host and disk tiers serve fp8 rows and the device model holds their decoded
    values, so every tier still computes the same tokens."""
    out = tmp_path / "offload.json"
    code = main(["bench", "offload", "--table-gb", "0.01", "--batch", "2", "--seq", "16", "--new-tokens", "3",
                 "--repeats", "1", "--format", "fp8_e4m3", "--tiers", "device,host,disk", "--preset",
                 "tiny-engram-v41", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["tokens_identical"] is True
    assert [r["tier"] for r in result["results"]] == ["device", "host", "disk"]
    host = next(r for r in result["results"] if r["tier"] == "host")
    device = next(r for r in result["results"] if r["tier"] == "device")
    assert host["store_ram_mb"] < device["store_ram_mb"] / 3  # fp8 rows in RAM: about a quarter of fp32's
