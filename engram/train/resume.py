"""The resume policy: which checkpoint a run continues from, and what may change when it does.

- ``checkpoint_to_resume``: the latest checkpoint, a chosen step (``--resume-from``), or none (``--no-resume``).
- ``check_resume``: a checkpoint of another model or optimizer is refused, naming the fields; other changed
  settings are reported; fields that only decide the initial weights keep the checkpoint's value.
- ``check_init_from``: a run started from another run's weights (``train.checkpoint.init_from``) must have
  the same architecture, except for the context fields (``INIT_FROM_MAY_CHANGE``).
- ``apply_run_dir``: once every check passed, archive the history or rewind it (``engram.train.rundir``).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from engram.distributed import runtime as rt
import engram.train.rundir as rundir
from engram.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, recovery_hint
from engram.train.config import MOVED, RunConfig

# train fields that say where and how fast, not what is learned: never reported as changed on resume
_NOT_COMPARED = {"train.out_dir", "train.placement.device"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(stored: RunConfig, now: RunConfig) -> list[tuple[str, object, object]]:
    """(dotted field, stored value, new value) for every field that differs, paths compared resolved
    (give both with their data paths absolute); ``train.out_dir`` and ``train.placement.device`` are not compared."""
    a, b = _flatten(stored.to_dict()), _flatten(now.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in _NOT_COMPARED and a.get(k) != b.get(k)]


# a training field is named in messages by its short name (``train.lr``, not ``train.optim.lr``): the name
# users know from their configs and scripts, which --set still takes
_SHORT = {f"train.{new}": f"train.{old}" for old, new in MOVED.items()}


def describe_changes(changes) -> str:
    """``config_changes``'s list as one line: ``train.lr: 0.003 -> 0.001, ...`` (short training-field names)."""
    return ", ".join(f"{_SHORT.get(k, k)}: {old!r} -> {new!r}" for k, old, new in changes)


INIT_ONLY_FIELDS = ("table_init_std",)


def check_resume(ckpt, run: RunConfig, run_dir: Path) -> RunConfig:
    """Refuse a checkpoint of another model or optimizer, naming the fields; report other changed fields.
    Returns the run to continue: a model field that only decides the initial weights (``INIT_ONLY_FIELDS``) cannot
    change a run that has started, so it keeps the checkpoint's value (and says so)."""
    kept = []
    for section in ("engram", "overencoding"):
        old, new = getattr(ckpt.run_config.model, section), getattr(run.model, section)
        if old is None or new is None:
            continue
        for name in INIT_ONLY_FIELDS:
            if hasattr(old, name) and getattr(old, name) != getattr(new, name):
                kept.append(f"model.{section}.{name}={getattr(old, name)!r} (asked {getattr(new, name)!r})")
                new = dataclasses.replace(new, **{name: getattr(old, name)})
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, **{section: new}))
    if kept and rt.is_main():
        print(f"[engram] resuming: keeping the checkpoint's {', '.join(kept)}; it only decides the initial "
              "weights, which this run already has", file=sys.stderr)
    now = dataclasses.replace(run, data=run.data.resolved())
    stored = dataclasses.replace(ckpt.run_config, data=ckpt.data_config)
    changes = config_changes(stored, now)
    model = [c for c in changes if c[0].startswith("model.")]
    if model:
        hint = ""
        if any(k == "model.backbone.document_mask" and old is False for k, old, _ in model):
            hint = ("; it was trained before document-masked attention: --set model.backbone.document_mask=false "
                    "continues it as it was trained")
        raise ValueError(f"{run_dir} holds a checkpoint ({ckpt.path.name}) of a different model "
                         f"({describe_changes(model)}); use another --out, or --no-resume to start afresh (the old "
                         f"history is moved to {run_dir / rundir.ARCHIVE}){hint}")
    optimizer = [c for c in changes if c[0] == "train.optim.name"]
    if optimizer:  # the checkpoint's optimizer state is the old optimizer's
        raise ValueError(f"{run_dir} holds a checkpoint ({ckpt.path.name}) trained with another optimizer "
                         f"({describe_changes(optimizer)}): a run resumes with the optimizer it started with; to "
                         "switch, start a new run (another --out) with --init-from this checkpoint")
    if changes and rt.is_main():
        print(f"[engram] resuming {ckpt.path.name} with changed settings (allowed; the run is no longer one "
              f"uninterrupted run of a single config; data is tokenized with the checkpoint's tokenizer): "
              f"{describe_changes(changes)}", file=sys.stderr)
    return run


# model fields a run started with --init-from may change: the context (YaRN extension), the attention's
# document mask, and what only decided the source run's initial weights
INIT_FROM_MAY_CHANGE = ("model.backbone.max_seq_len", "model.backbone.rope_scaling", "model.backbone.document_mask",
                        "model.engram.table_init_std", "model.overencoding.table_init_std")


def check_init_from(init, run: RunConfig, run_dir: Path, resume: bool) -> None:
    """Refuse ``init`` (a checkpoint) whose model is another architecture than ``run``'s, naming the fields;
    a YaRN extension whose original length is not the source's context; a source inside the run
    directory that ``--no-resume`` is about to archive."""
    if not resume and Path(init.path).resolve().is_relative_to(Path(run_dir).resolve()):
        raise ValueError(f"train.init_from={run.train.checkpoint.init_from!r} lies inside {run_dir}, whose history "
                         "--no-resume moves to the archive first; copy the checkpoint elsewhere or use another --out")
    source_context = init.run_config.model.backbone.max_seq_len
    scaling, context = run.model.backbone.rope_scaling, run.model.backbone.max_seq_len
    if scaling is not None and scaling.original_max_seq_len != source_context:
        raise ValueError(f"model.backbone.rope_scaling.original_max_seq_len={scaling.original_max_seq_len} but "
                         f"{init.path} was trained with a context of {source_context} tokens; set it to "
                         f"{source_context}")
    if context < source_context:
        raise ValueError(f"model.backbone.max_seq_len={context} is below the context of {init.path} "
                         f"({source_context}); an extension keeps or grows it")
    changed = [c for c in config_changes(init.run_config, run)
               if c[0].startswith("model.") and not c[0].startswith(INIT_FROM_MAY_CHANGE)]
    if changed:
        raise ValueError(f"train.init_from={run.train.checkpoint.init_from!r} ({init.path}) holds another architecture "
                         f"({describe_changes(changed)}); only "
                         f"{', '.join(f.split('.', 1)[1] for f in INIT_FROM_MAY_CHANGE)} "
                         "may differ")


def checkpoint_to_resume(run_dir: Path, resume: bool, resume_from: int | None) -> Path | None:
    """Which checkpoint the run continues from; reads the directory, changes nothing."""
    if not resume:
        return None
    steps = list_checkpoints(run_dir)
    if resume_from is not None:
        chosen = dict(steps).get(resume_from)
        if chosen is None:
            have = ", ".join(str(s) for s, _ in steps) or "none"
            raise CheckpointError(f"{run_dir} has no checkpoint of step {resume_from} (steps: {have})")
        return chosen
    latest = latest_checkpoint(run_dir)
    if latest is None and steps:
        raise CheckpointError(f"{run_dir} holds checkpoints (steps {', '.join(str(s) for s, _ in steps)}) but no "
                              f"'latest' pointer, so which history to continue is unknown; {recovery_hint(run_dir)}; "
                              "or --no-resume to move them to the archive and start afresh")
    return latest


def apply_run_dir(run_dir: Path, resume: bool, resume_from: int | None) -> None:
    """Rank 0, under the run's lock, once every check has passed: archive the history
    (``resume=False``) or rewind to ``resume_from``."""
    if not resume:
        moved = rundir.start_fresh(run_dir)
        if moved is not None:
            print(f"[engram] --no-resume: the previous history of {run_dir} is kept in {moved}", file=sys.stderr)
    elif resume_from is not None:
        _, moved = rundir.rewind(run_dir, resume_from, verify=False)  # setup verified it when opening it
        if moved is not None:
            rundir.copy_metrics(run_dir, moved)
            print(f"[engram] resuming from step {resume_from}: the later checkpoints are kept in {moved.parent}",
                  file=sys.stderr)
