"""Generation cost of each intervention's hooks (target: hooked ÷ unhooked greedy generation ≤ 1.03).

Batched greedy generation of the same prompts with every registered intervention active, relative
to no intervention, plus the orthogonalized-weights model (directional ablation baked into the
weights: no hooks, so it is the 1.00 reference for dim_ablation). The hooks' cost does not depend
on the fitted values, so a random DiM direction and a random orthonormal INLP basis (k=8) of the
model's d_model stand in for real fits. End-of-turn tokens do not end a row here, so every run generates
exactly the same number of tokens whatever the steering does to the text. Runs are interleaved
(rotated order per round) and each variant is compared with the unhooked run of the same round: the
reported ratio is the median over rounds of those paired ratios, so load that slows a whole round
cancels (a ratio of two medians does not pair them and reads several percent of noise on 2 cores).
Because single generations still vary by more than the 3% target there, each intervention also gets
an attributed figure: its hooks' own work for one decode step ÷ the unhooked time per step, plus 1.

    python bench/bench_hooks.py --model qwen05
    python bench/bench_hooks.py --smoke
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import warnings
from pathlib import Path
from typing import Any

import _common as C
import torch
import yaml

from refusal.errors import ConfigError
from refusal.interventions import DiMDirection, Fitted, available, get_intervention
from refusal.interventions.export import export_orthogonalized, orthogonalize_
from refusal.models import residual_layout
from refusal.models.bundle import ModelBundle
from refusal.runtime.generation import generate

NAME = "hooks"
TARGET_RATIO = C.TARGETS[NAME]
ORTHO = "orthogonalized"


@dataclasses.dataclass
class RandomINLP:
    """The data fields interventions read from an INLP fit (cf. FakeINLP in tests/test_interventions.py)."""

    directions: torch.Tensor  # [k, d] orthonormal rows
    mean_harmful: torch.Tensor
    mean_harmless: torch.Tensor
    center: torch.Tensor

    @classmethod
    def random(cls, d: int, k: int, seed: int = 0) -> RandomINLP:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
        harm, safe = torch.randn(d, generator=g), torch.randn(d, generator=g)
        return cls(q.T.contiguous(), harm, safe, (harm + safe) / 2)


def random_fitted(d_model: int, n_layers: int, k: int = 8, seed: int = 0) -> Fitted:
    """A random unit DiM direction, a random INLP basis and a random rank-one LEACE eraser at the middle layer."""
    from refusal.fitting.leace import LEACEResult

    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d_model, generator=g)
    u = torch.randn(d_model, generator=g)
    u /= u.norm()
    layer = n_layers // 2
    leace = LEACEResult(u[:, None], u[None], torch.zeros(d_model), torch.randn(d_model, generator=g), torch.randn(d_model, generator=g))
    return Fitted(dim=DiMDirection(v / v.norm(), layer, -1), inlp=RandomINLP.random(d_model, min(k, d_model), seed + 1),
                  inlp_layer=layer, leace=leace)


def build_interventions(fitted: Fitted, names: list[str] | None) -> tuple[dict[str, Any], list[str]]:
    """Every registered intervention (built-ins and plugins/) built from its conf/intervention default."""
    plugin_dirs = [C.REPO / "plugins"]
    registered = [n for n in available(plugin_dirs) if n != "none"]
    built, skipped = {}, []
    for name in names or registered:
        path = C.REPO / "conf" / "intervention" / f"{name}.yaml"
        cfg = yaml.safe_load(path.read_text()) if path.exists() else {"name": name}
        try:
            built[name] = get_intervention(name, plugin_dirs)(cfg, fitted)
        except ConfigError as err:
            skipped.append(f"{name}: {err}")
    return built, skipped


def orthogonalized_bundle(bundle: ModelBundle, unit: torch.Tensor, roundtrip: bool) -> ModelBundle:
    """The bundle with dim_ablation baked into a copy of the weights (optionally saved and reloaded)."""
    if roundtrip:
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory(prefix="bench_ortho_") as tmp:
            folder = export_orthogonalized(bundle, unit, Path(tmp) / "model")
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=bundle.dtype, use_kernels=False).to(bundle.device).eval()
        model.generation_config = copy.deepcopy(bundle.model.generation_config)
    else:
        model = orthogonalize_(copy.deepcopy(bundle.model), unit)
    model.requires_grad_(False)
    return dataclasses.replace(bundle, model=model, layout=residual_layout(model))


def hook_seconds_per_step(intervention: Any, bundle: ModelBundle, batch: int, loops: int = 20, trials: int = 5) -> float:
    """Seconds the hooks' own tensor work takes in one decode step: every hook once on ``[batch, 1, d]``.

    Fastest of ``trials`` (other load only adds time), so it resolves costs far below the run-to-run
    noise of whole generations; module-call dispatch (a few µs per hooked module) is not included.
    """
    fns = [spec.fn for spec in intervention.hook_specs(bundle)]
    x = torch.randn(batch, 1, bundle.d_model, dtype=bundle.dtype, device=bundle.device)

    def step() -> None:
        for _ in range(loops):
            for fn in fns:
                fn(x)

    step()
    return min(C.timed(step, bundle.device) for _ in range(trials)) / loops


def main(argv: list[str] | None = None) -> int:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=None, help="embedded harmful+harmless test prompts (default 32; smoke 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (default 32; smoke 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the model config's batch_size")
    parser.add_argument("--k", type=int, default=8, help="INLP rank of the random basis")
    parser.add_argument("--interventions", nargs="*", default=None, help="default: every registered one")
    parser.add_argument("--roundtrip", action="store_true",
                        help="save the orthogonalized model with export_orthogonalized and reload it (default: in memory)")
    args = C.parse(parser, argv)
    n_prompts = args.prompts or (8 if args.smoke else 32)
    new_tokens = args.new_tokens or (8 if args.smoke else 32)
    bundle = C.load_bundle(args.model, args.device)
    batch_size = args.batch_size or int(C.model_config(args.model).get("batch_size", 16))
    splits = C.embedded_splits()
    half = n_prompts // 2
    ids = bundle.tokenize_instructions(splits.harmful_test[:half] + splits.harmless_test[: n_prompts - half])
    device = bundle.device

    fitted = random_fitted(bundle.d_model, bundle.n_layers, args.k)
    interventions, skipped = build_interventions(fitted, args.interventions)
    for note in skipped:
        warnings.warn(f"skipped {note}", stacklevel=1)
    ortho = orthogonalized_bundle(bundle, fitted.dim.unit, args.roundtrip)
    for b in (bundle, ortho):
        b.extra["eos_token_ids"] = []  # same token count every run: the decoding loop ends rows only at these

    def run(target: ModelBundle, intervention: Any = None) -> None:
        if intervention is None:
            gens = generate(target, ids, max_new_tokens=new_tokens, batch_size=batch_size, progress=False)
        else:
            with intervention.apply(target):
                gens = generate(target, ids, max_new_tokens=new_tokens, batch_size=batch_size, progress=False)
        lengths = {len(c) for c in gens.completion_ids}
        if lengths != {new_tokens}:
            raise RuntimeError(f"expected {new_tokens} new tokens per prompt, got lengths {sorted(lengths)}")

    fns = {"none": lambda: run(bundle)}
    for name, intervention in interventions.items():
        fns[name] = lambda i=intervention: run(bundle, i)
    fns[ORTHO] = lambda: run(ortho)
    times = C.interleaved(fns, device, args.repeats)
    med = {k: C.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    paired = {k: C.median(t / t0 for t, t0 in zip(v, times["none"], strict=True)) for k, v in times.items()}
    generated = len(ids) * new_tokens
    # Attributed cost: the hooks' own work per decode step ÷ the unhooked time per step (prefill
    # included in the denominator, so this slightly underestimates the share).
    step_s = med["none"] / (-(-len(ids) // batch_size) * new_tokens)

    rows, figures = [], {}
    for name, values in times.items():
        ratio = paired[name]
        hooked = name in interventions
        n_hooks = len(interventions[name].hook_specs(bundle)) if hooked else 0
        hook_s = hook_seconds_per_step(interventions[name], bundle, min(batch_size, len(ids))) if hooked else None
        if name == "none":
            target, verdict = "-", "-"
        elif name == ORTHO:
            target, verdict = "reference (no hooks)", "-"
        else:
            target, verdict = f"<= {TARGET_RATIO}", "pass" if ratio <= TARGET_RATIO else "FAIL"
        rows.append({"variant": name, "hooks": n_hooks, "median_s": med[name], "paired_ratio": ratio,
                     "ratio_fastest": best[name] / best["none"],
                     "hook_ms_per_step": "" if hook_s is None else 1e3 * hook_s,
                     "attributed_ratio": "" if hook_s is None else 1 + hook_s / step_s,
                     "target": target, "result": verdict,
                     "runs_s": " ".join(f"{t:.3f}" for t in values)})
        figures[f"{name}_s"] = med[name]
        if name != "none":
            figures[f"{name}_ratio"] = ratio
            figures[f"{name}_min_ratio"] = best[name] / best["none"]
        if hooked:
            figures[f"{name}_hook_ms_per_step"] = rows[-1]["hook_ms_per_step"]
            figures[f"{name}_attributed_ratio"] = rows[-1]["attributed_ratio"]
    C.print_table(
        f"{bundle.name} on {device}: {len(ids)} prompts x {new_tokens} new tokens (greedy, batch {batch_size}); "
        f"{args.repeats} rounds; none = {generated / med['none']:.1f} tok/s, {1e3 * step_s:.1f} ms per step",
        rows,
    )
    figures = {"n_prompts": len(ids), "new_tokens": new_tokens, "batch_size": batch_size, "k": args.k,
               "repeats": args.repeats, "none_tok_per_s": generated / med["none"], "none_ms_per_step": 1e3 * step_s,
               **figures,
               "ratio_estimator": "median of per-round ratios",
               "max_intervention_ratio": max((r["paired_ratio"] for r in rows if r["variant"] in interventions), default=float("nan")),
               **C.peak_memory(device)}
    if skipped:
        figures["skipped"] = "; ".join(skipped)
    C.print_table("memory (this process, both models)", [{k: v for k, v in figures.items() if k.startswith("peak_")}])
    C.append_row(NAME, args, device, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
