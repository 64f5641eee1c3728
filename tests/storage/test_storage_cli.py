"""engram export-tables + engram generate --tier: same text from every tier."""

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
