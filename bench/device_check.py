"""Quick checks of model.dtype and model.device_map on a real model (bench/gpu_check.sh runs them on a GPU).

Loads ``--model`` with ``--dtype`` and ``--device`` or ``--device-map``, prints the memory estimate that
``load_model`` logs before loading next to what loading really took, then checks on a few embedded prompts:

* hooks off restore the logits bit for bit;
* DiM ablation of a random unit direction (float32 on CPU, as artifacts are saved) leaves at most a few
  eps of the dtype of |x| along it at every block input (the hooks cast it to each block's device/dtype);
* actadd at the middle layer shifts that block's input by c·r (to the dtype's rounding);
* an INLP flip limited to the post-instruction positions runs (role masks on each block's device);
* refusal score and KL read half-precision logits in float32 and are finite.

``--reference float32`` also loads the model in float32 and reports how far the dtype's last-position
logits are from it (max |Δlogit|, KL, refusal-score difference): figures, not pass/fail. ``--device-map
split`` builds an explicit map: the second half of the blocks, the final norm and the head on GPU 1 when
there are two GPUs, else offloaded to the CPU (accelerate then runs them on GPU 0 and the hooks must follow
its execution device, not the parameters' ``meta``). Prints figures only (no CSV); exit 1 when a check fails.

    python bench/device_check.py --model qwen05 --device cuda --dtype bfloat16 --reference float32
    python bench/device_check.py --model qwen05 --device-map auto
    python bench/device_check.py --smoke --dtype bfloat16 --reference float32    # tiny on CPU: the plumbing
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any

import _common as C
import torch

from refusal.interventions import DiMDirection, Fitted, get_intervention
from refusal.metrics import KLDivergence, RefusalScore
from refusal.metrics.kl import _kl_rows
from refusal.metrics.refusal_score import refusal_score
from refusal.models import load_model
from refusal.models.loader import resolve_device, resolve_device_map, resolve_dtype
from refusal.models.memory import estimate_memory, format_bytes, format_count
from refusal.runtime.hooks import HookSpec, hooked
from refusal.runtime.roles import declare_roles


def split_map(cfg: dict[str, Any]) -> dict[str, int | str]:
    """Blocks [0, n/2) and the embedding on GPU 0; the rest on GPU 1, or on the CPU (offloaded) with one GPU."""
    n = int(cfg["n_layers"])
    if not torch.cuda.is_available():
        return {"": "cpu"}
    second: int | str = 1 if torch.cuda.device_count() > 1 else "cpu"
    out: dict[str, int | str] = {"model.embed_tokens": 0, "model.rotary_emb": 0}
    out.update({f"model.layers.{i}": 0 if i < n // 2 else second for i in range(n)})
    out.update({"model.norm": second, "lm_head": second})
    return out


def forward(bundle, rows):
    batch = bundle.pad(rows).to(bundle.device)
    return bundle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids).logits


def block_inputs(bundle, store: list[torch.Tensor]) -> list[HookSpec]:
    def rec(x):
        store.append(x.detach().float())
        return x
    return [HookSpec(b, rec, "pre") for b in bundle.layout.blocks]


def random_fits(d: int, n_layers: int, k: int = 4) -> Fitted:
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(d, generator=g)
    direction = 4.0 * direction / direction.norm()
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
    harm, safe = torch.randn(d, generator=g), torch.randn(d, generator=g)
    inlp = type("RandomINLP", (), {})()
    inlp.directions, inlp.mean_harmful, inlp.mean_harmless, inlp.center = q.T.contiguous(), harm, safe, (harm + safe) / 2
    return Fitted(dim=DiMDirection(direction, layer=n_layers // 2, position=-1), inlp=inlp, inlp_layer=n_layers // 2)


def cuda_allocated() -> int:
    if not torch.cuda.is_available():
        return 0
    return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))


def cuda_peak() -> int:
    if not torch.cuda.is_available():
        return 0
    return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))


def main(argv: list[str] | None = None) -> int:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model.dtype (default: the config's)")
    parser.add_argument("--device-map", default=None,
                        help="model.device_map: auto, balanced, split (see above) or a JSON mapping of module names to devices")
    parser.add_argument("--reference", default=None, choices=["float32", "bfloat16", "float16"],
                        help="also load this dtype and compare last-position logits")
    parser.add_argument("--prompts", type=int, default=8, help="embedded prompts, half harmful, half harmless")
    args = C.parse(parser, argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # a may-not-fit warning shows

    cfg = C.model_config(args.model, args.device)
    if args.dtype:
        cfg["dtype"] = args.dtype
    if args.device_map:
        dm = args.device_map
        cfg["device_map"] = split_map(cfg) if dm == "split" else json.loads(dm) if dm.lstrip().startswith("{") else dm
    dtype = resolve_dtype(str(cfg.get("dtype", "float32")))
    device_map = resolve_device_map(cfg.get("device_map"))
    device = resolve_device(str(cfg.get("device", "auto"))) if device_map is None else None
    cache = C.cache_dir()
    estimate = estimate_memory(cfg, cache, dtype, device, device_map)
    print(f"estimate: {estimate.line()}", flush=True)

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    before = cuda_allocated()
    t0 = time.perf_counter()
    bundle = load_model(cfg, cache)
    load_s = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in bundle.model.parameters())
    n_params = sum(p.numel() for p in bundle.model.parameters())
    hf_map = getattr(bundle.model, "hf_device_map", None)
    placed = dict(Counter(str(v) for v in hf_map.values())) if hf_map else {str(bundle.device): "all"}
    print(f"loaded {bundle.name}: {bundle.dtype}, input on {bundle.device}, computes on {[str(d) for d in bundle.devices]} "
          f"in {load_s:.1f}s; modules per device {placed}", flush=True)

    splits = C.embedded_splits(n_train=max(4, args.prompts), n_val=4, n_test=4)
    texts = splits.harmful_train[: args.prompts // 2] + splits.harmless_train[: args.prompts - args.prompts // 2]
    rows = bundle.tokenize_instructions(texts)
    fitted = random_fits(bundle.d_model, bundle.n_layers)
    unit = fitted.dim.unit.double()
    eps = torch.finfo(bundle.dtype).eps
    tol = 1e-4 if bundle.dtype == torch.float32 else 4 * eps
    make = lambda name, **kw: get_intervention(name)({"name": name, **kw}, fitted)  # noqa: E731
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, figure: str) -> None:
        checks.append({"check": name, "ok": "yes" if ok else "NO", "figure": figure})

    with torch.inference_mode():
        base = forward(bundle, rows)
        check("logits dtype and finite", base.dtype == bundle.dtype and bool(torch.isfinite(base).all()),
              f"{base.dtype}, on {base.device}")
        seen: list[torch.Tensor] = []
        with make("dim_ablation").apply(bundle), hooked(block_inputs(bundle, seen)):
            ablated = forward(bundle, rows)
        rel = max(float(((x @ unit).abs() / x.norm(dim=-1).clamp_min(1e-6)).max())
                  for x in (s.double().to(unit.device) for s in seen))
        check("dim_ablation: |x·r̂|/|x| at every block input", rel < tol and len(seen) == bundle.n_layers,
              f"max {rel:.2e} (tolerance {tol:.1e})")
        after = forward(bundle, rows)
        check("hooks off restore the logits bit for bit", torch.equal(after, base),
              f"max |Δ| {float((after.float() - base.float()).abs().max()):.1e}")

        layer = fitted.dim.layer
        plain, shifted = [], []
        with hooked([HookSpec(bundle.layout.blocks[layer], lambda x: plain.append(x.float()) or x, "pre")]):
            forward(bundle, rows)
        with make("actadd", coeff=-1.0).apply(bundle), hooked(
                [HookSpec(bundle.layout.blocks[layer], lambda x: shifted.append(x.float()) or x, "pre")]):
            forward(bundle, rows)
        shift = (shifted[0] - plain[0]).mean(dim=(0, 1)).cpu()
        expected = -fitted.dim.direction.to(bundle.dtype).float()
        scale = float(plain[0].abs().max()) + float(expected.abs().max())
        err = float((shift - expected).abs().max())
        check(f"actadd at layer {layer}: mean shift = c·r", err <= max(2 * eps * scale, 1e-5), f"max err {err:.2e} (scale {scale:.1f})")

        lengths = [len(r) for r in rows]
        with declare_roles(bundle, lengths, max(lengths)), make("inlp_flip", positions="post_instruction").apply(bundle):
            flipped = forward(bundle, rows)
        check("inlp_flip at post-instruction positions", bool(torch.isfinite(flipped).all()),
              f"changed {float((flipped.float() - base.float()).abs().max()):.2f} max |Δlogit|")

        score = RefusalScore(bundle.refusal_token_ids).to(base.device)
        score.update(base[:, -1])
        kl = KLDivergence().to(base.device)
        kl.update(base[:, -1], ablated[:, -1])
        value, divergence = score.compute(), kl.compute()
        check("refusal score and KL in float32, finite",
              value.dtype == torch.float32 and divergence.dtype == torch.float32
              and bool(torch.isfinite(value)) and bool(torch.isfinite(divergence)),
              f"score {float(value):.2f}, KL(base‖ablated) {float(divergence):.3f}")

    peak = cuda_peak()
    print(f"memory: weights {format_bytes(weights)} measured ({format_count(n_params)} parameters) vs "
          f"{format_bytes(estimate.weights_bytes or 0)} estimated; "
          + (f"CUDA allocated by the load {format_bytes(cuda_allocated() - before)}, peak {format_bytes(peak)} over "
             f"{args.prompts} prompts (working set estimate {format_bytes(estimate.working_bytes or 0)} at batch "
             f"{estimate.batch_size} × {estimate.tokens} tokens)" if torch.cuda.is_available() else "no CUDA"), flush=True)

    if args.reference and args.reference != str(bundle.dtype).removeprefix("torch."):
        ref = load_model({**cfg, "dtype": args.reference}, cache)
        with torch.inference_mode():
            ref_logits = forward(ref, rows)[:, -1].float()
        ours = base[:, -1].float().to(ref_logits.device)
        ids = bundle.refusal_token_ids
        delta = float((refusal_score(ours, ids) - refusal_score(ref_logits, ids)).abs().max())
        C.print_table(f"{bundle.dtype} vs {args.reference}, last position of {len(rows)} prompts", [{
            "max |Δlogit|": round(float((ours - ref_logits).abs().max()), 4),
            "mean KL(ref‖ours)": round(float(_kl_rows(ref_logits, ours).mean()), 6),
            "max |Δ refusal score|": round(delta, 4),
            "same top-1": f"{int((ours.argmax(-1) == ref_logits.argmax(-1)).sum())}/{len(rows)}",
        }])
        del ref

    C.print_table(f"{bundle.name} {bundle.dtype} device_map={cfg.get('device_map')} device={cfg.get('device')}", checks)
    failed = [c["check"] for c in checks if c["ok"] != "yes"]
    print(f"{'FAILED: ' + '; '.join(failed) if failed else 'all checks passed'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
