"""Errors that tell the user what to change.

Every error raised for bad input derives from :class:`RefusalError` so entry points can print
it without a traceback; the message always names the fix.
"""

from __future__ import annotations


class RefusalError(Exception):
    """Base class: a problem the user can fix (config, data, artifact)."""


class ConfigError(RefusalError, ValueError):
    """A config value is unknown, out of range or of the wrong type."""


class DataError(RefusalError, ValueError):
    """A dataset is missing, empty or malformed."""


class ArtifactError(RefusalError, ValueError):
    """An artifact or cache belongs to another model/data, or is corrupt."""


class ArtifactMismatchError(ArtifactError):
    """An artifact was fitted for another model, layer, data...: never overwritten or silently used."""


class CorruptArtifactError(ArtifactError):
    """An artifact is incomplete, corrupt, edited or of an older format: safe to refit. ``problem`` says
    what is wrong without the advice, for callers that refit it themselves."""

    def __init__(self, problem: str, fix: str = "delete it to refit"):
        super().__init__(f"{problem}; {fix}")
        self.problem = problem


class ModelSourceError(RefusalError, RuntimeError):
    """A model cannot be obtained (offline hub, missing package, bad checksum)."""


class InterventionError(RefusalError, RuntimeError):
    """An intervention (usually a plugin) is incomplete or its edit misbehaves: fix its code."""


class FitError(RefusalError, RuntimeError):
    """A fit did not give what was asked: directions of lower rank than k, an optimisation that did not
    converge. The message carries the numbers and what to change."""
