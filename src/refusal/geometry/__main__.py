"""``python -m refusal.geometry``: compare where several interventions land (see ``compare``)."""

from refusal.app.startup import friendly_errors, quiet_libraries
from refusal.geometry.compare import main

if __name__ == "__main__":
    quiet_libraries()
    raise SystemExit(friendly_errors(main)())
