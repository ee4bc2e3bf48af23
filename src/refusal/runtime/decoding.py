"""Greedy decoding: our own loop over the base decoder, with an exact, cheap vocabulary head.

``transformers``' ``generate`` spends a CPU decoding step on more than the weights' arithmetic: the
float32 vocabulary head over every row (a third of a step on qwen05: 152k × 896 weights), copies of
``[batch, vocab]`` logits, and, on its first step, a head over a non-contiguous ``[batch, 1, d]``
view that matmul turns into a batched product with the head broadcast per row (1.3 s at 64 rows in
float32; a 35 GB allocation in bfloat16). It also keeps decoding rows that have finished.

This loop runs the decoder (the blocks, hooks and all) and then:

- the first step's head in float32, whole: its logits are the first-token refusal score;
- every later step's argmax by :class:`GreedyHead`: a bfloat16 product over the vocabulary screens
  the candidates whose float32 logit could be the largest (a rigorous rounding bound), and only
  those are computed in float32. The token is the float32 argmax, at a quarter of the cost;
- rows that have emitted an end-of-turn token leave the batch (their cache rows dropped) once a
  quarter of the batch has finished, so refusals stop costing steps;
- the key/value cache reserves room for the new tokens (:mod:`refusal.runtime.kv_cache`) instead of
  copying itself every step;
- attention never takes PyTorch's cuDNN backend (:func:`refusal.runtime.generation.generate` runs with
  :data:`DECODING_ATTENTION`): it builds a graph for every new key length, so each
  decoding step paid ~10 ms of host time for a ~10 µs kernel (an H200 decoded a bfloat16 model 15x
  slower than float32, bench/profile_generation.py); flash, memory-efficient and plain attention remain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.nn.attention import SDPBackend

from refusal.models.architecture import decoder_of
from refusal.models.bundle import ModelBundle
from refusal.models.numerics import bf16_is_fast
from refusal.runtime.kv_cache import reserve

# bfloat16's unit roundoff (8 significant bits, round to nearest).
_U = 2.0**-8
# Candidates the screen hands to float32 per row (a row whose candidates may not fit is computed whole).
SCREEN_TOP = 16
# Drop finished rows once this share of the running batch has finished (a cache copy costs about a step).
DROP_SHARE = 0.25
# Attention backends a decoding step may use: all but cuDNN, whose per-shape graph costs more than the step.
DECODING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class GreedyHead:
    """The float32 vocabulary head, with a bfloat16 copy that screens argmax candidates.

    For a hidden state h and head row w_j the screened logit is within E = (3u + u² + d·2⁻²³(1+u)²)·
    ‖h‖·max_j‖w_j‖ of the float32 one (:meth:`error_bound`). The row's top :data:`SCREEN_TOP` screened
    tokens are recomputed in float32; every other token's float32 logit is at most the SCREEN_TOP-th
    screened logit + E, so when that is below the best recomputed one, the best is the float32 argmax.
    Otherwise (near ties, rare) the row's logits are computed whole in float32.
    """

    weight: Float[Tensor, "vocab d"]
    bias: Float[Tensor, " vocab"] | None
    screen: Float[Tensor, "vocab d"] | None  # bfloat16; None: plain float32 head
    max_row_norm: float
    softcap: float | None
    version: tuple[int, int]
    rows: int = 0  # rows screened, and those the screen could not settle (computed whole)
    rows_whole: int = 0

    @classmethod
    def of(cls, bundle: ModelBundle) -> GreedyHead:
        """The head of ``bundle``, its bfloat16 copy made once and remade when the weights change in place."""
        lm_head = bundle.layout.lm_head
        weight = lm_head.weight
        version = (weight.data_ptr(), weight._version)
        held = bundle.memo.get("greedy_head")
        if held is not None and held.version == version:
            return held
        bundle.memo.pop("greedy_head", None)
        w = weight.detach()
        use_screen = w.device.type == "cpu" and w.dtype == torch.float32 and bf16_is_fast(w.device)
        head = cls(
            weight=w,
            bias=None if getattr(lm_head, "bias", None) is None else lm_head.bias.detach().float(),
            screen=w.to(torch.bfloat16) if use_screen else None,
            max_row_norm=float(w.float().norm(dim=-1).max()) if use_screen else 0.0,
            softcap=getattr(bundle.model.config, "final_logit_softcapping", None),
            version=version,
        )
        bundle.memo["greedy_head"] = head
        return head

    def logits(self, hidden: Float[Tensor, "batch d"]) -> Float[Tensor, "batch vocab"]:
        """Float32 logits (with the model's final soft-capping, where it has one)."""
        z = torch.nn.functional.linear(hidden.to(self.weight.device, self.weight.dtype), self.weight, self.bias).float()
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def argmax(self, hidden: Float[Tensor, "batch d"]) -> Int[Tensor, " batch"]:
        """The float32 head's argmax (the lowest index among exact ties), screened in bfloat16.
        Soft-capping is monotone, so it never changes the argmax."""
        if self.screen is None:
            return self.logits(hidden).argmax(-1)
        h = hidden.float()
        approx = torch.nn.functional.linear(h.to(torch.bfloat16), self.screen)
        if self.bias is not None:
            approx = approx.float() + self.bias
        values, cols = approx.topk(SCREEN_TOP, -1, sorted=False)
        exact = torch.einsum("bd,bkd->bk", h, self.weight[cols])
        if self.bias is not None:
            exact = exact + self.bias[cols]
        top = exact.max(-1, keepdim=True).values
        token = torch.where(exact == top, cols, torch.iinfo(cols.dtype).max).min(-1).values
        # Any token outside the row's top SCREEN_TOP has a float32 logit ≤ its screened one + E ≤ the
        # SCREEN_TOP-th screened logit + E; a row where that could reach the best found is computed whole.
        unsure = values.min(-1).values.float() + self.error_bound(h) >= top[:, 0]
        self.rows += len(token)
        if bool(unsure.any()):
            self.rows_whole += int(unsure.sum())
            token[unsure] = self.logits(h[unsure]).argmax(-1)
        return token

    def error_bound(self, h: Float[Tensor, "batch d"]) -> Float[Tensor, " batch"]:
        """A bound on |screened − float32| logits per row: inputs rounded to bfloat16 (2u + u²), float32
        accumulation over d terms, the output rounded (u), each times Σ|h_i w_ji| ≤ ‖h‖·max‖w_j‖."""
        rel = 3 * _U + _U * _U + h.shape[-1] * 2.0**-23 * (1 + _U) ** 2
        return rel * h.norm(dim=-1) * self.max_row_norm


@torch.inference_mode()
def greedy_decode(
    bundle: ModelBundle,
    input_ids: Int[Tensor, "batch width"],
    attention_mask: Int[Tensor, "batch width"],
    position_ids: Int[Tensor, "batch width"],
    max_new_tokens: int,
    eos: set[int],
    *,
    past=None,
    offset: int = 0,
) -> tuple[Int[Tensor, "batch new"], Float[Tensor, "batch vocab"]]:
    """Greedy tokens (``[batch, max_new_tokens]``; after a row's end-of-turn token, padding) and the
    first step's float32 logits of a left-padded batch, continuing ``past`` (a cache of ``offset`` prefix
    tokens per row) when given. Hooks on the model's modules see every forward pass, as in ``generate``."""
    decoder = decoder_of(bundle.model)
    head = GreedyHead.of(bundle)
    device = bundle.device
    n = input_ids.shape[0]
    eos_ids = torch.tensor(sorted(eos) or [-1], device=device)
    out = torch.full((n, max_new_tokens), bundle.pad_token_id, dtype=torch.long, device=device)
    mask = torch.cat([attention_mask.new_ones(n, offset), attention_mask, attention_mask.new_ones(n, max_new_tokens)], 1)
    width = offset + input_ids.shape[1]
    state = decoder(input_ids=input_ids, attention_mask=mask[:, :width], position_ids=position_ids + offset,
                    cache=past, use_cache=True)
    past = reserve(state.cache, max_new_tokens)
    first_logits = head.logits(state.last_hidden_state[:, -1])
    token = first_logits.argmax(-1).to(device)
    position = position_ids[:, -1] + offset
    active = torch.arange(n, device=device)  # the original row of each running row
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        out[active, step] = token
        finished |= torch.isin(token, eos_ids)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if int(finished.sum()) >= DROP_SHARE * len(active):
            keep = (~finished).nonzero(as_tuple=True)[0]
            past.batch_select_indices(keep)
            active, token, position, mask, finished = active[keep], token[keep], position[keep], mask[keep], finished[keep]
        position = position + 1
        hidden = decoder(input_ids=token[:, None], attention_mask=mask[:, : width + step + 1],
                         position_ids=position[:, None], cache=past, use_cache=True).last_hidden_state
        token = head.argmax(hidden[:, -1]).to(device)
    return out, first_logits
