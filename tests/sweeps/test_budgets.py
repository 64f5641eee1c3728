"""Named budgets and budget files (engram.sweeps.budgets)."""

import json

import pytest

from engram.sweeps.budgets import budget_from_dict, budget_to_dict, get_budget


def test_budget_file_round_trip(budget_file, tmp_path):
    budget = get_budget(budget_file)
    assert budget.name == "unit" and budget.rhos == (1.0, 0.5)
    again = budget_from_dict(budget_to_dict(budget))
    assert again.base_run() == budget.base_run() and again.engram_template() == budget.engram_template()
    tiny = budget_to_dict(get_budget("tiny"))
    assert budget_from_dict(json.loads(json.dumps(tiny))).base_run() == get_budget("tiny").base_run()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "rhos": [1.0]}))
    with pytest.raises(ValueError, match="missing field"):
        get_budget(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        get_budget(str(bad))
    with pytest.raises(FileNotFoundError):
        get_budget(str(tmp_path / "absent.json"))
    with pytest.raises(ValueError, match="known budgets"):
        get_budget("enormous")
