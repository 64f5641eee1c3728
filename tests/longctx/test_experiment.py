"""The long-context experiment's plan: the extension run and the equal-loss checkpoint choice."""

from pathlib import Path

from engram.longctx.experiment import Settings, equal_loss_start, extend_run, pretrain_plan


def test_pretraining_keeps_every_checkpoint_and_mixes_retrieval_documents():
    plan = pretrain_plan([0, 1], Settings(retrieval_docs=10, pretrain_steps=40, save_every=20))
    assert [(p.point, p.seed) for p in plan] == [("demo-moe", 0), ("demo-engram", 0), ("demo-moe", 1), ("demo-engram", 1)]
    for p in plan:
        assert p.run.data.retrieval_docs == 10 and p.run.train.keep_checkpoints == 0
        assert p.run.train.seed == p.seed and p.run.train.max_steps == 40


def test_extension_is_yarn_at_factor_times_the_length_with_the_same_tokens_per_step(tmp_path):
    pre = pretrain_plan([0], Settings())[1]
    ext = extend_run(pre, tmp_path / "ckpt", "extend-equal-flops", Settings(factor=4, extend_steps=30))
    bb, tc = ext.run.model.backbone, ext.run.train
    assert (bb.max_seq_len, tc.seq_len) == (4 * pre.run.train.seq_len,) * 2
    assert bb.rope_scaling.factor == 4 and bb.rope_scaling.original_max_seq_len == pre.run.train.seq_len
    assert tc.tokens_per_step == pre.run.train.tokens_per_step and tc.init_from == str((tmp_path / "ckpt").resolve())
    assert ext.run.model.engram == pre.run.model.engram and ext.path.endswith("demo-engram/extend-equal-flops")


def test_equal_loss_takes_the_better_models_checkpoint_closest_to_the_others_final_loss():
    p = Path("x")
    histories = {"demo-moe": [(100, 5.0, p), (200, 4.6, p), (300, 4.4, p)],
                 "demo-engram": [(100, 4.9, p), (200, 4.42, p), (300, 4.3, p)]}
    assert equal_loss_start(histories) == ("demo-engram", 200, p, 4.42)
    histories["demo-engram"] = [(100, 4.9, p), (200, 4.5, p), (300, 4.39, p)]
    assert equal_loss_start(histories) is None  # the final checkpoint is closest: equal loss = equal FLOPs
    histories["demo-moe"] = [(100, 5.0, p), (200, 4.45, p), (300, 4.2, p)]  # the MoE model is the better one
    assert equal_loss_start(histories)[:2] == ("demo-moe", 200)
