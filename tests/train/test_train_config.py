"""TrainConfig in sections (optim, schedule, eval, checkpoint, placement), and everything written against its
flat fields of before still working: files, --set, the constructor (by name and by position), attributes,
dataclasses.replace, and errors that name the field as users know it."""

import copy
import dataclasses
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.schema import apply_overrides
from engram.train.config import (FLAT_ORDER, MOVED, CheckpointConfig, EvalConfig, OptimConfig, PlacementConfig,
                                 RunConfig, ScheduleConfig, TrainConfig)

FLAT_VALUES = {"lr": 1e-3, "table_lr_mult": 3.0, "weight_decay": 0.05, "beta1": 0.8, "beta2": 0.9, "grad_clip": 0.5,
               "warmup_steps": 7, "decay_at": [0.5], "decay_factor": 0.5, "eval_every": 3, "eval_batches": 2,
               "save_every": 4, "keep_checkpoints": 0, "init_from": "runs/x", "device": "cpu", "parallel": "fsdp",
               "optimizer": "muon"}


def test_the_sections_hold_what_the_flat_names_set():
    tc = TrainConfig(max_steps=9, **FLAT_VALUES)
    assert tc.optim == OptimConfig(name="muon", lr=1e-3, table_lr_mult=3.0, weight_decay=0.05, beta1=0.8, beta2=0.9,
                                   grad_clip=0.5)
    assert tc.schedule == ScheduleConfig(warmup_steps=7, decay_at=[0.5], decay_factor=0.5)
    assert tc.eval == EvalConfig(every=3, batches=2)
    assert tc.checkpoint == CheckpointConfig(every=4, keep=0, init_from="runs/x")
    assert tc.placement == PlacementConfig(device="cpu", parallel="fsdp")
    assert {old: getattr(tc, old) for old in FLAT_VALUES} == FLAT_VALUES  # the old names read the sections
    data = tc.to_dict()
    assert set(data) == {"max_steps", "batch_size", "seq_len", "grad_accum", "seed", "out_dir", "log_every", "optim",
                         "schedule", "eval", "checkpoint", "placement"}
    assert TrainConfig.from_dict(data) == tc


def test_a_flat_config_json_of_before_loads_to_the_same_config():
    flat = {"max_steps": 9, "batch_size": 8, "seq_len": 256, "grad_accum": 1, "log_every": 10, "seed": 0,
            "out_dir": "runs/train", **FLAT_VALUES}
    assert set(flat) == set(FLAT_ORDER)  # every field the flat TrainConfig had
    assert TrainConfig.from_dict(flat) == TrainConfig(max_steps=9, **FLAT_VALUES)
    run = RunConfig.from_dict({"train": flat})
    assert run.train.optim.lr == 1e-3 and run.train.checkpoint.keep == 0


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(MOVED)), st.none(), max_size=len(MOVED)))
def test_any_mix_of_old_and_new_names_is_one_config(chosen):
    """Each field given by its old name or inside its section (never both) gives the same config."""
    old = {k: FLAT_VALUES[k] for k in chosen}
    sections: dict = {}
    for k, v in FLAT_VALUES.items():
        if k not in chosen:
            section, name = MOVED[k].split(".")
            sections.setdefault(section, {})[name] = v
    assert TrainConfig.from_dict({**old, **sections}) == TrainConfig(**FLAT_VALUES)
    assert TrainConfig(**old, **sections) == TrainConfig(**FLAT_VALUES)


def test_positional_construction_follows_the_flat_order_of_before():
    tc = TrainConfig(100, 4, 32, 2, 1e-3)
    assert (tc.max_steps, tc.batch_size, tc.seq_len, tc.grad_accum, tc.optim.lr) == (100, 4, 32, 2, 1e-3)
    with pytest.raises(TypeError, match="both by position and by name"):
        TrainConfig(100, max_steps=5)


def test_replace_set_pickle_and_copy():
    tc = TrainConfig(lr=1e-3)
    assert dataclasses.replace(tc, lr=5e-3).optim.lr == 5e-3 and tc.optim.lr == 1e-3
    assert dataclasses.replace(tc, optim=OptimConfig(lr=2e-3)).lr == 2e-3
    tc.eval_every = 11  # the old name writes its section
    assert tc.eval.every == 11
    with pytest.raises(ValueError, match="TrainConfig.eval_every: must be >= 1"):
        tc.eval_every = 0
    assert pickle.loads(pickle.dumps(tc)) == tc and copy.deepcopy(tc) == tc


def test_a_field_given_twice_or_a_broken_section_is_refused_by_name():
    with pytest.raises(ValueError, match="'lr' and 'train.optim.lr' are the same field"):
        TrainConfig(optim={"lr": 1e-2}, lr=5e-3)
    with pytest.raises(ValueError, match="'save_every' and 'checkpoint.every' are the same field"):
        TrainConfig.from_dict({"checkpoint": {"every": 3}, "save_every": 5})
    with pytest.raises(ValueError, match="TrainConfig.checkpoint: must be a dict"):
        TrainConfig.from_dict({"checkpoint": None, "save_every": 5})
    with pytest.raises(ValueError, match="TrainConfig.optim: must be an OptimConfig"):
        TrainConfig(optim="adamw")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(TypeError, match="unknown field"):
        TrainConfig(learning_rate=1)


@pytest.mark.parametrize("override, error", [
    ("train.lr=-1", "TrainConfig.lr: must be > 0, got -1 (train.optim.lr)"),
    ("train.optim.lr=-1", "TrainConfig.lr: must be > 0, got -1 (train.optim.lr)"),
    ("train.optimizer=sgd", "TrainConfig.optimizer: must be one of ('adamw', 'muon')"),
    ("train.placement.device=gpu", "TrainConfig.device: must be 'auto'"),
    ("train.schedule.decay_at=[2]", "TrainConfig.decay_at: must be a list of fractions"),
])
def test_errors_name_the_field_as_users_know_it_and_where_it_lives(override, error):
    with pytest.raises(ValueError) as caught:
        apply_overrides(RunConfig(), [override])
    assert str(caught.value).startswith(error)


def test_set_takes_old_and_new_names_alike_also_inside_other_configs():
    run = apply_overrides(RunConfig(), ["train.lr=1e-4", "train.checkpoint.keep=5", "train.eval_every=7",
                                        "train.optimizer=muon"])
    assert (run.train.optim.lr, run.train.checkpoint.keep, run.train.eval.every, run.train.optim.name) == \
        (1e-4, 5, 7, "muon")
    pytest.importorskip("transformers")
    from engram.hf.finetune import FinetuneConfig

    ft = apply_overrides(FinetuneConfig(base="b"), ["train.lr=2e-4", "train.schedule.warmup_steps=3"])
    assert ft.train.optim.lr == 2e-4 and ft.train.schedule.warmup_steps == 3
    with pytest.raises(ValueError, match="unknown field 'lrr'"):
        apply_overrides(RunConfig(), ["train.optim.lrr=1"])
