"""``python -m refusal interventions|judges``: list what is registered (built-ins, plugins, entry points)."""

from __future__ import annotations

import argparse

from refusal.config import PLUGINS_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="refusal", description="refusal: steer refusal in chat models")
    sub = parser.add_subparsers(dest="command", required=True)
    for kind in ("interventions", "judges"):
        listing = sub.add_parser(kind, help=f"list registered {kind}")
        listing.add_argument("--plugins", action="append", default=[], help="extra plugin folder (repeatable)")
    args = parser.parse_args(argv)
    if args.command == "interventions":
        from refusal.interventions import available
    else:
        from refusal.judges import available_judges as available

    names = available([PLUGINS_DIR, *args.plugins])
    width = max(len(n) for n in names)
    for name, description in names.items():
        print(f"{name:<{width}}  {description}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
