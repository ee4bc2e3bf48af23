"""Shared start-up for the Hydra entry points: logging, seeds, and friendly errors."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refusal.errors import RefusalError

log = logging.getLogger("refusal")


def in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ValueError, ImportError):
        return False


def friendly_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Print a :class:`RefusalError` as one clear line and exit 2, instead of a traceback.

    In a multirun, a failing job is logged (its results.json says why) and the sweep goes on;
    the sweep report lists the failures and the sweep exits non-zero at the end.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except RefusalError as err:
            log.error("%s: %s", type(err).__name__, err)
            if in_multirun():
                return None
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except Exception:
            if in_multirun():
                log.exception("job failed; the sweep continues")
                return None
            raise

    return wrapper


def quiet_libraries() -> None:
    """Keep the console for our progress and results, not library chatter."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def register_plugin_configs(argv: list[str], conf_dir: Path) -> list[str]:
    """Make every registered intervention a Hydra option of group ``intervention`` (ConfigStore), so a
    one-file plugin works in ``-m intervention=none,my_plugin`` with no yaml anywhere. Its node is the
    class's declared ``defaults`` plus the scope keys; a ``conf/intervention/<name>.yaml`` still wins.
    The plugin folders are :data:`refusal.config.PLUGINS_DIR` and any ``plugin_dirs=`` on the command line."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from refusal.config import PLUGINS_DIR
    from refusal.interventions.registry import INTERVENTIONS, available

    dirs = [str(PLUGINS_DIR)]
    given = [a for a in argv if a.split("=", 1)[0].lstrip("+~") == "plugin_dirs"]
    if given:
        value = OverridesParser.create().parse_overrides(given[-1:])[0].value()
        dirs += [str(v) for v in (value if isinstance(value, list) else [value])]
    available(dirs)
    stored = []
    for name, cls in INTERVENTIONS.classes.items():
        if (conf_dir / "intervention" / f"{name}.yaml").exists():
            continue
        node = {"name": name, **dict(cls.defaults), "layers": None, "positions": "all"}
        ConfigStore.instance().store(group="intervention", name=name, node=node)
        stored.append(name)
    return stored


#: Hydra launchers this project documents, and the package of each (installed by the ``cluster`` extra).
LAUNCHERS = {"joblib": "hydra_plugins.hydra_joblib_launcher", "submitit_local": "hydra_plugins.hydra_submitit_launcher",
             "submitit_slurm": "hydra_plugins.hydra_submitit_launcher"}


def check_launcher(argv: list[str]) -> None:
    """A documented launcher that is not installed names the extra that installs it (Hydra itself would
    only list the installed ones)."""
    import importlib.util

    from refusal.errors import ConfigError

    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "hydra/launcher" and value in LAUNCHERS and importlib.util.find_spec(LAUNCHERS[value]) is None:
            raise ConfigError(f"hydra/launcher={value} is not installed: pip install -e '.[cluster]' "
                              "(hydra-joblib-launcher, hydra-submitit-launcher)")


def entry_point(main: Callable[[], Any], conf_dir: Path) -> None:
    """Run a Hydra ``main`` after registering plugin configs; a broken plugin or a launcher that is not
    installed is one ``error:`` line."""
    try:
        check_launcher(sys.argv[1:])
        register_plugin_configs(sys.argv[1:], conf_dir)
    except RefusalError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
