"""The CV scorings: their names (the ``scoring`` option's choices) and the score of predictions.

A leaf, cheap to import (scikit-learn is imported on the first score): :mod:`featurecache.options`
takes the names from here, the head kinds' fold scorers and the search the score.
"""

from __future__ import annotations

import warnings

from .errors import HeadOptionError

__all__ = ["SCORINGS", "score_predictions"]

SCORINGS = ("balanced_accuracy", "accuracy", "f1_macro")


def score_predictions(scoring: str, y_true, y_pred) -> float:
    """The CV score of predictions: balanced accuracy, accuracy or macro-F1."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    if scoring == "balanced_accuracy":
        with warnings.catch_warnings():  # a fold may predict a class it does not hold
            warnings.simplefilter("ignore")
            return float(balanced_accuracy_score(y_true, y_pred))
    if scoring == "accuracy":
        return float(accuracy_score(y_true, y_pred))
    if scoring == "f1_macro":
        return float(f1_score(y_true, y_pred, average="macro", zero_division=0))
    raise HeadOptionError(f"scoring {scoring!r} is not one of {', '.join(SCORINGS)}.")
