"""The test split, read once after the choice: metrics with bootstrap intervals, the winner's
lead over the runner-up and each fine-tune's margin over the best frozen head (paired
bootstrap on the same resamples)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..stats import METRICS, bootstrap, interval, paired_difference, point_metrics
from .rows import Interval

__all__ = ["score_on_test"]


def score_on_test(rows, preds, y_test, n_classes: int, *, metric: str, n_boot: int, seed: int,
                  winner: int, best_frozen: int, runner: int | None) -> list:
    """New rows with their test scores (``preds[j]``: row j's predictions on the test rows);
    ``winner``, ``best_frozen`` and ``runner`` are row numbers fixed before this call."""
    samples = bootstrap(y_test, preds, n_classes, n_boot, seed)
    point = [point_metrics(y_test, p, n_classes) for p in preds]
    out = []
    for j, r in enumerate(rows):
        test = {m: Interval(float(point[j][m]), *map(float, interval(samples[m][:, j])))
                for m in METRICS}
        out.append(replace(r, test=test))

    def against(j, k, key):
        diff = paired_difference(samples[metric][:, j], samples[metric][:, k])
        return {key: out[k].name, "metric": metric,
                "difference": out[j].test[metric].value - out[k].test[metric].value, **diff}

    if runner is not None:
        out[winner] = replace(out[winner], lead_over_runner_up=against(winner, runner, "runner_up"))
    for j, r in enumerate(out):
        if r.tuned:
            out[j] = replace(r, margin_over_frozen=against(j, best_frozen, "best_frozen"))
    return out


def per_class_recall(y_test, preds, n_classes: int) -> np.ndarray:
    """``(rows, classes)`` recall of each row's predictions per class (NaN: no test image)."""
    y = np.asarray(y_test)
    support = np.bincount(y, minlength=n_classes).astype(float)
    hits = np.stack([np.bincount(y[p == y], minlength=n_classes) for p in np.asarray(preds)])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, hits / support, np.nan)
