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

A model trained with sharded tables (``engram.distributed``) writes the same files with the table
rows left out of ``model.safetensors`` and the table moments out of ``optimizer.pt``; every rank
writes its rows to ``tables/shard-RRRRR-of-WWWWW.safetensors`` (``engram/distributed/checkpoint.py``).
Such a checkpoint loads on any number of ranks, and in a single process as whole tables.

It is written into a temporary directory and renamed into place, then ``<run>/checkpoints/latest`` is
replaced atomically, so a crash at any moment leaves the previous checkpoint intact. Loading checks
the manifest first (a truncated or altered file is reported by name, not as a torch traceback) and
refuses a tokenizer or hash layout that disagrees with the one the tables were trained with
(PITFALLS 3, 4).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engram.config import RunConfig
from engram.distributed import checkpoint as table_ckpt
from engram.distributed import runtime
from engram.distributed.sharded import sharded_tables
from engram.model.transformer import EngramLM
from engram.storage.export import file_sha256
from engram.tokenizer import CompressedTokenizer

FORMAT = "engram.checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupted, or incompatible with the tokenizer in use."""


def _file_entry(path: Path) -> dict:
    """A file's manifest entry."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: EngramLM, optimizer_state: dict,
                    run_config: RunConfig, tokenizer, trainer_state: dict, keep_last: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it; keep the newest ``keep_last``.

    With sharded tables this is a collective: every rank calls it, writes its shard, and rank 0 writes
    the rest (``run_dir`` must be one shared directory for all ranks, e.g. on a network filesystem).
    """
    from safetensors.torch import save_file

    tables = sharded_tables(model)
    group = next(iter(tables.values())).group if tables else None
    # without sharded tables there is nothing per rank to write: rank 0 writes everything
    main = dist.get_rank(group) == 0 if tables else runtime.is_main()
    root = checkpoints_dir(run_dir)
    final = root / f"step_{step:07d}"
    # one temporary directory that every rank writes into: its name must not depend on the process
    tmp = root / (f".tmp_step_{step:07d}_sharded" if tables else f".tmp_step_{step:07d}_{os.getpid()}")
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "tokenizer").mkdir(parents=True)
    shard_files: dict[str, dict] = {}
    if tables:
        dist.barrier(group)
        written = table_ckpt.write_shard(tmp, tables, optimizer_state.get("tables"))
        mine = {written: _file_entry(tmp / written)}  # each rank hashes its own shard
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, mine, group=group)
        for entry in gathered:
            shard_files.update(entry)
    if main:
        table_keys = {f"{name}.weight" for name in tables}
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in table_keys}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT, "step": str(step)})
        if tables:
            optimizer_state = table_ckpt.strip_table_moments(optimizer_state)
            _write_json(tmp / table_ckpt.INDEX, table_ckpt.table_index(tables, dist.get_world_size(group)))
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
        entries = {str(p.relative_to(tmp)): shard_files.get(str(p.relative_to(tmp))) or _file_entry(p) for p in files}
        missing = sorted(set(shard_files) - set(entries))
        if missing:
            raise CheckpointError(f"table shards {missing} were written by other ranks but are not in {tmp}: "
                                  "every rank must see the same run directory (a shared filesystem)")
        manifest = {"format": FORMAT, "step": step, "files": entries}
        _write_json(tmp / MANIFEST, manifest)

        if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, root / LATEST)

        for old in sorted(root.glob("step_*"))[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if tables:
        dist.barrier(group)
    elif runtime.is_distributed():
        runtime.barrier()  # no rank reads or re-saves the step before rank 0 has renamed it
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
        if check_hashes and file_sha256(file) != expected["sha256"]:
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

    @property
    def sharded(self) -> bool:
        """Written by ranks holding sharded tables (``tables/`` holds the rows)."""
        return (self.path / table_ckpt.INDEX).is_file()

    def stored_optimizer_state(self) -> dict:
        """``optimizer.pt`` as written: without table moments when the checkpoint is sharded."""
        if self._optimizer_state is None:
            self._optimizer_state = torch.load(self.path / "optimizer.pt", map_location="cpu", weights_only=True)
        return self._optimizer_state

    def optimizer_state(self) -> dict:
        """The optimizer state of a single process holding whole tables (moments gathered from the
        shards of a sharded checkpoint)."""
        stored = self.stored_optimizer_state()
        return self.tables().full_moments_state(stored) if self.sharded else stored

    def tables(self, names: list[str] | None = None) -> table_ckpt.CheckpointTables:
        """A reader of any row range of the stored tables and their moments, whichever layout."""
        from engram.train.optim import named_tables

        return table_ckpt.CheckpointTables(self.path, names or list(named_tables(self.model)))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", tokenizer=None,
                    check_hashes: bool = True, tables: bool = True) -> Checkpoint:
    """Load a checkpoint (or a run directory's latest) into a fresh model on ``device``.

    ``tokenizer`` (a tokenizers.Tokenizer, directory or tokenizer.json), when given, must compress
    exactly like the one stored; otherwise the stored tokenizer is used. Either way the compressed
    table is rebuilt from the tokenizer and compared with the stored table and hash layout.

    A sharded checkpoint loads with whole tables (read from every shard). ``tables=False`` leaves the
    hashed tables at their initial values (for ranks that then read only their own rows, see
    ``engram.distributed.checkpoint.load_shards``).
    """
    from safetensors import safe_open
    from tokenizers import Tokenizer

    from engram.train.optim import named_tables

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
    table_names = list(named_tables(model))
    table_keys = {f"{name}.weight" for name in table_names}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if tables or k not in table_keys}
    sharded = (path / table_ckpt.INDEX).is_file()
    if sharded and tables:
        try:
            reader = table_ckpt.CheckpointTables(path, table_names)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        state |= {f"{name}.weight": reader.read(name, "weight") for name in table_names}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if not tables:
        missing = [k for k in missing if k not in table_keys]
    if missing or unexpected:
        raise CheckpointError(f"{path}/model.safetensors does not fit the stored config: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return Checkpoint(path=path, run_config=run_config, model=model.to(device), tokenizer=tokenizer,
                      trainer_state=trainer_state)


def restore_training_state(ckpt: Checkpoint, model: EngramLM, optimizers) -> dict:
    """Put ``ckpt``'s optimizer state (and, when ``model``'s tables are sharded, this rank's table rows)
    into ``model`` / ``optimizers``; returns the optimizer state as loaded (it holds ``torch_rng``).

    ``model`` is ``ckpt.model``, possibly after ``shard_tables``: then every rank reads its own rows
    and moments from the checkpoint, whichever number of ranks wrote it (``load_checkpoint(...,
    tables=False)`` skips reading whole tables first).
    """
    tables = sharded_tables(model)
    if not tables:
        state = ckpt.optimizer_state()
    else:
        reader = ckpt.tables(list(tables))
        table_ckpt.load_shards(reader, tables)
        state = table_ckpt.shard_optimizer_state(reader, tables, ckpt.stored_optimizer_state())
    optimizers.load_state_dict(state)
    return state
