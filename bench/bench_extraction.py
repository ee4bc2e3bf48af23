"""Activation extraction time vs. a plain forward pass (target: extraction ÷ base decoder ≤ 1.10).

extract_activations() runs the base decoder once per batch with a pre-hook on every block and the
final norm that copies the last post-instruction positions. Its cost should be a plain decoder
forward plus a little copying; the full CausalLM forward (vocab projection at every position) is
reported too, as the naive alternative. All three use the same prompts, the same length-sorted
batches and the same left padding. The ratio target is judged on the plain extraction (same tokens as
the decoder); the default extraction, which runs the prompts' shared chat-template prefix once per
batch, is reported beside it as the speed-up it buys.

    python bench/bench_extraction.py --model qwen05
    python bench/bench_extraction.py --smoke
"""

from __future__ import annotations

import _common as C
import torch

from refusal.models import decoder_of
from refusal.runtime.activations import batches_by_length, extract_activations

NAME = "extraction"
TARGET_RATIO = C.TARGETS[NAME]


def main(argv: list[str] | None = None) -> int:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=None,
                        help="harmful+harmless prompts from the embedded train split (default 64; smoke 16)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the model config's batch_size (smoke 8)")
    args = C.parse(parser, argv)
    n_prompts = args.prompts or (16 if args.smoke else 64)
    bundle = C.load_bundle(args.model, args.device)
    batch_size = args.batch_size or (8 if args.smoke else int(C.model_config(args.model).get("batch_size", 16)))
    splits = C.embedded_splits()
    half = n_prompts // 2
    instructions = splits.harmful_train[:half] + splits.harmless_train[: n_prompts - half]
    ids = bundle.tokenize_instructions(instructions)
    n_pos = len(bundle.post_instruction_ids)
    batches = batches_by_length([len(r) for r in ids], batch_size)
    decoder = decoder_of(bundle.model)
    device = bundle.device

    def run_extract() -> None:
        extract_activations(bundle, ids, n_pos, batch_size=batch_size, progress=False, share_prefix=False)

    def run_shared() -> None:
        extract_activations(bundle, ids, n_pos, batch_size=batch_size, progress=False)

    @torch.inference_mode()
    def run_decoder() -> None:
        for idx in batches:
            b = bundle.pad([ids[i] for i in idx]).to(device)
            decoder(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False)

    @torch.inference_mode()
    def run_causal() -> None:
        for idx in batches:
            b = bundle.pad([ids[i] for i in idx]).to(device)
            bundle.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                         use_cache=False)

    times = C.interleaved({"decoder": run_decoder, "extract": run_extract, "shared": run_shared, "causal_lm": run_causal},
                          device, args.repeats)
    med = {k: C.median(v) for k, v in times.items()}
    ratio_decoder = med["extract"] / med["decoder"]
    ratio_causal = med["extract"] / med["causal_lm"]
    # Other load only ever adds time, so the ratio of the fastest runs is a second, less noisy view.
    best = {k: min(v) for k, v in times.items()}
    ratio_decoder_min = best["extract"] / best["decoder"]
    n_tokens = sum(len(ids[i]) for idx in batches for i in idx)
    C.print_table(
        f"{bundle.name} on {device}: {len(ids)} prompts, {len(batches)} batches of <= {batch_size}, "
        f"{n_tokens} tokens, {n_pos} positions x {bundle.n_layers + 1} sites; median of {args.repeats}",
        [
            {"pass": "base decoder forward", "median_s": med["decoder"], "runs_s": " ".join(f"{t:.3f}" for t in times["decoder"])},
            {"pass": "extract_activations", "median_s": med["extract"], "runs_s": " ".join(f"{t:.3f}" for t in times["extract"])},
            {"pass": "extract_activations, shared prefix", "median_s": med["shared"], "runs_s": " ".join(f"{t:.3f}" for t in times["shared"])},
            {"pass": "CausalLM forward", "median_s": med["causal_lm"], "runs_s": " ".join(f"{t:.3f}" for t in times["causal_lm"])},
        ],
    )
    verdict = "pass" if ratio_decoder <= TARGET_RATIO else "FAIL"
    C.print_table("ratios", [
        {"figure": "extract / decoder", "value": ratio_decoder, "target": f"<= {TARGET_RATIO}", "result": verdict},
        {"figure": "extract / decoder (fastest runs)", "value": ratio_decoder_min, "target": "-", "result": "-"},
        {"figure": "extract / CausalLM", "value": ratio_causal, "target": "-", "result": "-"},
        {"figure": "shared-prefix extract / decoder", "value": med["shared"] / med["decoder"], "target": "-", "result": "-"},
    ])
    figures = {
        "n_prompts": len(ids), "batch_size": batch_size, "n_batches": len(batches), "n_tokens": n_tokens,
        "repeats": args.repeats, "decoder_s": med["decoder"], "extract_s": med["extract"], "causal_lm_s": med["causal_lm"],
        "extract_over_decoder_ratio": ratio_decoder, "extract_over_causal_lm_ratio": ratio_causal,
        "extract_over_decoder_min_ratio": ratio_decoder_min,
        "shared_s": med["shared"], "shared_over_decoder_ratio": med["shared"] / med["decoder"],
        **C.peak_memory(device),
    }
    C.print_table("memory", [{k: v for k, v in figures.items() if k.startswith("peak_")}])
    C.append_row(NAME, args, device, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
