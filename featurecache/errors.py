"""The package's exceptions. The CLI turns each into one clean line and exit code 1.

A leaf: it imports nothing of the package (the options' declarations, which say how each
front end names an option, are handed to :func:`render` by the front end).
"""

from __future__ import annotations

import json
import re

__all__ = ["option", "render",
    "FeaturecacheError", "UnknownBackboneError", "UnknownLayerError", "WeightsError",
    "DataError", "StoreError", "StoreMismatchError", "HeadError", "PipelineError", "OptionError",
    "HeadOptionError", "PipelineOptionError", "ExportError",
    "FeaturecacheWarning", "DataWarning",
]


_MARK = "\x1f"  # ASCII unit separator: never typed by a user
_OPTION = re.compile(f"{_MARK}([^{_MARK}]*){_MARK}([^{_MARK}]*){_MARK}")


def option(name: str, value=True) -> str:
    """An option named in a message (``name`` as the Python keyword). Each front end shows
    it in its own words: ``overwrite=True`` (Python), ``--overwrite`` (the CLI),
    ``embed.overwrite = true`` (a pipeline file); see :func:`render`."""
    return f"{_MARK}{name}{_MARK}{json.dumps(value)}{_MARK}"


def render(message: str, style: str = "python", table_of=None, declared=None) -> str:
    """Write the options of ``message`` as ``style`` (``python``, ``cli`` or ``pipeline``;
    ``table_of(name)`` gives a pipeline key's table, e.g. ``embed``; ``declared(name)`` the
    declaration of a keyword, with its ``flag`` and ``toml_key``: see
    :func:`featurecache.options.declared`)."""
    def one(m) -> str:
        name, value = m.group(1), json.loads(m.group(2))
        declared_ = declared(name) if declared is not None and style != "python" else None
        if style == "cli":
            flag = declared_.flag if declared_ else "--" + name.replace("_", "-")
            if isinstance(value, list):
                value = ",".join(map(str, value))
            return flag if value is True else f"{flag} {value}"
        if style == "pipeline":
            name = declared_.toml_key if declared_ else name
            table = table_of(name) if table_of else None
            toml = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
            return f"{table + '.' if table else ''}{name} = {toml}"
        return f"{name}={value!r}"

    return _OPTION.sub(one, message)


class FeaturecacheError(Exception):
    """Base class: a problem the user can fix; the message says what and how (options named
    with :func:`option`, shown by each front end in its own words)."""

    def __str__(self) -> str:
        return render(super().__str__())

    def message(self, style: str = "python", table_of=None, declared=None) -> str:
        return render(super().__str__(), style, table_of, declared)


class UnknownBackboneError(FeaturecacheError, ValueError):
    """A backbone name that is neither built in nor a torchvision classifier."""


class UnknownLayerError(FeaturecacheError, ValueError):
    """A layer name that the backbone (or the feature file) does not have."""


class OptionError(FeaturecacheError, ValueError):
    """An option outside its choices or range (the same type wherever the option is given)."""


class ExportError(FeaturecacheError):
    """A model that cannot be exported as asked (the reason, and what to do instead)."""


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


class HeadOptionError(HeadError, OptionError):
    """A head kind, kernel, scoring or selection rule that does not exist."""


class PipelineError(FeaturecacheError):
    """A pipeline file with a bad key, value or type."""


class PipelineOptionError(PipelineError, OptionError):
    """A pipeline value outside its option's type, choices or range."""


class FeaturecacheWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it as one
    ``warning:`` line."""

    def __str__(self) -> str:
        return render(super().__str__())

    def message(self, style: str = "python", table_of=None, declared=None) -> str:
        return render(super().__str__(), style, table_of, declared)


class DataWarning(FeaturecacheWarning):
    """Input data that are usable but probably not what the user meant."""


def close_matches(name: str, choices, n: int = 5) -> str:
    """Comma-separated close matches of ``name`` among ``choices`` (for error messages)."""
    import difflib

    found = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return ", ".join(found) if found else "none"
