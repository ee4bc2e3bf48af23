"""Generation and teacher-forced scoring: the batched fast paths equal a row-by-row reference."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import random_unit

from refusal.evaluation import teacher_forced_scores
from refusal.interventions import DiMDirection, Fitted, get_intervention
from refusal.metrics.kl import _kl_rows
from refusal.runtime.activations import extract_activations
from refusal.runtime.generation import GenerationCache, generate
from refusal.runtime.prefix import MIN_SHARED, shared_prefix
from refusal.runtime.roles import declare_roles


class BlockCalls:
    """Counts calls of the first block, and the rows and token positions they carried."""

    def __init__(self, bundle):
        self.calls, self.rows, self.tokens = 0, 0, 0
        self.handle = bundle.layout.blocks[0].register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1
        self.rows += args[0].shape[0]
        self.tokens += args[0].shape[0] * args[0].shape[1]

    def __enter__(self) -> BlockCalls:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def actadd(bundle, coeff: float = -4.0, positions: str | None = None):
    fitted = Fitted(dim=DiMDirection(3.0 * random_unit(bundle.d_model, 1), layer=1, position=-1))
    return get_intervention("actadd")({"name": "actadd", "coeff": coeff, "positions": positions}, fitted)


def rows_of(bundle, prompts):
    ids = bundle.tokenize_instructions(prompts)
    completions = [[11, 12, 13, 14, 15], [], [21, 22], [31, 32, 33]]  # one empty: the model stopped at once
    return ids, completions


@torch.inference_mode()
def reference_scores(bundle, prompts, completions, intervention):
    """Row by row, no padding, full logits: the definition of perplexity and both KLs."""
    nll, tokens, kl_last, kl_tokens, per_nll = 0.0, 0, [], [], []
    for p, c in zip(prompts, completions, strict=True):
        ids = torch.tensor([p + c])
        base = bundle.model(input_ids=ids).logits[0].float()
        steered = base
        if intervention is not None:
            with declare_roles(bundle, [len(p + c)], len(p + c), [len(p)]), intervention.apply(bundle):
                steered = bundle.model(input_ids=ids).logits[0].float()
        span = slice(len(p) - 1, len(p) + len(c) - 1)  # logits that predict the completion's tokens
        per_nll.append(float(torch.nn.functional.cross_entropy(steered[span], torch.tensor(c), reduction="sum")) if c else 0.0)
        if c:
            nll += per_nll[-1]
            tokens += len(c)
            kl_tokens.append(_kl_rows(base[span], steered[span]))
        kl_last.append(float(_kl_rows(base[len(p) - 1][None], steered[len(p) - 1][None])))
    return {"perplexity": float(torch.exp(torch.tensor(nll / tokens))), "kl_div": sum(kl_last) / len(kl_last),
            "kl_div_completion": float(torch.cat(kl_tokens).mean()),
            "per_prompt": {"nll": per_nll, "tokens": [len(c) for c in completions], "kl_div": kl_last}}


def test_teacher_forced_scores_equal_the_row_by_row_definition(tiny_with_system, prompts):
    tiny_bundle = tiny_with_system  # prompts that share a chat-template prefix: the fast path runs
    ids, completions = rows_of(tiny_bundle, prompts)
    for intervention in (None, actadd(tiny_bundle)):
        got = teacher_forced_scores(tiny_bundle, ids, completions, intervention, batch_size=3)
        want = reference_scores(tiny_bundle, ids, completions, intervention)
        for key, value in want.pop("per_prompt").items():  # prompt by prompt, in prompt order: what paired comparisons use
            torch.testing.assert_close(torch.tensor(got["per_prompt"][key], dtype=torch.float64),
                                       torch.tensor(value, dtype=torch.float64), rtol=1e-4, atol=1e-4)
        for key, value in want.items():
            assert abs(got[key] - value) <= 1e-4 * max(1.0, abs(value)), (key, got[key], value)
    assert got["kl_div"] > 1e-3  # the intervention really changed the distribution being compared


def test_unsteered_logits_are_computed_once_per_model_and_rows(tiny_bundle, prompts):
    ids, completions = rows_of(tiny_bundle, prompts)
    tiny_bundle.memo.clear()
    with BlockCalls(tiny_bundle) as first:
        teacher_forced_scores(tiny_bundle, ids, completions, None, batch_size=2)
    with BlockCalls(tiny_bundle) as steered:
        teacher_forced_scores(tiny_bundle, ids, completions, actadd(tiny_bundle), batch_size=2)
    assert first.calls == 2 and steered.calls == 2  # two batches each: the second job ran no unsteered pass
    with BlockCalls(tiny_bundle) as other_rows:
        teacher_forced_scores(tiny_bundle, ids[:3], completions[:3], actadd(tiny_bundle), batch_size=2)
    assert other_rows.calls == 4  # other rows: unsteered again, and the memo holds only these rows now
    assert [k for k in tiny_bundle.memo if k.startswith("unsteered_logits")] == ["unsteered_logits"]  # one entry


def test_unsteered_logits_too_big_to_hold_are_recomputed_with_the_same_scores(tiny_bundle, prompts, monkeypatch):
    import refusal.evaluation.scoring as evaluation

    ids, completions = rows_of(tiny_bundle, prompts)
    tiny_bundle.memo.clear()
    held = teacher_forced_scores(tiny_bundle, ids, completions, actadd(tiny_bundle), batch_size=2)
    monkeypatch.setattr(evaluation, "HELD_LOGITS_BYTES", 0)
    with BlockCalls(tiny_bundle) as calls:
        recomputed = teacher_forced_scores(tiny_bundle, ids, completions, actadd(tiny_bundle), batch_size=2)
    assert calls.calls == 4 and "unsteered_logits" not in tiny_bundle.memo  # unsteered again, nothing kept
    for key in ("perplexity", "kl_div", "kl_div_completion"):
        assert recomputed[key] == pytest.approx(held[key], rel=1e-6)
    for key, values in held["per_prompt"].items():
        assert recomputed["per_prompt"][key] == pytest.approx(values, rel=1e-6)


@torch.inference_mode()
def test_first_logits_are_the_prompts_next_token_logits(tiny_bundle, prompts):
    ids = tiny_bundle.tokenize_instructions(prompts)
    gens = generate(tiny_bundle, ids, max_new_tokens=3, batch_size=3, progress=False)
    for i, row in enumerate(ids):
        alone = tiny_bundle.model(input_ids=torch.tensor([row])).logits[0, -1].float()
        torch.testing.assert_close(gens.first_logits[i], alone, atol=1e-4, rtol=1e-4)
        first = gens.completion_ids[i][0] if gens.completion_ids[i] else None
        if first is not None:
            assert first == int(alone.argmax())  # greedy: the first token is the argmax of those logits


def test_sets_generated_together_equal_sets_generated_alone_and_are_cached_each(tiny_bundle, prompts, tmp_path):
    ids = tiny_bundle.tokenize_instructions(prompts)
    sets = {"a": ids[:3], "b": ids[3:]}
    cache = GenerationCache(tmp_path / "gens")
    with BlockCalls(tiny_bundle) as together:
        both = cache.get_many(tiny_bundle, sets, 4, batch_size=8, progress=False)
    assert together.calls <= 4  # one batch of all four rows: a prefill and at most three decoding steps
    for name, rows in sets.items():
        alone = generate(tiny_bundle, rows, max_new_tokens=4, batch_size=8, progress=False)
        assert both[name].completion_ids == alone.completion_ids
        torch.testing.assert_close(both[name].first_logits, alone.first_logits, atol=1e-4, rtol=1e-4)
    with BlockCalls(tiny_bundle) as hit:
        again = GenerationCache(tmp_path / "gens").get(tiny_bundle, sets["b"], 4, batch_size=8, progress=False)
    assert hit.calls == 0 and again.completions == both["b"].completions


@pytest.mark.parametrize("same_rows", [False, True])  # equal rows share all of themselves: the prefix must stop short
@pytest.mark.parametrize("positions", [None, "prompt", "post_instruction"])
def test_extraction_through_the_shared_prefix_equals_the_plain_pass(tiny_with_system, prompts, positions, same_rows):
    tiny_bundle = tiny_with_system
    ids = tiny_bundle.tokenize_instructions(prompts[:1] * 2 if same_rows else prompts)
    n_pos = len(tiny_bundle.post_instruction_ids)
    assert len(shared_prefix(ids, n_pos)) >= MIN_SHARED  # the chat template's opening is shared: the fast path runs
    steer = actadd(tiny_bundle, coeff=-8.0, positions=positions) if positions else None
    with steer.apply(tiny_bundle) if steer else contextlib.nullcontext(), BlockCalls(tiny_bundle) as calls:
        fast = extract_activations(tiny_bundle, ids, n_pos, batch_size=3, progress=False)
    with steer.apply(tiny_bundle) if steer else contextlib.nullcontext(), BlockCalls(tiny_bundle) as plain_calls:
        plain = extract_activations(tiny_bundle, ids, n_pos, batch_size=3, progress=False, share_prefix=False)
    assert calls.tokens < plain_calls.tokens  # the prefix ran once per batch, not once per row
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)
    if steer:
        unsteered = extract_activations(tiny_bundle, ids, n_pos, batch_size=3, progress=False)
        assert (fast[:, 2:] - unsteered[:, 2:]).abs().max() > 1e-2  # the steering reached the captured residuals


@pytest.mark.parametrize("same_rows", [False, True])
@pytest.mark.parametrize("positions", [None, "post_instruction"])
def test_generation_through_the_shared_prefix_equals_the_plain_generation(tiny_with_system, prompts, positions, same_rows):
    ids = tiny_with_system.tokenize_instructions(prompts[:1] * 2 if same_rows else prompts)
    steer = actadd(tiny_with_system, coeff=-8.0, positions=positions) if positions else None
    with steer.apply(tiny_with_system) if steer else contextlib.nullcontext(), BlockCalls(tiny_with_system) as calls:
        fast = generate(tiny_with_system, ids, max_new_tokens=6, batch_size=3, progress=False)
    with steer.apply(tiny_with_system) if steer else contextlib.nullcontext(), BlockCalls(tiny_with_system) as plain_calls:
        plain = generate(tiny_with_system, ids, max_new_tokens=6, batch_size=3, progress=False, share_prefix=False)
    assert calls.tokens < plain_calls.tokens  # the prefix ran once per batch, not once per row
    assert fast.completion_ids == plain.completion_ids
    torch.testing.assert_close(fast.first_logits, plain.first_logits, atol=1e-4, rtol=1e-4)
    if steer:
        unsteered = generate(tiny_with_system, ids, max_new_tokens=6, batch_size=3, progress=False)
        assert (fast.first_logits - unsteered.first_logits).abs().max() > 1e-2  # the steering acted


def test_scoring_batches_shrink_to_keep_their_logits_bounded_with_the_same_scores(tiny_bundle, prompts, monkeypatch):
    import refusal.evaluation.scoring as evaluation

    ids, completions = rows_of(tiny_bundle, prompts)
    tiny_bundle.memo.clear()
    whole = teacher_forced_scores(tiny_bundle, ids, completions, actadd(tiny_bundle), batch_size=4)
    per_row = 4 * tiny_bundle.model.config.vocab_size * (max(map(len, completions)) + 1)
    monkeypatch.setattr(evaluation, "SCORING_LOGITS_BYTES", per_row)  # one row's logits per batch
    tiny_bundle.memo.clear()
    with BlockCalls(tiny_bundle) as calls:
        split = teacher_forced_scores(tiny_bundle, ids, completions, actadd(tiny_bundle), batch_size=4)
    assert calls.calls == 2 * len(ids) and calls.rows == 2 * len(ids)  # unsteered + steered, one row each
    for key in ("perplexity", "kl_div", "kl_div_completion"):
        assert split[key] == pytest.approx(whole[key], rel=1e-5)
