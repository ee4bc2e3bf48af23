"""The one place that knows where the checkout's folders are (no other module computes a path from its
own ``__file__``): the Hydra configs (``conf/``) and the always-scanned plugin folder (``plugins/``).

Both sit beside ``src/`` in a checkout, which is how the project is installed (``pip install -e .``).
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig

#: The repository root: the folder holding ``src/``, ``conf/`` and ``plugins/``.
CHECKOUT = Path(__file__).resolve().parents[2]
#: The checkout's Hydra config folder.
CONF_DIR = CHECKOUT / "conf"
#: The checkout's own plugin folder, always scanned.
PLUGINS_DIR = CHECKOUT / "plugins"


def conf_dir() -> Path:
    """The Hydra config folder: the running app's, else the checkout's."""
    try:
        for source in HydraConfig.get().runtime.config_sources:
            if source.provider == "main" and source.schema == "file":
                return Path(source.path)
    except ValueError:  # not inside a Hydra app
        pass
    return CONF_DIR
