"""The ``hf`` source: harmful/harmless instructions from Hugging Face datasets.

Defaults follow Arditi et al.: AdvBench prompts vs Alpaca instructions without an ``input``.
This is the only source that needs the network; when the Hub cannot be reached the error
says so and names the offline sources instead of leaving a ConnectionError traceback.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from refusal.data.pools import Pool, RawData, cfg_str
from refusal.errors import DataError

DEFAULTS = {
    "harmful_dataset": "walledai/AdvBench",
    "harmful_column": "prompt",
    "harmful_split": "train",
    "harmless_dataset": "tatsu-lab/alpaca",
    "harmless_column": "instruction",
    "harmless_split": "train",
}
OFFLINE_ALTERNATIVES = (
    "use data=embedded (ships with the package), data=refusal_direction (data.dir=<folder>) "
    "or data=files (data.harmful_path/data.harmless_path) instead"
)
_TRUE = {"1", "ON", "YES", "TRUE"}


def load_hf(cfg: Mapping[str, Any]) -> RawData:
    """Load both classes with ``datasets.load_dataset`` (cached under ``cache_dir`` when set)."""
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"data=hf needs the 'datasets' package (pip install 'refusal[hf]'); or {OFFLINE_ALTERNATIVES}"
        ) from err
    cache_dir = cfg.get("cache_dir")
    if cache_dir is not None and not isinstance(cache_dir, str):
        raise DataError(
            f"data.cache_dir must be a path string or null, got {cache_dir!r}; fix data.cache_dir"
        )
    pools: dict[str, Pool] = {}
    names = []
    for label in ("harmful", "harmless"):
        opts = {
            k: cfg_str(cfg, f"{label}_{k}", DEFAULTS[f"{label}_{k}"]) for k in ("dataset", "column", "split")
        }
        rows = _load_column(datasets, label, cache_dir=cache_dir, **opts)
        if not rows:
            raise DataError(
                f"{opts['dataset']} [{opts['split']}] has no non-empty '{opts['column']}' values; "
                f"set data.{label}_dataset/data.{label}_column to another dataset"
            )
        pools[label] = Pool(train=rows)
        names.append(f"{opts['dataset']}[{opts['split']}].{opts['column']}")
    return RawData(harmful=pools["harmful"], harmless=pools["harmless"], source="hf:" + "+".join(names))


def load_hf_column(cfg: Mapping[str, Any], key: str) -> tuple[list[str], str]:
    """One column of one dataset (a test set: ``dataset``, ``split``, ``column``) and its description."""
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"{key}.source=hf needs the 'datasets' package (pip install 'refusal[hf]')") from err
    opts = {k: cfg.get(k, d) for k, d in (("dataset", None), ("split", "train"), ("column", "prompt"))}
    for k, value in opts.items():
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{key}.{k}={value!r}: a test set with source=hf needs {key}.{k} (a non-empty string)")
    rows = _load_column(datasets, str(cfg.get("label")), cache_dir=cfg.get("cache_dir"), keys=f"{key}.", **opts)
    return rows, f"hf:{opts['dataset']}[{opts['split']}].{opts['column']}"


def _load_column(
    datasets: Any, label: str, *, dataset: str, column: str, split: str, cache_dir: str | None, keys: str = ""
) -> list[str]:
    keys = keys or f"data.{label}_"  # how the config names this source's keys, for the error messages
    try:
        with _honour_offline_env():
            ds = datasets.load_dataset(dataset, split=split, cache_dir=cache_dir)
    except Exception as err:  # datasets raises many types (ConnectionError, HfHubHTTPError, ValueError...)
        if _looks_unreachable(err):
            raise DataError(
                f"the Hugging Face Hub is unreachable (offline?) and {dataset} is not cached "
                f"({type(err).__name__}: {err}); {OFFLINE_ALTERNATIVES}"
            ) from err
        raise DataError(
            f"cannot load {dataset} split '{split}' ({type(err).__name__}: {err}); check "
            f"{keys}dataset and {keys}split, or {OFFLINE_ALTERNATIVES}"
        ) from err
    columns = list(ds.column_names)
    if column not in columns:
        raise DataError(
            f"{dataset} [{split}] has no column '{column}'; columns found: {columns}; "
            f"set {keys}column to one of them"
        )
    values = list(ds[column])
    # Alpaca-style rows with an `input` refer to text the model never sees: skip them (Arditi et al.).
    inputs = list(ds["input"]) if "input" in columns and column != "input" else [None] * len(values)
    out = []
    for value, extra in zip(values, inputs, strict=True):
        if isinstance(extra, str) and extra.strip():
            continue
        if isinstance(value, str) and value.strip():
            out.append(value.strip())
    return out


def _env_offline() -> bool:
    return any((os.environ.get(k) or "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@contextlib.contextmanager
def _honour_offline_env() -> Iterator[None]:
    """Apply HF_HUB_OFFLINE/HF_DATASETS_OFFLINE even if they were set after ``datasets`` was imported.

    Both libraries read the variables once at import; without this, a late ``export`` would still
    cost a minute of network retries before failing.
    """
    if not _env_offline():
        yield
        return
    import datasets.config as ds_config
    from huggingface_hub import constants as hub_constants

    saved = (ds_config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    ds_config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        ds_config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _looks_unreachable(err: BaseException) -> bool:
    """True for the offline / no-network family of errors, whatever library raised them."""
    seen: BaseException | None = err
    while seen is not None:
        name = type(seen).__name__
        if isinstance(seen, (ConnectionError, TimeoutError)) or any(
            tag in name for tag in ("Offline", "Connect", "Timeout", "LocalEntryNotFound")
        ):
            return True
        if "Couldn't reach" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
