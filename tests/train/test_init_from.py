"""train.init_from (engram train --init-from): a new run starts from another run's weights with
a new optimizer and schedule; a checkpoint of another architecture is refused."""

import dataclasses

import pytest
import torch

from support import tiny_run
from engram.config import YarnConfig
from engram.train import load_checkpoint, open_checkpoint, train


@pytest.fixture(scope="module")
def source(corpus_dir, cache_dir, tmp_path_factory):
    run = tiny_run(corpus_dir, cache_dir, tmp_path_factory.mktemp("source") / "run", max_steps=6, save_every=6,
                   eval_every=6)
    return run, train(run, progress=False).checkpoint


def extended(run, source_ckpt, out, **train_changes):
    bb = dataclasses.replace(run.model.backbone, max_seq_len=2 * run.model.backbone.max_seq_len,
                             rope_scaling=YarnConfig(factor=2.0, original_max_seq_len=run.model.backbone.max_seq_len))
    model = dataclasses.replace(run.model, backbone=bb)
    settings = dict(init_from=str(source_ckpt), seq_len=64, max_steps=3, save_every=3, eval_every=3,
                    out_dir=str(out)) | train_changes
    return dataclasses.replace(run, model=model, train=dataclasses.replace(run.train, **settings))


def test_weights_kept_optimizer_and_schedule_new(source, tmp_path):
    from engram.train.loop import setup

    run, ckpt = source
    state = setup(extended(run, ckpt, tmp_path / "ext"), tmp_path / "ext")
    before = load_checkpoint(ckpt).model.state_dict()
    now = state.model.state_dict()
    assert now.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(now[name], value), name  # every weight and table row, nothing re-initialised
    assert state.step == 0 and state.last_checkpoint is None  # a new schedule, from step 0
    moments = list(_moments(state.optimizers))
    assert not any(len(v) for v in moments)  # no Adam moments carried over
    assert state.run.train.init_from == str(ckpt) and state.run.model.backbone.rope_scaling.factor == 2.0


def _moments(optimizers):
    found = [opt for opt in vars(optimizers).values() if isinstance(opt, torch.optim.Optimizer)]
    assert found  # the dense and the table optimizer
    for opt in found:
        yield from (state for state in opt.state.values())


def test_the_extended_run_trains_and_resumes(source, tmp_path):
    run, ckpt = source
    new = extended(run, ckpt, tmp_path / "ext")
    first = train(dataclasses.replace(new, train=dataclasses.replace(new.train, max_steps=2, save_every=2)),
                  progress=False)
    assert first.steps == 2
    resumed = train(new, progress=False)  # continues its own checkpoint; init_from is not applied again
    assert resumed.steps == 3 and open_checkpoint(resumed.checkpoint).step == 3


@pytest.mark.parametrize("change, field", [
    (lambda m: dataclasses.replace(m, backbone=dataclasses.replace(m.backbone, d_model=32, n_heads=2)), "d_model"),
    (lambda m: dataclasses.replace(m, engram=dataclasses.replace(m.engram, layer_ids=[0])), "layer_ids"),
    (lambda m: dataclasses.replace(m, engram=None), "engram"),
])
def test_another_architecture_is_refused(source, tmp_path, change, field):
    run, ckpt = source
    new = extended(run, ckpt, tmp_path / "bad")
    with pytest.raises(ValueError, match=f"another architecture .*{field}"):
        train(dataclasses.replace(new, model=change(new.model)), progress=False)
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_extension_settings_that_do_not_fit_the_source_are_refused(source, tmp_path):
    run, ckpt = source
    new = extended(run, ckpt, tmp_path / "a")
    bb = new.model.backbone
    wrong = dataclasses.replace(bb, rope_scaling=YarnConfig(factor=2.0, original_max_seq_len=128))
    with pytest.raises(ValueError, match="original_max_seq_len=128 but .* context of 256 tokens"):
        train(dataclasses.replace(new, model=dataclasses.replace(new.model, backbone=wrong)), progress=False)
    shorter = dataclasses.replace(bb, max_seq_len=128, rope_scaling=None)
    short_run = dataclasses.replace(new, model=dataclasses.replace(new.model, backbone=shorter))
    with pytest.raises(ValueError, match="below the context"):
        train(short_run, progress=False)


def test_init_from_inside_the_run_directory_with_no_resume_is_refused(source, tmp_path):
    import shutil

    run, ckpt = source
    out = tmp_path / "self"
    shutil.copytree(ckpt.parent.parent, out)  # the source run's directory, checkpoints included
    inside = out / "checkpoints" / ckpt.name
    with pytest.raises(ValueError, match="lies inside .* --no-resume moves to the archive"):
        train(extended(run, inside, out), progress=False, resume=False)
    assert inside.exists()  # nothing was archived


def test_init_from_on_a_run_that_has_checkpoints_is_refused_not_ignored(source, tmp_path):
    """A run directory with checkpoints resumes; an --init-from it did not start with would be silently ignored."""
    run, ckpt = source
    plain = dataclasses.replace(run, train=dataclasses.replace(run.train, max_steps=2, save_every=2,
                                                               out_dir=str(tmp_path / "r")))
    train(plain, progress=False)
    asked = dataclasses.replace(plain, train=dataclasses.replace(plain.train, max_steps=3, init_from=str(ckpt)))
    with pytest.raises(ValueError, match="already holds checkpoints \\(step 2\\).*init_from=.* would be ignored"):
        train(asked, progress=False)


def test_a_run_started_from_a_source_resumes_however_the_source_is_written(source, tmp_path, monkeypatch):
    run, ckpt = source
    new = extended(run, ckpt, tmp_path / "ext", max_steps=2, save_every=2)
    train(new, progress=False)
    monkeypatch.chdir(ckpt.parent.parent.parent)  # the same source, by a relative path to its run directory
    relative = dataclasses.replace(new, train=dataclasses.replace(new.train, max_steps=3,
                                                                  init_from=ckpt.parent.parent.name))
    assert train(relative, progress=False).steps == 3
