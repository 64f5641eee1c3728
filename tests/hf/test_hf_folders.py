"""Saved folders are whole or refused: checksums recorded and checked, saves atomic (an interrupted or
out-of-disk save leaves the folder as it was, or marked and refused), and a folder whose weights are missing,
extra or of another shape is an error, never a model with uninitialised memory."""

import errno
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedModel  # noqa: E402

import engram.hf as H  # noqa: E402
from engram.hf import folder as F  # noqa: E402
from engram.model.transformer import EngramLM  # noqa: E402
from engram.presets import get_preset  # noqa: E402

VOCAB = 61


def model(preset="tiny-moe", seed=0):
    torch.manual_seed(seed)
    return H.to_hf(EngramLM(get_preset(preset).without_data().with_data(VOCAB, 0)))


def ids():
    return torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))


def rewrite_weights(folder, change):
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop("model.norm.weight"), r"missing keys \['model.norm.weight'\]"),
    (lambda t: t.__setitem__("model.extra.weight", torch.ones(2)), r"unexpected keys \['model.extra.weight'\]"),
])
def test_missing_or_extra_weights_are_an_error(tmp_path, change, message):
    model().save_pretrained(tmp_path)
    rewrite_weights(tmp_path, change)
    F.write_checksums(tmp_path)  # a folder consistent with its checksums: the weights themselves are wrong
    with pytest.raises(F.FolderError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_changed_byte_is_refused_naming_the_file(tmp_path):
    model().save_pretrained(tmp_path)
    listed = json.loads((tmp_path / F.CHECKSUMS).read_text())["files"]
    assert {"config.json", "model.safetensors"} <= set(listed)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(F.FolderError, match="model.safetensors: sha256 mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(F.FolderError, match="config.json is missing"):  # (AutoConfig fails first without it)
        H.EngramForCausalLM.from_pretrained(tmp_path)


def failing_save(after_files: int, exc):
    """PreTrainedModel.save_pretrained that writes its first files and then fails (disk full, kill)."""
    real = PreTrainedModel.save_pretrained

    def save(self, directory, *args, **kwargs):
        real(self, directory, *args, **kwargs)
        written = sorted(os.listdir(directory))
        for name in written[after_files:]:
            os.remove(os.path.join(directory, name))
        raise exc
    return save


def test_a_save_that_fails_leaves_no_folder_and_no_temporary_files(tmp_path, monkeypatch):
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing_save(1, OSError(errno.ENOSPC, "No space left")))
    target = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        model().save_pretrained(target)
    assert not target.exists() and os.listdir(tmp_path) == []


def test_a_save_over_an_earlier_one_that_fails_keeps_the_earlier(tmp_path, monkeypatch):
    first, second = model(seed=0), model(seed=1)
    first.save_pretrained(tmp_path)
    expected = first(ids(), use_cache=False).logits
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing_save(1, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path)
    monkeypatch.undo()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded(ids(), use_cache=False).logits, expected)
    assert not [p for p in tmp_path.parent.iterdir() if p.name.endswith(".saving")]


def test_a_folder_interrupted_while_its_files_are_replaced_is_refused(tmp_path, monkeypatch):
    model(seed=0).save_pretrained(tmp_path)
    real, moved = os.replace, []

    def replace(src, dst):
        if len(moved) == 2:
            raise KeyboardInterrupt  # killed between two files
        moved.append(dst)
        real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        model(seed=1).save_pretrained(tmp_path)
    monkeypatch.undo()
    with pytest.raises(F.FolderError, match="was being written when the save stopped"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    model(seed=1).save_pretrained(tmp_path)  # saving again repairs it
    AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_second_save_removes_the_first_saves_stale_files_and_keeps_others(tmp_path):
    model().save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("mine")  # not the save's: kept
    listed = json.loads((tmp_path / F.CHECKSUMS).read_text())
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"old shard")
    listed["files"]["model-00002-of-00002.safetensors"] = {"bytes": 9, "sha256": "0" * 64}
    (tmp_path / F.CHECKSUMS).write_text(json.dumps(listed))
    model().save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "mine"
    assert not (tmp_path / "model-00002-of-00002.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_folder_from_before_checksums_loads_with_a_warning(tmp_path):
    model().save_pretrained(tmp_path)
    (tmp_path / F.CHECKSUMS).unlink()
    with pytest.warns(UserWarning, match="no checksums.json"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_export_hf_out_of_disk_is_one_line(tmp_path, monkeypatch, capsys, checkpoint_for_export):
    from engram.cli import main

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing_save(1, OSError(errno.ENOSPC, "No space left")))
    assert main(["export-hf", "--ckpt", str(checkpoint_for_export), "--out", str(tmp_path / "hf")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' own progress bar
    assert last == "engram export-hf: error: [Errno 28] No space left"
    assert not (tmp_path / "hf").exists()


@pytest.fixture
def checkpoint_for_export():
    from pathlib import Path

    return Path(__file__).parents[1] / "fixtures" / "v0_1" / "sharded_run"


def test_a_sharded_save_over_a_folder_from_before_checksums_leaves_no_old_weights(tmp_path):
    """transformers' own clean-up of an earlier save's weight files runs in the save's temporary folder, so the
    folder's old model.safetensors (listed nowhere) must go too, or transformers would load it instead."""
    first, second = model(seed=0), model(seed=1)
    PreTrainedModel.save_pretrained(first, tmp_path)  # as an earlier version wrote it: no checksums
    second.save_pretrained(tmp_path, max_shard_size="100KB")
    assert not (tmp_path / "model.safetensors").exists() and (tmp_path / "model.safetensors.index.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded(ids(), use_cache=False).logits, second(ids(), use_cache=False).logits)
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "model-00001-of-00002.safetensors").read_bytes()
                                                  if (tmp_path / "model-00001-of-00002.safetensors").exists()
                                                  else b"stray")
    with pytest.raises(F.FolderError, match=r"weight files its checksums.json does not list: \['model.safetensors'\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_save_into_an_existing_folder_never_renames_across_its_boundary(tmp_path, monkeypatch):
    """Into an existing folder (a mount point, a parent without write access) every rename stays inside it."""
    target = tmp_path / "mounted"
    target.mkdir()
    real, moves = os.replace, []

    def replace(src, dst):
        moves.append((os.path.abspath(src), os.path.abspath(dst)))
        real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    model().save_pretrained(target)
    monkeypatch.undo()
    inside = str(target) + os.sep
    assert moves and all(src.startswith(inside) and dst.startswith(inside) for src, dst in moves)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mounted"]  # nothing written beside it
    AutoModelForCausalLM.from_pretrained(target)


def test_push_to_hub_is_refused_with_the_way_to_do_it(tmp_path):
    with pytest.raises(ValueError, match="upload the folder"):
        model().save_pretrained(tmp_path / "x", push_to_hub=True)
