"""Head kinds: one object per kind, looked up by name in one registry.

Each kind is a module of this package whose ``KIND`` is a :class:`~.base.HeadKind`: its grids,
its fold scorer, its saved estimator (all from one settings record of its own), its cost rank,
the types it needs to load safely from a ``.skops`` file and whether compare fits it by
default. The search, the refit, the head files, the options and the reports read this
registry and name no kind. **Adding a kind** is one module here plus its name in
:data:`BUILTIN` (see the README's "Adding a head kind"); :func:`registered` adds one for the
duration of a ``with`` block (tests).

Cheap to import: no numpy or scikit-learn (the kinds import them inside their functions).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from contextlib import contextmanager

from .base import Fit, Fold, HeadKind

__all__ = ["BUILTIN", "NAMES", "Fit", "Fold", "HeadKind", "all_kinds", "cost", "defaults",
           "get", "make_estimator", "names", "register", "registered", "skops_types",
           "unregister"]

# the registry: one module per kind, in the order the options and messages list them
BUILTIN = ("logreg", "svm", "knn", "mlp")

_KINDS: dict = {}


def _check(kind) -> HeadKind:
    if not isinstance(kind, HeadKind):
        raise TypeError(f"{kind!r} is not a HeadKind")
    if not kind.name or not isinstance(kind.name, str) or "," in kind.name:
        raise ValueError(f"a head kind needs a name without commas, not {kind.name!r}")
    if not isinstance(kind.cost, int):
        raise ValueError(f"head kind {kind.name!r} needs an integer cost rank, not {kind.cost!r}")
    return kind


def register(kind: HeadKind) -> HeadKind:
    """Add a kind (its name must be new); returns it."""
    _check(kind)
    if kind.name in _KINDS:
        raise ValueError(f"head kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a kind added with :func:`register`."""
    _KINDS.pop(name)


@contextmanager
def registered(kind: HeadKind):
    """Register ``kind`` for the ``with`` block only (tests; nothing leaks)."""
    register(kind)
    try:
        yield kind
    finally:
        unregister(kind.name)


for _module in BUILTIN:
    register(importlib.import_module(f".{_module}", __name__).KIND)
del _module


def get(kind) -> HeadKind:
    """The kind of a name (a :class:`HeadKind` is returned as it is).

    Raises:
        HeadOptionError: an unknown name, naming the choices.
    """
    if isinstance(kind, HeadKind):
        return kind
    try:
        return _KINDS[kind]
    except (KeyError, TypeError):
        from ..errors import HeadOptionError

        raise HeadOptionError(f"head {kind!r} is not one of {', '.join(_KINDS)}.") from None


def make_estimator(kind, params: dict, *, kernel: str = "linear", class_weight=None,
                   seed: int = 0, n_rows: int = 0, n_features: int = 0,
                   probability: bool = False, gram=None, y=None):
    """The unfitted pipeline of a head kind (a name or a :class:`HeadKind`) with chosen
    hyperparameters, for ``n_rows`` x ``n_features`` training data.

    ``gram`` forces the linear SVM's solver (None: by the shape, as the search decides);
    ``y`` (the training labels) decides whether the MLP can stop early on a stratified 10%,
    and the folds of a probability calibration."""
    return get(kind).pipeline(params, Fit(kernel=kernel, class_weight=class_weight, seed=seed,
                                          n_rows=n_rows, n_features=n_features,
                                          probability=probability, gram=gram, y=y))


def names() -> tuple:
    """The registered kinds' names, in registry order."""
    return tuple(_KINDS)


def all_kinds() -> tuple:
    """The registered kinds."""
    return tuple(_KINDS.values())


def defaults() -> tuple:
    """The names of the kinds compare fits by default."""
    return tuple(n for n, k in _KINDS.items() if k.default)


def cost(name: str) -> int:
    """A kind's cost rank (cheaper first, for the one-standard-error rule)."""
    return get(name).cost


def skops_types() -> tuple:
    """Types beyond skops' defaults that saved heads of the registered kinds hold."""
    return tuple(dict.fromkeys(t for k in _KINDS.values() for t in k.skops_types))


class _Names(Sequence):
    """The registered names as a live, read-only sequence (for option choices)."""

    def __getitem__(self, i):
        return names()[i]

    def __len__(self):
        return len(_KINDS)

    def __contains__(self, name):
        return isinstance(name, str) and name in _KINDS

    def __eq__(self, other):
        return isinstance(other, (tuple, list, _Names)) and tuple(self) == tuple(other)

    def __hash__(self):
        return id(self)

    def __repr__(self):
        return repr(names())


NAMES = _Names()
