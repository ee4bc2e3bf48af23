"""Judge accuracy against human labels: the metrics by hand, the labelled-file format, the CLI."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torchmetrics.classification import BinaryCohenKappa

from refusal.__main__ import main
from refusal.errors import DataError
from refusal.judges.accuracy import judge_accuracy, kappa_with_se
from refusal.judges.labelled import parse_labelled, read_labelled

FIXTURE = Path(__file__).parent / "fixtures" / "judge_labels_example.jsonl"


def _labels(tp: int, fn: int, fp: int, tn: int, *, partial: int = 0, unclear: int = 0):
    """Gold and judge labels with these binary counts; ``partial`` of the tp gold rows are partial refusals,
    ``unclear`` of the tn judge labels are unclear."""
    gold = ["partial_refusal"] * partial + ["refusal"] * (tp - partial) + ["refusal"] * fn + ["compliance"] * (fp + tn)
    said = ["refusal"] * tp + ["compliance"] * fn + ["refusal"] * fp + ["unclear"] * unclear + ["compliance"] * (tn - unclear)
    return gold, said


def test_kappa_and_its_standard_error_by_hand():
    # gold refusal 10 (judge: 6 refusal, 4 compliance), gold compliance 8 (judge: 0, 8); n = 18
    kappa, se = kappa_with_se([[6, 4], [0, 8]])
    # p_o = 14/18, p_e = (10*6 + 8*12)/18² = 13/27, kappa = (7/9 - 13/27)/(14/27) = 4/7
    assert kappa == pytest.approx(4 / 7, abs=1e-12)
    # Fleiss-Cohen-Everitt: A = 1/3 (1 - 8/9·3/7)² + 4/9 (1 - 10/9·3/7)² = 991/3969;
    # B = (3/7)² · 2/9 · (1/3 + 4/9)² = 2/81; C = (4/7 - 13/27·3/7)² = 529/3969
    var = (Fraction(991, 3969) + Fraction(2, 81) - Fraction(529, 3969)) / (18 * Fraction(14, 27) ** 2)
    assert se == pytest.approx(math.sqrt(var), abs=1e-12) and se == pytest.approx(0.17075, abs=1e-5)
    assert kappa_with_se([[5, 0], [0, 5]]) == (1.0, 0.0)
    assert all(math.isnan(x) for x in kappa_with_se([[7, 0], [0, 0]]))  # one label only: undefined
    assert all(math.isnan(x) for x in kappa_with_se([[0, 0], [0, 0]]))


def test_kappa_matches_torchmetrics_and_its_se_a_bootstrap():
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(400, generator=g) < 0.45
    said = torch.where(torch.rand(400, generator=g) < 0.8, truth, ~truth)
    table = [[int((truth & said).sum()), int((truth & ~said).sum())],
             [int((~truth & said).sum()), int((~truth & ~said).sum())]]
    kappa, se = kappa_with_se(table)
    assert kappa == pytest.approx(float(BinaryCohenKappa()(said.long(), truth.long())), abs=1e-6)
    idx = torch.randint(0, 400, (4000, 400), generator=g)  # paired bootstrap over rows
    t, s = truth[idx], said[idx]
    tp, fn = (t & s).sum(1).double(), (t & ~s).sum(1).double()
    fp, tn = (~t & s).sum(1).double(), (~t & ~s).sum(1).double()
    p_o = (tp + tn) / 400
    p_e = ((tp + fn) * (tp + fp) + (fp + tn) * (fn + tn)) / 400**2
    assert ((p_o - p_e) / (1 - p_e)).std().item() == pytest.approx(se, rel=0.08)


def test_binary_metrics_and_confusion_by_hand():
    gold, said = _labels(tp=6, fn=4, fp=1, tn=7, partial=2, unclear=2)
    out = judge_accuracy(gold, said)
    assert out["binary"] == {"tp": 6, "fp": 1, "fn": 4, "tn": 7} and out["unclear"] == 2 and out["n"] == 18
    assert (out["accuracy"]["hits"], out["accuracy"]["n"]) == (13, 18)
    assert (out["precision"]["hits"], out["precision"]["n"]) == (6, 7)
    assert (out["recall"]["hits"], out["recall"]["n"]) == (6, 10)
    assert out["accuracy"]["value"] == pytest.approx(13 / 18)
    # Wilson 95% for 6/10: centre (0.6 + z²/20)/(1 + z²/10), half-width z/(1 + z²/10)·sqrt(0.024 + z²/400)
    z = 1.96  # the project's 95% z (wilson_interval)
    centre, half = (0.6 + z * z / 20) / (1 + z * z / 10), z / (1 + z * z / 10) * math.sqrt(0.6 * 0.4 / 10 + z * z / 400)
    assert (out["recall"]["low"], out["recall"]["high"]) == pytest.approx((centre - half, centre + half), abs=1e-9)
    # rows: gold refusal / partial_refusal / compliance; columns: judge refusal / compliance / unclear
    assert out["confusion"]["counts"] == [[4, 4, 0], [2, 0, 0], [1, 5, 2]]
    k = out["kappa"]
    assert k["value"] == pytest.approx(kappa_with_se([[6, 4], [1, 7]])[0])
    assert k["low"] == pytest.approx(k["value"] - z * k["se"]) and k["high"] == pytest.approx(min(1.0, k["value"] + z * k["se"]))
    none_said = judge_accuracy(["refusal", "compliance"], ["compliance", "compliance"])
    assert math.isnan(none_said["precision"]["value"]) and none_said["precision"]["n"] == 0


def test_labelled_file_formats_and_their_errors(tmp_path):
    rows = parse_labelled('prompt,completion,label,answers_prompt,split\np,"I can\'t, sorry",refusal,no,dev\n'
                          'q,"Sure: 1, 2",compliance,,test\n', "csv", "f.csv")
    assert [(r.line, r.label, r.answers_prompt, r.split) for r in rows] == [(2, "refusal", False, "dev"),
                                                                          (3, "compliance", None, "test")]
    ok = '{"prompt": "p", "completion": "", "label": "compliance"}\n'
    cases = [
        (ok + '{"prompt": "p", "completion": "c", "label": "refused"}\n', "jsonl",
         "line 2: label='refused' is not one of refusal, partial_refusal, compliance; relabel the row"),
        (ok + '{"prompt": "p", "label": "refusal"}\n', "jsonl", "line 2 lacks completion"),
        ("\n\n", "jsonl", "has no labelled rows; add rows with prompt, completion, label"),
        ("prompt,completion,label\n", "csv", "has no labelled rows"),
        ("prompt,completion\np,c\n", "csv", "header has no column 'label'"),
        (ok + '{"prompt": "p", "completion": "c", "label": "refusal", "split": "train"}\n', "jsonl",
         "line 2: split='train'; use dev or test"),
        (ok + '{"prompt": "p", "completion": "c", "label": "refusal", "answers_prompt": "maybe"}\n', "jsonl",
         "line 2: answers_prompt='maybe'; write true or false"),
        (ok + '["p", "c", "refusal"]\n', "jsonl", "line 2 is a list, expected an object"),
    ]
    for text, fmt, message in cases:
        with pytest.raises(DataError, match=message.replace("(", r"\(")):
            parse_labelled(text, fmt, "f")
    bad = tmp_path / "labels.txt"
    bad.write_text(ok)
    with pytest.raises(DataError, match="must be .jsonl or .csv"):
        read_labelled(bad)


def test_the_fixture_is_what_its_readme_says():
    rows = read_labelled(FIXTURE)
    assert len(rows) == 18 <= 20 and {r.label for r in rows} == {"refusal", "partial_refusal", "compliance"}
    assert "not evidence" in (FIXTURE.parent / "README.md").read_text()


def test_validate_cli_scores_the_cheap_judges_on_the_fixture(tmp_path, capsys):
    out_json = tmp_path / "v.json"
    assert main(["judges", "--validate", str(FIXTURE), "--json", str(out_json), f"cache_dir={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    assert "judge substring" in printed and "judge heretic" in printed and "judge model" not in printed
    out = json.loads(out_json.read_text())
    assert set(out["judges"]) == {"substring", "heretic"} and out["gold"] == {"refusal": 7, "partial_refusal": 3,
                                                                             "compliance": 8}
    # by reading the marker lists: Arditi's phrases miss the four refusals without them (lines 4, 12, 16, 17);
    # heretic's catch "I won't" (line 12) and flag the compliance that says "illegal" (line 9)
    assert out["judges"]["substring"]["binary"] == {"tp": 6, "fn": 4, "fp": 0, "tn": 8}
    assert out["judges"]["heretic"]["binary"] == {"tp": 7, "fn": 3, "fp": 1, "tn": 7}
    assert out["judges"]["substring"]["kappa"]["value"] == pytest.approx(4 / 7)
    assert "kappa      0.571  [0.237, 0.906]" in printed
    assert main(["judges", "--validate", str(FIXTURE), "--split", "test", "--judges", "substring",
                 "--json", str(out_json), f"cache_dir={tmp_path}"]) == 0
    test_only = json.loads(out_json.read_text())
    assert test_only["n"] == 10 and list(test_only["judges"]) == ["substring"]


def test_a_model_judge_runs_when_named(tmp_path, capsys):
    """The tiny random model as the model judge: its argmax is rarely Yes or No, so most rows are unclear,
    which the binary metrics count as not refusal and the confusion matrix shows in its own column."""
    out_json = tmp_path / "v.json"
    tiny = "{name: tiny, source: tiny, tiny: {n_layers: 2, seed: 9}}"
    assert main(["judges", "--validate", str(FIXTURE), "--judges", "model", "--json", str(out_json),
                 f"judge.model.model={tiny}", f"cache_dir={tmp_path}"]) == 0
    result = json.loads(out_json.read_text())["judges"]["model"]
    counts = result["confusion"]["counts"]
    assert sum(map(sum, counts)) == 18 and sum(row[2] for row in counts) == result["unclear"]
    b = result["binary"]
    assert b["tp"] + b["fp"] == sum(row[0] for row in counts) and b["tp"] + b["fn"] == 10
    assert list((tmp_path / "judgements").glob("tiny-*.json"))  # verdicts cached like in a run


def test_validate_cli_bad_input_is_one_line_with_the_fix(tmp_path, capsys):
    bad = tmp_path / "labels.jsonl"
    bad.write_text('{"prompt": "p", "completion": "c", "label": "Refusal"}\n')
    assert main(["judges", "--validate", str(bad)]) == 2
    assert "line 1: label='Refusal' is not one of refusal, partial_refusal, compliance" in capsys.readouterr().err
    assert main(["judges", "--validate", str(FIXTURE), "--judges", "nope", f"cache_dir={tmp_path}"]) == 2
    assert "unknown judge 'nope'" in capsys.readouterr().err
    assert main(["judges", "--validate", str(FIXTURE), "--split", "dev", "--judges", "substring",
                 "no_such_group=1", f"cache_dir={tmp_path}"]) == 2
    assert "check the overrides" in capsys.readouterr().err


def test_benchmarks_cli_lists_and_names_unknown_ones(tmp_path, capsys):
    assert main(["benchmarks", "--cache-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listing] == ["harmbench", "strongreject", "do_not_answer", "rho_overrefusal"]
    assert all("not cached" in line for line in listing) and "MIT" in listing[0] and "Apache-2.0" in listing[2]
    assert main(["benchmarks", "--fetch", "advbench", "--cache-dir", str(tmp_path)]) == 2
    assert "--fetch='advbench': choose one of harmbench" in capsys.readouterr().err


def test_best_threshold_by_hand():
    from refusal.judges.validate import best_threshold

    # scores 0.5 and 2 are refusals, -1 and 1 are not: no threshold separates them; >= 1.5 gets 3 of 4, as does
    # >= 0 (0.5 and 2 refused, 1 wrongly); among the best the one nearest 0 wins (-0.25 also gets 3 of 4: -1 right)
    threshold, accuracy = best_threshold([-1.0, 0.5, 1.0, 2.0], [False, True, False, True])
    assert accuracy == 0.75 and threshold == pytest.approx(-0.25)
    assert best_threshold([-3.0, -2.0, 4.0], [False, True, True]) == (pytest.approx(-2.5), 1.0)  # separable: 100%
    assert best_threshold([1.0, 1.0], [True, True]) == (0.0, 1.0)  # one value: the candidate below it, nearest 0
    with pytest.raises(DataError, match="no labelled rows to calibrate"):
        best_threshold([], [])


def test_model_judge_threshold_labels_by_log_odds_and_calibrates_on_dev(tmp_path, capsys):
    """The tiny judge's log-odds decide the label once a threshold is set (no unclear); --calibrate picks it on
    the fixture's dev rows and scores the test rows with it."""
    from refusal.judges import build_judges
    from refusal.judges.labelled import read_labelled

    tiny = {"name": "tiny", "source": "tiny", "tiny": {"n_layers": 2, "seed": 9}}
    rows = read_labelled(FIXTURE)
    prompts, completions = [r.prompt for r in rows], [r.completion for r in rows]
    plain = build_judges({"model": {"type": "model", "model": tiny}}, [], tmp_path)["model"].judge(prompts, completions)
    cut = sorted(j.score for j in plain)[9]
    thresholded = build_judges({"model": {"type": "model", "model": tiny, "threshold": cut}}, [], tmp_path)["model"]
    labels = [j.label for j in thresholded.judge(prompts, completions)]
    assert labels == ["refusal" if j.score >= cut else "compliance" for j in plain] and labels.count("refusal") == 9
    out_json = tmp_path / "v.json"
    assert main(["judges", "--validate", str(FIXTURE), "--calibrate", "--judges", "substring,model", "--json",
                 str(out_json), "judge.model.model={name: tiny, source: tiny, tiny: {n_layers: 2, seed: 9}}",
                 f"cache_dir={tmp_path}"]) == 0
    out = json.loads(out_json.read_text())
    assert out["n"] == 10 and out["split"] == "test, thresholds from dev"
    assert out["calibration"]["substring"]["threshold"] == 0.5  # 0/1 scores: the midpoint
    assert out["judges"]["model"]["unclear"] == 0
    assert "threshold" in capsys.readouterr().out
    assert main(["judges", "--validate", str(FIXTURE), "--calibrate", "--split", "dev"]) == 2
    assert "leave --split out" in capsys.readouterr().err
    dev_only = tmp_path / "dev.jsonl"
    dev_only.write_text('{"prompt": "p", "completion": "c", "label": "refusal", "split": "dev"}\n')
    assert main(["judges", "--validate", str(dev_only), "--calibrate"]) == 2
    assert "needs rows of both splits (dev 1, test 0)" in capsys.readouterr().err
    from refusal.errors import ConfigError
    from refusal.judges.model_judge import ModelJudge

    with pytest.raises(ConfigError, match="threshold='high' must be a finite number"):
        ModelJudge.check({"model": tiny, "threshold": "high"})
