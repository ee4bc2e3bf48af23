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


#: Hydra launchers and sweepers this project documents, and the package of each (the ``cluster`` extra).
HYDRA_PLUGINS = {
    "hydra/launcher": {"joblib": "hydra_plugins.hydra_joblib_launcher", "submitit_local": "hydra_plugins.hydra_submitit_launcher",
                       "submitit_slurm": "hydra_plugins.hydra_submitit_launcher"},
    "hydra/sweeper": {"optuna": "hydra_plugins.hydra_optuna_sweeper"},
}
LAUNCHERS = HYDRA_PLUGINS["hydra/launcher"]
CLUSTER_EXTRA = ("pip install -e '.[cluster]' adds " + ", ".join(
    f"{group}={'|'.join(options)}" for group, options in HYDRA_PLUGINS.items()))


def installed_options(group: str, conf_dir: Path) -> list[str]:
    """The options Hydra offers for ``group`` (``hydra/sweeper``...) here: its own and installed plugins'."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


def _experiment_plugins(name: str, conf_dir: Path, depth: int = 0) -> dict[str, str]:
    """The launcher/sweeper an ``experiment=<name>`` config selects (``override /hydra/sweeper: optuna``),
    following the experiments it builds on."""
    from omegaconf import OmegaConf

    path = conf_dir / "experiment" / f"{name}.yaml"
    if depth > 4 or not path.is_file():
        return {}
    out: dict[str, str] = {}
    for entry in OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_":
            out.update(_experiment_plugins(entry, conf_dir, depth + 1))
        elif isinstance(entry, dict):
            for key, value in entry.items():
                group = key.removeprefix("override").strip().lstrip("/")
                if group in HYDRA_PLUGINS and isinstance(value, str):
                    out[group] = value
    return out


def requested_plugins(argv: list[str], conf_dir: Path) -> dict[str, str]:
    """group -> option of the launcher and sweeper a command asks for, through ``experiment=`` or directly."""
    out: dict[str, str] = {}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "experiment" and value:
            out.update(_experiment_plugins(value, conf_dir))
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") in HYDRA_PLUGINS and value:
            out[key.lstrip("+")] = value
    return out


def check_hydra_plugins(argv: list[str], conf_dir: Path) -> None:
    """A launcher or sweeper that is not installed (documented or not) lists the installed ones and names
    the extra that installs the documented ones; Hydra alone would not name the extra."""
    import importlib.util

    from refusal.errors import ConfigError

    for group, value in requested_plugins(argv, conf_dir).items():
        package = HYDRA_PLUGINS[group].get(value)
        if package is not None and importlib.util.find_spec(package) is not None:
            continue
        installed = installed_options(group, conf_dir)
        if package is None and value in installed:
            continue  # Hydra's own (basic) or another installed plugin
        what = "is not installed" if package is not None else "is not an installed option"
        raise ConfigError(f"{group}={value} {what} (installed: {', '.join(installed)}); {CLUSTER_EXTRA}")


def entry_point(main: Callable[[], Any], conf_dir: Path) -> None:
    """Run a Hydra ``main`` after registering plugin configs; a broken plugin or a launcher or sweeper
    that is not installed is one ``error:`` line."""
    try:
        check_hydra_plugins(sys.argv[1:], conf_dir)
        register_plugin_configs(sys.argv[1:], conf_dir)
    except RefusalError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
