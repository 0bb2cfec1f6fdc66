"""The package's exceptions. The CLI turns each into one clean line and exit code 1."""

from __future__ import annotations

__all__ = [
    "FeaturecacheError", "UnknownBackboneError", "UnknownLayerError", "WeightsError",
    "DataError", "StoreError", "StoreMismatchError", "HeadError", "PipelineError",
    "FeaturecacheWarning", "DataWarning",
]


class FeaturecacheError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""


class UnknownBackboneError(FeaturecacheError, ValueError):
    """A backbone name that is neither built in nor a torchvision classifier."""


class UnknownLayerError(FeaturecacheError, ValueError):
    """A layer name that the backbone (or the feature file) does not have."""


class WeightsError(FeaturecacheError):
    """Weights that cannot be found, read, or do not fit the architecture."""


class DataError(FeaturecacheError):
    """Input images or manifests that cannot be used."""


class StoreError(FeaturecacheError):
    """A feature file that is missing, damaged, or not a featurecache file."""


class StoreMismatchError(StoreError):
    """An existing feature file that was made with different settings."""


class HeadError(FeaturecacheError):
    """A head bundle that is invalid, or a head that cannot be fitted."""


class PipelineError(FeaturecacheError):
    """A pipeline file with a bad key, value or type."""


class FeaturecacheWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it as one
    ``warning:`` line."""


class DataWarning(FeaturecacheWarning):
    """Input data that are usable but probably not what the user meant."""


def close_matches(name: str, choices, n: int = 5) -> str:
    """Comma-separated close matches of ``name`` among ``choices`` (for error messages)."""
    import difflib

    found = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return ", ".join(found) if found else "none"
