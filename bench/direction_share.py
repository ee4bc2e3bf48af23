"""How much of the residual stream lies along a fitted DiM direction, layer by layer: why ablating it everywhere can
break a model that has no refusal to remove.

    python bench/direction_share.py --model gemma3_270m       # the study's fit (study/artifacts/<model>/…/dim_auto-*)
    python bench/direction_share.py --model qwen05 --n 32

Directional ablation removes ``(h·r̂) r̂`` from every residual write at every layer and position. Where r̂, fitted at
one layer, lines up with what later layers build (the attention sink's massive activations on the first token,
or a large shared component of every token), ablating it removes a large share of the residual everywhere, whatever
r̂ meant at its own layer. The table gives |cos(h, r̂)| on the first token and the median over the others, on
unsteered harmless prompts, beside the residual norms; a direction with nothing special about it has
|cos| ≈ sqrt(2/(π·d)) (``random``).

Then the test by intervention: harmless perplexity (teacher-forced on the unsteered model's own 48-token
completions) under DiM ablation at every layer and write, the same with the first token spared, at the DiM layer
only, and at block inputs before and from the first layer where the other tokens' |cos| exceeds 3× random.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from _common import REPO

from refusal import api
from refusal.artifacts import load_artifact
from refusal.fitting.results import DiMDirection, Fitted
from refusal.runtime.hooks import hooked


def study_direction(model: str) -> Path:
    stems = sorted((REPO / "study" / "artifacts" / model).glob("*/dim_auto-*.safetensors"))
    if not stems:
        raise SystemExit(f"no DiM fit of {model} under study/artifacts; run: python bench/study.py --models {model} --steps main")
    return stems[-1].with_suffix("")


def _first_and_rest(per_prompt: list[torch.Tensor], layer: int, fmt: str) -> list[str]:
    """The median over prompts of the first token's value at ``layer``, and the median over every other token."""
    first = torch.stack([v[layer, 0] for v in per_prompt]).median()
    rest = torch.cat([v[layer, 1:] for v in per_prompt]).median()
    return [fmt.format(float(first)), fmt.format(float(rest))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3_270m")
    parser.add_argument("--artifact", type=Path, help="a DiM fit's stem (default: the study's)")
    parser.add_argument("--n", type=int, default=16, help="harmless prompts (embedded set)")
    args = parser.parse_args()
    stem = args.artifact or study_direction(args.model)
    tensors, meta = load_artifact(stem, keys=["direction"])
    rhat = tensors["direction"].double() / tensors["direction"].double().norm()
    ctx = api.load(f"model={args.model}", "data=embedded", "logger=none", "intervention=dim_ablation")
    cos, norm = [], []  # per prompt: [layers, seq]
    with torch.inference_mode():
        for ids in ctx.bundle.tokenize_instructions(ctx.texts("harmless_train")[: args.n]):
            states = torch.stack(ctx.bundle.model(torch.tensor([ids]), output_hidden_states=True).hidden_states)[:, 0]
            norm.append(states.double().norm(dim=-1))
            cos.append((states.double() @ rhat).abs() / norm[-1])
    last = len(cos[0]) - 1  # hidden_states' last entry is the final norm's output
    table = [[layer if layer < last else f"{layer} (after the final norm)", *_first_and_rest(cos, layer, "{:.3f}"),
              *_first_and_rest(norm, layer, "{:.0f}")] for layer in range(last + 1)]
    d = rhat.numel()
    print(f"{args.model}: DiM direction of layer {meta.get('layer')} ({stem.name}); {args.n} harmless prompts; "
          f"random |cos| ≈ {math.sqrt(2 / (math.pi * d)):.3f} (d = {d}); row l = input of block l\n")
    header = ["layer", "abs cos, first token", "abs cos, other tokens (median)", "‖h‖ first token", "‖h‖ other tokens (median)"]
    print("\n".join("| " + " | ".join(map(str, row)) + " |" for row in [header, ["---"] * len(header), *table]))
    random = math.sqrt(2 / (math.pi * d))
    rise = next((layer for layer in range(last) if float(torch.cat([c[layer, 1:] for c in cos]).median()) > 3 * random), None)
    print(f"\nHarmless perplexity under DiM ablation, ÷ unsteered ({args.n} prompts, 48 greedy tokens each, teacher-forced):\n")
    for scope, ratio in ablation_perplexity(ctx, DiMDirection.load(stem, {}), args.n, rise).items():
        print(f"- {scope}: ×{ratio:.3g}")


def ablation_perplexity(ctx: Any, dim: DiMDirection, n: int, rise: int | None) -> dict[str, float]:
    """Perplexity ratio of DiM ablation in several scopes: is the damage the first token's, or the later layers'?"""
    bundle = ctx.bundle
    texts = ctx.texts("harmless_train")[:n]
    prompts = bundle.tokenize_instructions(texts)
    completions = [bundle.tokenizer(c, add_special_tokens=False)["input_ids"] for c in api.generate(bundle, texts, 48)]

    def perplexity(specs: list) -> float:
        nll, count = 0.0, 0
        with torch.inference_mode(), hooked(specs):
            for prompt, completion in ((p, c) for p, c in zip(prompts, completions, strict=True) if c):
                logits = bundle.model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].float()
                nll -= float(torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None]).sum())
                count += len(completion)
        return math.exp(nll / count)

    def spare_first(fn: Any) -> Any:  # one unpadded row per pass: position 0 is the first token
        return lambda x: torch.cat([x[:, :1], fn(x)[:, 1:]], dim=1)

    def specs(layers: Any, spare: bool = False) -> list:
        found = api.build_intervention(ctx, Fitted(dim=dim), layers=layers).hook_specs(bundle)
        return [dataclasses.replace(s, fn=spare_first(s.fn)) for s in found] if spare else found

    base = perplexity([])
    scopes = {"every layer and write": specs("all"), "every layer and write, first token spared": specs("all", True),
              f"the DiM layer ({dim.layer}) only": specs("selected")}
    if rise:
        scopes[f"block inputs of layers 0–{rise - 1} (before the rise)"] = specs(list(range(rise)))
        scopes[f"block inputs of layers {rise}–{bundle.n_layers - 1} (from the rise on)"] = specs(list(range(rise, bundle.n_layers)))
    return {scope: perplexity(found) / base for scope, found in scopes.items()}


if __name__ == "__main__":
    main()
