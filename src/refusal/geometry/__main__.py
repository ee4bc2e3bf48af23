"""``python -m refusal.geometry``: compare where several interventions land (see ``compare``)."""

from refusal.app.startup import friendly_errors
from refusal.geometry.compare import main

if __name__ == "__main__":
    raise SystemExit(friendly_errors(main)())
