"""How a peer runs: its own venv's interpreter and an offline environment with none of our sources on its path
(shared by run_peer, which runs its search, and peer_count, which runs its refusal rule)."""

from __future__ import annotations

import os
from pathlib import Path

from peer_inputs import PeerInputError

HERE = Path(__file__).resolve().parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "MPLBACKEND": "Agg"}


def installed_python(peer: str) -> Path:
    """The peer's own interpreter, or an error naming the install command."""
    python = HERE / f".venv-{peer}" / "bin" / "python"
    if not python.exists():
        raise PeerInputError(f"{peer} is not installed ({python} missing); run: bash bench/peers/install.sh {peer}")
    return python


def peer_env(run_dir: Path) -> dict[str, str]:
    """A peer's environment: offline, an HF_HOME of its own in the run folder, and none of our sources on its path."""
    env = {**os.environ, **OFFLINE, "HF_HOME": str(run_dir / "hf-home")}
    env.pop("PYTHONPATH", None)
    return env
