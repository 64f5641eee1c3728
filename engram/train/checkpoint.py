"""Checkpoints: safetensors weights, JSON config, the tokenizer, the hash layout and optimizer state.

A checkpoint is a directory ``<run>/checkpoints/step_NNNNNNN/``:

    model.safetensors            weights and persistent buffers (MoE expert bias)
    optimizer.pt                 AdamW + SparseAdam state and the torch RNG (loaded with weights_only)
    run_config.json              the resolved RunConfig
    trainer_state.json           step, tokens seen, last metrics
    hash_layout.json             NgramHasher.layout() (Engram models only)
    overencoding_layout.json     the OverEncoding hasher's layout (OverEncoding models only)
    tokenizer/tokenizer.json, tokenizer/compressed_tokenizer.safetensors
    manifest.json                size and sha256 of every file above; written last

It is written into a temporary directory and renamed into place, then ``<run>/checkpoints/latest`` is
replaced atomically, so a crash at any moment leaves the previous checkpoint intact. Loading checks
the manifest first (a truncated or altered file is reported by name, not as a torch traceback) and
refuses a tokenizer or hash layout that disagrees with the one the tables were trained with
(PITFALLS 3, 4).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engram.config import RunConfig
from engram.model.transformer import EngramLM
from engram.tokenizer import CompressedTokenizer

FORMAT = "engram.checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupted, or incompatible with the tokenizer in use."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: EngramLM, optimizer_state: dict,
                    run_config: RunConfig, tokenizer, trainer_state: dict, keep_last: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it; keep the newest ``keep_last``."""
    from safetensors.torch import save_file

    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tokenizer").mkdir(parents=True)

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT, "step": str(step)})
    torch.save({**optimizer_state, "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    _write_json(tmp / "run_config.json", run_config.to_dict())
    _write_json(tmp / "trainer_state.json", {"format": FORMAT, "step": step, **trainer_state})
    for name, hasher in _hashers(model).items():
        _write_json(tmp / name, hasher.layout())
    tokenizer.save(str(tmp / "tokenizer" / "tokenizer.json"))
    # the tokenizer's compression, not the hasher's: with compress=False the hasher is the identity,
    # and loading compares this file with the compression rebuilt from tokenizer.json
    compressed = model.compressed_tokenizer
    if compressed is None:
        compressed = CompressedTokenizer.from_pretrained(tokenizer)
    compressed.save(tmp / "tokenizer")

    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {"format": FORMAT, "step": step,
                "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
    _write_json(tmp / MANIFEST, manifest)

    if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / LATEST)

    for old in sorted(root.glob("step_*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _hashers(model: EngramLM) -> dict[str, object]:
    """Layout file name -> the hasher whose addresses it fixes."""
    hashers = {}
    if model.hasher is not None:
        hashers["hash_layout.json"] = model.hasher
    if model.overencoding is not None:
        hashers["overencoding_layout.json"] = model.overencoding.hasher
    return hashers


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` points at, or None when the run has none."""
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} points at {path.name}, which does not exist")
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint directory, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
        if (path / "model.safetensors").exists():
            raise CheckpointError(f"{path} has no {MANIFEST}: the checkpoint was not completely written")
    raise CheckpointError(f"no checkpoint at {path} (expected a checkpoint directory or a run directory)")


def verify_checkpoint(path: str | os.PathLike, check_hashes: bool = True) -> dict:
    """Check every file against the manifest; raise CheckpointError naming the first bad file."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST}: the checkpoint is incomplete") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / MANIFEST} is not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint file {file} is truncated or altered: "
                                  f"{size} bytes, manifest says {expected['bytes']}")
        if check_hashes and _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {file} is corrupted: sha256 differs from the manifest")
    return manifest


@dataclass
class Checkpoint:
    path: Path
    run_config: RunConfig
    model: EngramLM
    tokenizer: Any  # tokenizers.Tokenizer
    trainer_state: dict
    _optimizer_state: dict | None = field(default=None, repr=False)

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])

    def optimizer_state(self) -> dict:
        if self._optimizer_state is None:
            self._optimizer_state = torch.load(self.path / "optimizer.pt", map_location="cpu", weights_only=True)
        return self._optimizer_state


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", tokenizer=None,
                    check_hashes: bool = True) -> Checkpoint:
    """Load a checkpoint (or a run directory's latest) into a fresh model on ``device``.

    ``tokenizer`` (a tokenizers.Tokenizer, directory or tokenizer.json), when given, must compress
    exactly like the one stored; otherwise the stored tokenizer is used. Either way the compressed
    table is rebuilt from the tokenizer and compared with the stored table and hash layout.
    """
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    path = resolve_checkpoint(path)
    verify_checkpoint(path, check_hashes)
    run_config = RunConfig.from_dict(json.loads((path / "run_config.json").read_text()))
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    stored = CompressedTokenizer.load(path / "tokenizer")
    if tokenizer is None:
        tokenizer = Tokenizer.from_file(str(path / "tokenizer" / "tokenizer.json"))
    elif not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_file(str(Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else tokenizer))
    rebuilt = CompressedTokenizer.from_pretrained(tokenizer)
    if rebuilt != stored:
        raise CheckpointError(
            f"the tokenizer in use compresses to V'={rebuilt.vocab_size} (sha256 {rebuilt.sha256[:12]}) but the "
            f"checkpoint's tables were addressed with V'={stored.vocab_size} (sha256 {stored.sha256[:12]}); "
            "refusing to load (a different tokenizer or tokenizers version would scramble every Engram row)")

    model = EngramLM(run_config.model, stored)
    for name, hasher in _hashers(model).items():
        layout_file = path / name
        if not layout_file.is_file():
            raise CheckpointError(f"{path} holds a model with hashed tables but no {name}")
        try:
            hasher.check_layout(json.loads(layout_file.read_text()))
        except ValueError as err:
            raise CheckpointError(f"{layout_file}: {err}") from None
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}/model.safetensors does not fit the stored config: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return Checkpoint(path=path, run_config=run_config, model=model.to(device), tokenizer=tokenizer,
                      trainer_state=trainer_state)
