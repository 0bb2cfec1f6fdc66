"""Test-set statistics for the report: metrics, vectorised (paired) bootstrap, few-shot draws.

The bootstrap resamples the test rows with replacement ``n_boot`` times and recomputes each
metric from per-resample counts with numpy (milliseconds, not a Python loop over sklearn
calls). Every model is scored on the **same** resamples, so the difference between two models
is a paired bootstrap: the interval of ``metric(A) - metric(B)`` over resamples.
"""

from __future__ import annotations

import numpy as np

__all__ = ["METRICS", "metric_values", "point_metrics", "bootstrap", "interval", "paired_difference",
           "few_shot_indices", "SCORING_METRIC"]

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
# the test metric that matches each CV scoring
SCORING_METRIC = {"accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy",
                  "f1_macro": "macro_f1"}


def metric_values(W, y, pred, n_classes: int) -> dict:
    """Each metric for every row of ``W`` ((b, n) weights of the n test rows, e.g. counts).

    Same definitions as scikit-learn's ``accuracy_score``, ``balanced_accuracy_score``
    (mean recall over classes present in ``y``) and ``f1_score(average="macro")`` (over the
    classes present in ``y`` or ``pred``; 0 for a present class with no true positive).
    """
    W = np.asarray(W, dtype=np.float64)
    y, pred = np.asarray(y), np.asarray(pred)
    eye = np.eye(n_classes)
    correct = (y == pred).astype(np.float64)
    Y, P = eye[y], eye[pred]
    support, predicted = W @ Y, W @ P          # (b, C)
    tp = W @ (Y * correct[:, None])            # (b, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        present = (support + predicted) > 0
        f1 = np.where(present, 2 * tp / (support + predicted), np.nan)
        return {"accuracy": (W @ correct) / W.sum(1),
                "balanced_accuracy": np.nanmean(recall, axis=1),
                "macro_f1": np.nanmean(f1, axis=1)}


def point_metrics(y, pred, n_classes: int) -> dict:
    """``{metric: float}`` of one model's predictions on all the rows (each row once)."""
    return {k: float(v[0]) for k, v in metric_values(np.ones((1, len(y))), y, pred,
                                                      n_classes).items()}


def bootstrap(y, preds, n_classes: int, n_boot: int = 1000, seed: int = 0,
              chunk_cells: int = 4_000_000) -> dict:
    """Metric values of every model on ``n_boot`` resamples of the test rows.

    Args:
        y: ``(n,)`` true class indices.
        preds: ``(m, n)`` predictions of ``m`` models on the same rows.

    Returns:
        ``{metric: (n_boot, m) array}``; column j is model j, row i resample i (the same rows
        for every model, so columns can be compared pairwise).
    """
    y = np.asarray(y)
    preds = np.atleast_2d(np.asarray(preds))
    n = len(y)
    rng = np.random.default_rng(seed)
    out = {k: np.empty((n_boot, len(preds))) for k in METRICS}
    step = max(1, chunk_cells // max(n, 1))
    for s in range(0, n_boot, step):
        b = min(step, n_boot - s)
        idx = np.stack([rng.integers(0, n, n) for _ in range(b)])  # one draw per resample
        W = np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        for j, p in enumerate(preds):
            for k, v in metric_values(W, y, p, n_classes).items():
                out[k][s:s + b, j] = v
    return out


def interval(samples, level: float = 0.95) -> tuple:
    """Percentile interval of bootstrap samples (along axis 0)."""
    a = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(samples, [a, 100 - a], axis=0)
    return lo, hi


def paired_difference(samples_a, samples_b, level: float = 0.95) -> dict:
    """Paired bootstrap of ``A - B`` over the same resamples: interval and the share of
    resamples where A does not beat B."""
    d = np.asarray(samples_a) - np.asarray(samples_b)
    lo, hi = interval(d, level)
    return {"lo": float(lo), "hi": float(hi), "p_not_better": float(np.mean(d <= 0))}


def few_shot_indices(y, shots: int, seed: int, repeat: int) -> np.ndarray:
    """Indices of ``shots`` rows per class (all of a class that has fewer), drawn without
    replacement; seeded by (seed, repeat, shots), so every layer and head gets the same draw."""
    y = np.asarray(y)
    rng = np.random.default_rng([seed, repeat, shots])
    picks = [rng.choice(np.flatnonzero(y == c), min(shots, int((y == c).sum())), replace=False)
             for c in np.unique(y)]
    return np.sort(np.concatenate(picks))
