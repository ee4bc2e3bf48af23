"""Shared start-up for the Hydra entry points: logging, seeds, and friendly errors."""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra._internal.utils import get_args_parser
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import OmegaConf

from refusal.errors import ConfigError, RefusalError
from refusal.interventions.registry import INTERVENTIONS, available
from refusal.paths import PLUGINS_DIR
from refusal.schema import config_dir, register, type_error

log = logging.getLogger("refusal")


def in_multirun() -> bool:
    try:
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
    The plugin folders are :data:`refusal.paths.PLUGINS_DIR` and any ``plugin_dirs=`` on the command line."""
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
    with config_dir(conf_dir):
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


def _experiment_plugins(name: str, conf_dir: Path, depth: int = 0) -> dict[str, str]:
    """The launcher/sweeper an ``experiment=<name>`` config selects (``override /hydra/sweeper: optuna``),
    following the experiments it builds on."""
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
    for group, value in requested_plugins(argv, conf_dir).items():
        package = HYDRA_PLUGINS[group].get(value)
        if package is not None and importlib.util.find_spec(package) is not None:
            continue
        installed = installed_options(group, conf_dir)
        if package is None and value in installed:
            continue  # Hydra's own (basic) or another installed plugin
        what = "is not installed" if package is not None else "is not an installed option"
        raise ConfigError(f"{group}={value} {what} (installed: {', '.join(installed)}); {CLUSTER_EXTRA}")


_NOT_A_KEY = re.compile(r"Could not override '(?P<key>(?P<group>[A-Za-z_][\w-]*)\.[^']+)'")


def _hydra_args(argv: list[str]) -> Any:
    """Hydra's own reading of the command line, or None where it would stop at the flags itself."""
    parser = get_args_parser()

    def refuse(message: str) -> None:
        raise ValueError(message)

    parser.error = refuse  # type: ignore[method-assign]  # Hydra reports bad flags itself, once
    try:
        return parser.parse_args(argv)
    except (ValueError, SystemExit):
        return None


def _compose(conf_dir: Path, config_name: str, overrides: list[str], multirun: bool,
             ) -> tuple[Any, HydraException | None]:
    """The config Hydra composes for ``overrides`` (a multirun's first, with sweeps left for the jobs), or
    Hydra's composition error."""
    with config_dir(conf_dir):
        loader = GlobalHydra.instance().config_loader()
        try:
            mode = RunMode.MULTIRUN if multirun else RunMode.RUN
            return loader.load_configuration(config_name, overrides, run_mode=mode, validate_sweep_overrides=False), None
        except HydraException as err:
            return None, err


def _not_a_key(error: HydraException | None, lines: list[str], choices: dict[str, str], swept: dict[str, list[str]], where: str,
               ) -> RefusalError | None:
    """Hydra's 'Could not override intervention.k ... use +' for a key of a swept group as one line naming ``++``."""
    match = _NOT_A_KEY.match(str(error or ""))
    if match is None or match["group"] not in swept:
        return None
    key, group = match["key"], match["group"]
    line = next((x for x in lines if x.lstrip("+~").split("=", 1)[0] == key), f"{key}=...")
    return ConfigError(f"{key} is not a key of {group}={choices.get(group, '?')} ({where}); write ++{line.lstrip('+')} "
                       f"to set it in every job (added to the {group} options that lack it)")


def _values(override: Any) -> list[str] | None:
    """A sweep's values as strings (``a,b``, ``range(1,3)``); None for a search range (``interval(0,1)``)."""
    try:
        return list(override.sweep_string_iterator())
    except Exception:  # noqa: BLE001  (an Optuna distribution has no list of values)
        return None


def check_multirun_overrides(argv: list[str], conf_dir: Path) -> None:
    """A multirun composes its first config from the defaults (``intervention=none``) before any job picks its
    option, so a key only some swept options have (``intervention.k=4`` with ``-m intervention=inlp_flip,
    inlp_nullspace``) stops with Hydra's 'Could not override ... use +'; that advice is wrong there (+ fails on
    the options that have the key). This says ``++`` instead, before Hydra starts; a plain run, and every other
    composition error, is left to Hydra's own message."""
    if "--version" in argv or not any(a in ("-m", "--multirun") or a.split("=", 1)[0].lstrip("+") in
                                      ("experiment", "hydra.mode") for a in argv):
        return  # a plain run: Hydra's own message is right there
    args = _hydra_args(argv)
    if args is None or args.config_dir or args.config_path or args.cfg or args.info or args.shell_completion \
            or args.help or args.hydra_help or args.experimental_rerun:
        return
    name, lines = args.config_name or "config", list(args.overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except Exception:  # noqa: BLE001  (Hydra says what is wrong with it)
        return
    cfg, error = _compose(conf_dir, name, lines, multirun=True)
    failing = _NOT_A_KEY.match(str(error or ""))
    if failing is not None:  # the same without the override Hydra rejects: which option, which sweeps
        cfg, _ = _compose(conf_dir, name, [x for x in lines if x.lstrip("+~").split("=", 1)[0] != failing["key"]], True)
    if cfg is None or not (args.multirun or cfg.hydra.mode == RunMode.MULTIRUN):
        return
    choices = dict(cfg.hydra.runtime.choices)
    swept = {o.key_or_group: _values(o) for o in parsed if o.is_sweep_override() and o.key_or_group in choices}
    for group, value in (cfg.hydra.sweeper.get("params") or {}).items():  # experiment=compare sweeps in its config
        if group in choices and isinstance(value, str) and "(" not in value:
            swept.setdefault(str(group), [v.strip() for v in value.split(",")])
    swept = {group: values for group, values in swept.items() if values}  # config groups with a list of options
    if failing is not None:
        hint = _not_a_key(error, lines, choices, swept, "the primary config a multirun composes before its jobs")
        if hint is not None:
            raise hint
        return
    _check_each_option(conf_dir, name, parsed, swept, choices)


def _check_each_option(conf_dir: Path, name: str, parsed: list[Any], swept: dict[str, list[str]],
                       choices: dict[str, str]) -> None:
    """Each option of a swept group composed as its job will be (every other sweep at its first value), so
    ``-m intervention=none,inlp_flip intervention.k=1,2`` stops here, not in the launcher."""
    lines = [o.input_line for o in parsed]
    at_first = []
    for o in parsed:
        values = _values(o) if o.is_sweep_override() else None
        if o.key_or_group in swept or (o.is_sweep_override() and not values):
            continue  # a search range stays out: its values are the sweeper's to draw
        at_first.append(f"{o.input_line.split('=', 1)[0]}={values[0]}" if values else o.input_line)
    for group, options in swept.items():
        others = [f"{g}={values[0]}" for g, values in swept.items() if g != group]
        for option in options:
            _, error = _compose(conf_dir, name, [*at_first, *others, f"{group}={option}"], multirun=False)
            hint = _not_a_key(error, lines, {**choices, group: option}, {group: options}, "one of this multirun's options")
            if hint is not None:
                raise hint


def _under_null(conf_dir: Path, config_name: str, overrides: list[str], multirun: bool) -> str | None:
    """Which override sets a key below a value that is null once the groups are chosen (``eval=trial`` has
    ``test_sets: null``, so ``eval.test_sets.overrefusal.n=100`` has nowhere to go), said as the fix."""
    keys = [(line, line.lstrip("+~").split("=", 1)[0]) for line in overrides]
    cfg, _ = _compose(conf_dir, config_name, [line for line, key in keys if "." not in key], multirun)
    if cfg is None:  # the group choices alone do not compose: no key to name
        return None
    for line, key in keys:
        node, parts = cfg, key.split(".")
        for i in range(len(parts) - 1):
            node = node.get(parts[i]) if hasattr(node, "get") else None
            if node is None:
                where = ".".join(parts[: i + 1])
                return (f"{line}: {where} is null in this config (set by its groups, e.g. eval=trial has no test sets), "
                        f"so {key} has nowhere to go; drop the override or give {where} a value first")
    return None


def check_types(argv: list[str], conf_dir: Path) -> None:
    """A value of the wrong type for its schema (:mod:`refusal.schema`), e.g. ``eval.batch_size=abc``, as one
    line naming the key, the type and an example, before Hydra starts (Hydra's own message is three lines
    and a hint about HYDRA_FULL_ERROR). Every other composition error is left to Hydra's message."""
    args = _hydra_args(argv)
    if args is None or args.config_dir or args.config_path or args.cfg or args.info or args.shell_completion \
            or args.help or args.hydra_help or args.experimental_rerun or "--version" in argv:
        return
    name, overrides = args.config_name or "config", list(args.overrides)
    try:
        _, error = _compose(conf_dir, name, overrides, multirun=args.multirun)
    except AssertionError as err:  # OmegaConf's bare assertion when an override lands under a null value
        raise ConfigError(_under_null(conf_dir, name, overrides, args.multirun) or f"the overrides do not compose ({err})") from None
    typed = type_error(error) if error is not None else None
    if typed is not None:
        raise typed


def entry_point(main: Callable[[], Any], conf_dir: Path) -> None:
    """Run a Hydra ``main`` after registering plugin configs and the schemas; a broken plugin, a launcher or
    sweeper that is not installed, a value of the wrong type, or a multirun override of a key only some swept
    options have is one ``error:`` line."""
    register()
    try:
        check_hydra_plugins(sys.argv[1:], conf_dir)
        register_plugin_configs(sys.argv[1:], conf_dir)
        check_types(sys.argv[1:], conf_dir)
        check_multirun_overrides(sys.argv[1:], conf_dir)
    except RefusalError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
