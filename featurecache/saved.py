"""Saved models: one protocol for a frozen head and a fine-tuned model, and one loader.

Two kinds of file hold a model that classifies:

* a head file (``best.joblib``, ``head.skops``): :class:`featurecache.persist.Head`, a
  scikit-learn pipeline on one stored layer of a frozen backbone;
* a fine-tune folder (``ft/``, or its ``ft/model.pt``): :class:`featurecache.checkpoint.Finetuned`,
  the frozen bottom of a backbone and the fine-tuned blocks above one of its maps.

Both are a :class:`SavedModel`: the same questions have the same methods, so a caller
(``predict``, ``score``) loads one with :func:`load_model` and never asks which it holds.
The file formats are the two modules' own and unchanged.

Example::

    >>> model = load_model("reports/run1/best.joblib")        # doctest: +SKIP
    >>> model.describe(), model.evaluate("feats.h5")["accuracy"]   # doctest: +SKIP
    ('logreg head on avgpool', 0.91)
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["SavedModel", "load_model", "is_finetuned_path"]


@runtime_checkable
class SavedModel(Protocol):
    """What a saved model answers, whichever kind it is.

    Attributes:
        classes: the class names it was trained on.
        provenance: how its inputs were made (backbone, weights and their sha256,
            preprocessing, layer or map, ...).
        MATCH_KEYS: the fields of ``provenance`` that features or images must share with it.
    """

    classes: list
    provenance: dict
    MATCH_KEYS: tuple

    def check_compatible(self, provenance: dict, what: str = "the features") -> None:
        """Refuse inputs made otherwise; the :class:`~featurecache.errors.HeadError` names
        the first field of ``MATCH_KEYS`` that differs, and both values."""

    def evaluate(self, features, split: str = "test") -> dict:
        """Scores on ``split`` of a feature file made as its training inputs were:
        ``{feature_file, split, n, accuracy, balanced_accuracy, macro_f1}``."""

    def image_scorer(self):
        """An :class:`~featurecache.extract.ImageScorer` that scores batches of images."""

    def exportable(self):
        """An :class:`~featurecache.export.Exportable` (images -> class scores, as torch
        modules), or :class:`~featurecache.errors.ExportError` saying why it cannot be."""

    def describe(self) -> str:
        """What it is, in a phrase (``logreg head on avgpool``)."""


def is_finetuned_path(path) -> bool:
    """Whether ``path`` names a fine-tuned model: a folder (a fine-tune's, holding
    ``model.pt``; heads are files) or a ``.pt`` file."""
    p = Path(path)
    return p.is_dir() or p.suffix == ".pt"


def load_model(path) -> SavedModel:
    """Load the saved model at ``path``: a head file (``.joblib``, ``.skops``) or a fine-tune
    (its folder or ``model.pt``). A model already loaded is returned as it is.

    joblib head files are pickles: only load trusted ones (see :mod:`featurecache.persist`).

    Raises:
        HeadError: the file is missing, unreadable, untrusted, damaged or not a featurecache
            model (as :func:`~featurecache.persist.load_head` and
            :func:`~featurecache.checkpoint.load_finetuned` say).
    """
    if isinstance(path, SavedModel):
        return path
    if is_finetuned_path(path):
        from .checkpoint import load_finetuned

        return load_finetuned(path)
    from .persist import load_head

    return load_head(path)
