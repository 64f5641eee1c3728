"""Property: any interleaving of saves, kills (at any filesystem step), restarts, fresh starts and rewinds
leaves ``latest`` naming an intact checkpoint (or absent) and loses at most the steps since the last
finished save."""

import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import tiny_run
from engram.data import prepare_data
from engram.model.transformer import EngramLM
from engram.train import latest_checkpoint, list_checkpoints, save_checkpoint, verify_checkpoint
from engram.train.checkpoint import step_of
from engram.train.checkpoint import remove_staging
from engram.train.rundir import rewind, start_fresh


class Killed(BaseException):
    """The process died here: nothing after it runs, no cleanup either."""


class Mortal:
    """Patches the calls that change what another process would see (rename, replace, delete) so that
    the ``crash_at``-th of them, and every one after it, kills the process instead."""

    CALLS = ((os, "rename"), (os, "replace"), (os, "unlink"), (os, "remove"), (shutil, "rmtree"))

    def __init__(self, monkeypatch, crash_at):
        self.crash_at, self.count, self.dead = crash_at, 0, False
        for module, name in self.CALLS:
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name)))

    def _wrap(self, real):
        def call(*args, **kwargs):
            if self.dead:
                raise Killed
            self.count += 1
            if self.crash_at is not None and self.count == self.crash_at:
                self.dead = True
                raise Killed
            return real(*args, **kwargs)
        return call


@pytest.fixture(scope="module")
def saver(corpus_dir, cache_dir, tmp_path_factory):
    run = tiny_run(corpus_dir, cache_dir, tmp_path_factory.mktemp("unused"))
    data = prepare_data(run.data)
    model_config = run.model.with_data(data.vocab_size, data.pad_id)
    torch.manual_seed(0)
    model = EngramLM(model_config, data.compressed)
    run = type(run)(model=model_config, data=run.data, train=run.train)

    def save(run_dir, step):
        save_checkpoint(run_dir, step, model, {}, run, data.tokenizer, {"tokens": step}, keep_last=2)
    return save


ops = st.lists(st.one_of(
    st.tuples(st.just("save"), st.integers(1, 3), st.none() | st.integers(1, 12)),
    st.tuples(st.just("fresh"), st.just(0), st.none() | st.integers(1, 4)),
    st.tuples(st.just("rewind"), st.integers(0, 3), st.none() | st.integers(1, 4)),
), min_size=1, max_size=10)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_latest_survives_any_interleaving(saver, tmp_path_factory, ops):
    run_dir = tmp_path_factory.mktemp("history")
    step = 0  # the step the live history has reached
    durable = None  # the newest step whose save finished: it must never be lost

    def restart():
        """What the next process sees: no staging left, latest absent or intact and not behind."""
        nonlocal step
        remove_staging(run_dir)
        latest = latest_checkpoint(run_dir)  # never raises: latest names a published step or is absent
        if latest is not None:
            verify_checkpoint(latest)
        if durable is None:
            assert latest is None or step_of(latest) >= 1
        else:
            assert latest is not None and step_of(latest) >= durable
        step = step_of(latest) if latest is not None else 0
        assert not list(run_dir.glob("checkpoints/.tmp_step_*"))

    for kind, arg, crash_at in ops:
        with pytest.MonkeyPatch.context() as mp:
            mortal = Mortal(mp, crash_at)
            try:
                if kind == "save":
                    saver(run_dir, step + arg)
                    durable = step = step + arg
                elif kind == "fresh":
                    start_fresh(run_dir)
                    durable, step = None, 0
                else:
                    have = [s for s, _ in list_checkpoints(run_dir)]
                    if have:
                        target = have[min(arg, len(have) - 1)]
                        rewind(run_dir, target)
                        durable = step = target
            except Killed:
                assert mortal.dead
                if kind == "fresh":  # killed mid-move: the old history or none, both whole
                    durable = None
                elif kind == "rewind":  # latest is rewritten first, so either pointer may survive
                    durable = min(durable, target) if durable is not None else None
        restart()
        if durable is not None:
            assert step >= durable


def test_pruning_never_removes_the_step_just_written(saver, tmp_path):
    """Steps above the one written (left by a rewind killed half-way) are neither pruned nor a reason
    to prune the new one: keep-last counts only the steps below it."""
    for step in (10, 12):
        saver(tmp_path, step)
    (tmp_path / "checkpoints" / "latest").write_text("step_0000010\n")  # as a killed rewind to 10 leaves it
    for step in (11, 3, 4):
        saver(tmp_path, step)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4, 10, 11, 12]
    assert latest_checkpoint(tmp_path).name == "step_0000004"
