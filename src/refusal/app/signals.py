"""SIGINT and SIGTERM as Ctrl-C, for the bench drivers that run long child processes."""

from __future__ import annotations

import signal
from typing import Any


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt, so a driver started in the background (``nohup ... &``: SIGINT
    ignored, SIGTERM fatal) stops as Ctrl-C stops it: ``bench/study.py`` ends the running step and records its time,
    ``bench/peers/run_peer.py`` sends its peer one Ctrl+C and records the segment. A handled signal is reset to the
    default in a child at exec, so the child gets a working Ctrl-C again (an ignored one would be inherited)."""
    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
