"""Shared start-up for the Hydra entry points: logging, seeds, and friendly errors."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
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
