"""The paired recall report: appearance steps (interpolated, never invented), seed-paired differences, the
end-of-training tables and the plots, from recall.json files laid out as ``s<seed>-<model>-<stage>``."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.longctx.recall_report import appearance_step, main, read_results, summarise


def result(step, gain, accuracy, context=256, **extra):
    return {"step": step, "context": context, "induction": {"32": {"gain": gain, "second_accuracy": gain / 6}},
            "mqar": {"8": {"accuracy": accuracy, "value_loss": 1.0, "tokens": 80}}, **extra}


def curve(gains, accuracies, every=500):
    return [result(every * (i + 1), g, a) for i, (g, a) in enumerate(zip(gains, accuracies))]


def test_appearance_is_interpolated_between_the_checkpoints_around_the_crossing():
    c = curve([0.0, 0.5, 1.5, 4.0], [0, 0, 0.25, 0.75])
    assert appearance_step(c, "induction", 32, 1.0) == 1250.0  # 1000 -> 1500, 0.5 -> 1.5
    assert appearance_step(c, "mqar", 8, 0.5) == 1750.0
    assert appearance_step(c, "mqar", 8, 0.9) is None  # not reached: never the last step
    assert appearance_step(c, "mqar", 16, 0.1) is None  # not scored
    assert appearance_step(curve([2.0, 3.0], [1, 1]), "induction", 32, 1.0) == 500.0  # there from the start


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(0, 6), min_size=1, max_size=12), threshold=st.floats(0.1, 5))
def test_the_appearance_step_lies_between_the_checkpoints_that_bracket_it(values, threshold):
    c = curve(values, [0.0] * len(values))
    step = appearance_step(c, "induction", 32, threshold)
    first = next((i for i, v in enumerate(values) if v >= threshold), None)
    if first is None:
        assert step is None
    else:
        assert 500 * first <= step <= 500 * (first + 1)  # between the bracketing checkpoints
        if first == 0:
            assert step == 500


def write(tmp_path, name, results):
    (tmp_path / name).mkdir(parents=True)
    (tmp_path / name / "recall.json").write_text(json.dumps(results))


def test_the_report_pairs_seeds_and_writes_tables_and_plots(tmp_path, capsys):
    for seed, (moe, engram) in {1: (0.5, 0.0), 2: (1.5, 0.5), 3: (1.5, 1.5)}.items():
        write(tmp_path, f"s{seed}-moe-curve", curve([0.0, moe, 5.0], [0, 0, 1.0]))
        write(tmp_path, f"s{seed}-engram-curve", curve([0.0, engram, 5.0], [0, 0, 0.3]))
        for model in ("moe", "engram"):
            end = result(1500, 5.0, 0.9, mqar_gap={"0": {"accuracy": 0.9, "tokens": 80},
                                                   "100": {"accuracy": 0.1, "tokens": 260}})
            write(tmp_path, f"s{seed}-{model}-final", [end])
            write(tmp_path, f"s{seed}-{model}-yarn4", [{**end, "context": 1024}])
    write(tmp_path, "not-a-run", [])  # ignored
    summary = summarise(read_results(tmp_path))
    assert summary["models"] == ["moe", "engram"] and summary["seeds"] == [1, 2, 3]
    assert summary["appearance"]["moe"]["1"] == {"induction": pytest.approx(1000 + 500 * 0.5 / 4.5),
                                                 "mqar": 1250.0, "last_step": 1500}
    assert summary["appearance"]["engram"]["1"]["mqar"] is None  # 30% never reaches 50%
    paired = summary["appearance_paired"]
    assert paired["induction"]["difference"]["n"] == 3 and paired["mqar"]["both_formed"] == 0
    assert paired["induction"]["difference"]["mean"] > 0  # engram forms later in every seed here
    assert summary["end"]["yarn4"]["engram"]["2"]["mqar_by_gap"] == {0: 0.9, 100: 0.1}
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "out" / "recall.md").read_text() == printed
    assert "| 1 | 1,056 | 1,250 |" in printed and "after YaRN extension to 4x" in printed
    assert (tmp_path / "out" / "recall_curves.png").stat().st_size > 0
    assert (tmp_path / "out" / "recall_final.png").stat().st_size > 0


def test_a_directory_without_results_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "holds no s<seed>-<model>-<stage>/recall.json" in capsys.readouterr().err
