"""The main job (engram.demo, what `make demo` runs)."""

import json

from engram.demo import run_demo


def test_demo_quick_end_to_end(tmp_path, capsys):
    """What `make demo` runs, a few steps per model on the real stdlib corpus."""
    results = run_demo(out_dir=tmp_path / "demo", quick=True, progress=False,
                       overrides=[f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=2", "train.seq_len=64"])
    assert set(results) == {"demo-moe", "demo-engram"}
    stored = json.loads((tmp_path / "demo" / "results.json").read_text())
    for name, r in stored.items():
        assert {"total_params", "active_params", "engram_params", "tokens", "tokens_per_s", "val_loss",
                "val_bpb", "sample"} <= set(r)
    assert stored["demo-moe"]["engram_params"] == 0 < stored["demo-engram"]["engram_params"]
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "validation loss" in out and "greedy completion" in out
