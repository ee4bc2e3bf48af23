"""Where greedy decoding spends its time: torch.profiler over one batched generation, top operators.

For a path that is slower than it should be (on an H200, ``model.dtype=bfloat16`` decoded the tiny model
~15x slower than float32), the operator table says whether the time goes to the model's kernels, to
copies and casts, or to Python between them.

    python bench/profile_generation.py --model tiny --device cuda --dtype bfloat16 float32
    python bench/profile_generation.py --model qwen05 --rows 32 --tokens 32
"""

from __future__ import annotations

import argparse
import time

import _common as C
from torch.profiler import ProfilerActivity, profile


def main(argv: list[str] | None = None) -> int:
    from refusal.models import load_model
    from refusal.runtime.generation import generate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--top", type=int, default=20, help="operators shown per table")
    args = parser.parse_args(argv)
    instructions = C.mixed_instructions(args.rows)
    for dtype in args.dtype:
        bundle = load_model({**C.model_config(args.model, args.device), "dtype": dtype}, C.cache_dir())
        bundle.extra["eos_token_ids"] = []  # the same number of steps in every profile
        ids = bundle.tokenize_instructions(instructions)
        generate(bundle, ids[:4], max_new_tokens=4, batch_size=4, progress=False)  # warm-up
        cuda = bundle.device.type == "cuda"
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        C.sync(bundle.device)
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            generate(bundle, ids, max_new_tokens=args.tokens, batch_size=args.rows, progress=False)
            C.sync(bundle.device)
        wall = time.perf_counter() - t0
        print(f"\n## {args.model} {dtype} on {bundle.device}: {args.rows} rows x {args.tokens} tokens in {wall:.2f} s "
              f"({args.rows * args.tokens / wall:.0f} tok/s, profiled)")
        keys = ["self_cpu_time_total", *(["self_device_time_total"] if cuda else [])]
        for key in keys:
            print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=60))
        del bundle
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
