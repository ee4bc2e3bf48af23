"""The quality judge checked against human labels: the AUC against a hand-computed case, and the command end to end
on the tiny judge (whose scores mean nothing; the plumbing and the row selection are what is tested)."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from refusal.__main__ import main
from refusal.errors import DataError
from refusal.judges.quality_check import auc
from refusal.judges.substring import SubstringJudge

FIXTURE = REPO / "tests" / "fixtures" / "judge_labels_example.jsonl"


def test_auc_is_the_hand_computed_mann_whitney_with_hanley_mcneil_interval():
    # positives {0.9, 0.3}, negatives {0.8, 0.3}: 0.9 beats both, 0.3 loses to 0.8 and ties 0.3 -> 2.5 / 4
    out = auc([0.9, 0.8, 0.3, 0.3], [True, False, True, False])
    assert out["value"] == 0.625 and (out["positive"], out["negative"]) == (2, 2)
    # Hanley & McNeil: q1 = A/(2-A), q2 = 2A²/(1+A); var = (A(1-A) + (n+ - 1)(q1 - A²) + (n- - 1)(q2 - A²)) / (n+ n-)
    q1, q2 = 0.625 / 1.375, 2 * 0.625**2 / 1.625
    var = (0.625 * 0.375 + (q1 - 0.625**2) + (q2 - 0.625**2)) / 4
    assert out["low"] == pytest.approx(0.625 - 1.96 * var**0.5) and out["high"] == 1.0  # clipped
    assert auc([3, 2, 1], [True, True, False])["value"] == 1.0 and auc([1, 2], [True, False])["value"] == 0.0
    with pytest.raises(DataError, match="rows of both kinds"):
        auc([0.1, 0.2], [True, True])


def test_validate_quality_leaves_harmless_prompts_out_and_reports_both_aucs(tmp_path, capsys):
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line]
    for i, row in enumerate(rows):
        row["column"] = "harmful" if i % 3 else "overrefusal"  # a harmless test set of the default config
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_json = tmp_path / "quality.json"
    args = ["judges", "--validate", str(labelled), "--quality", "--json", str(out_json), "eval.quality_judge.model=tiny",
            f"cache_dir={tmp_path / 'cache'}"]
    assert main(args) == 0
    out = json.loads(out_json.read_text())
    kept = [r for r in rows if r["column"] == "harmful"]
    assert out["n"] == len(kept) == 12 and "overrefusal" in out["left_out_columns"]
    refusals = sum(r["label"] != "compliance" for r in kept)
    assert (out["refused_auc"]["positive"], out["refused_auc"]["negative"]) == (refusals, len(kept) - refusals)
    real = sum(r["label"] == "compliance" and r["answers_prompt"] for r in kept)
    assert out["quality_auc"]["positive"] == real == out["means"]["compliance answering the prompt"]["n"]
    assert 0 <= out["refused_auc"]["value"] <= 1 and "AUC" in capsys.readouterr().out
    # item 1 is the primary refusal judge's label (substring, the default), the score zero wherever it says refusal
    said = [j.label == "refusal" for j in SubstringJudge({}, tmp_path).judge([r["prompt"] for r in kept],
                                                                            [r["completion"] for r in kept])]
    assert out["judge"]["refused_by"] == "substring" and [r["refused"] for r in out["rows"]] == [float(x) for x in said]
    assert out["refused_auc"] == auc([float(x) for x in said], [r["label"] != "compliance" for r in kept])
    assert all(r["quality"] == 0 for r, x in zip(out["rows"], said, strict=True) if x)
    assert 0 <= out["rubric_refused_auc"]["value"] <= 1
    rubric = tmp_path / "rubric.json"
    assert main([*args[:4], "--json", str(rubric), *args[6:], "eval.quality_judge.refused=rubric"]) == 0
    by_rubric = json.loads(rubric.read_text())
    assert by_rubric["refused_auc"] == by_rubric["rubric_refused_auc"] == out["rubric_refused_auc"]
    assert [r["refused"] for r in by_rubric["rows"]] == [r["rubric_p_refused"] for r in out["rows"]]
    dev = tmp_path / "dev.json"
    assert main([*args[:4], "--split", "dev", "--json", str(dev), *args[6:]]) == 0
    assert json.loads(dev.read_text())["n"] == sum(r["split"] == "dev" for r in kept) < len(kept)
    assert main(["judges", "--validate", str(labelled), "--quality", "--calibrate"]) == 2  # one clear error, no run
