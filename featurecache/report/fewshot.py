"""The few-shot curve of a comparison: each row refit on k train images per class.

"How many labels do I need?": every (backbone, layer, head) row is refit with the
hyperparameters its CV chose, on seeded draws of k train images per class, and scored on the
test split (after the winner was chosen).
"""

from __future__ import annotations

import numpy as np

from ..errors import OptionError

__all__ = ["check_shots", "feasible_shots", "refit_few_shot"]


def feasible_shots(shots, y_train) -> list:
    """Drop few-shot sizes that no class can fill (they would repeat "all" under another
    name), and say which sizes some classes cannot fill (those use all their images)."""
    import warnings

    from ..errors import DataWarning

    counts = np.bincount(y_train)
    counts = counts[counts > 0]
    too_big = [k for k in shots if k != "all" and k >= counts.max()]
    partly = [k for k in shots if k != "all" and counts.min() < k < counts.max()]
    if too_big:
        warnings.warn(DataWarning(
            f"shots {too_big}: no class has more than {counts.max()} training images, so these "
            f"sizes would be the whole train split; left out (the 'all' size covers it)."))
    if partly:
        warnings.warn(DataWarning(
            f"shots {partly}: the smallest class has {counts.min()} training images; at these "
            f"sizes classes with fewer use all of theirs."))
    return [k for k in shots if k not in too_big]


def check_shots(shots, repeats) -> list:
    out = []
    for s in shots or ():
        if str(s).strip().lower() == "all":
            out.append("all")
            continue
        try:
            k = int(s)
        except (TypeError, ValueError):
            k = 0
        if k < 1:
            raise OptionError(f"shots must be positive whole numbers or 'all'; got {s!r}.")
        out.append(k)
    if out and repeats < 1:
        raise OptionError(f"repeats must be at least 1; got {repeats}.")
    return sorted(set(out), key=lambda s: (s == "all", s if s != "all" else 0))


def refit_few_shot(rows, jobs, y_test, X_test, shots, repeats, kernel, class_weight, seed,
                   metric, n_jobs) -> list:
    """Each row's few-shot curve ``{shots: {mean, std, n}}``: refit with its chosen
    hyperparameters on k train images per class, ``repeats`` seeded draws of each k; the
    ``all`` point is the row's own test score."""
    import joblib

    from ..heads import refit
    from ..stats import few_shot_indices, point_metrics

    first = jobs[next(iter(jobs))][0]
    y_train, n_classes = first.y("train"), len(first.classes)
    X_train = {key: ff.X(layer, "train") for key, (ff, layer) in jobs.items()}
    tasks = [(j, k, rep) for j in range(len(rows)) for k in shots if k != "all"
             for rep in range(repeats)]

    def one(j, k, rep):
        r = rows[j]
        key = (r["backbone"], r["layer"])
        idx = few_shot_indices(y_train, k, seed, rep)
        pipe = refit(X_train[key][idx], y_train[idx], r["head"], r["params"], kernel=kernel,
                     class_weight=class_weight, seed=seed, solver_rows=len(y_train))
        p = pipe.predict(np.asarray(X_test[key], dtype=np.float32))
        return point_metrics(y_test, p, n_classes)[metric]

    scores = joblib.Parallel(n_jobs=n_jobs, prefer="threads")(
        joblib.delayed(one)(*t) for t in tasks)
    got = {}
    for (j, k, _), s in zip(tasks, scores):
        got.setdefault((j, k), []).append(float(s))
    return [{str(k): ({"mean": r[metric], "std": 0.0, "n": 1} if k == "all" else
                      {"mean": float(np.mean(got[(j, k)])), "std": float(np.std(got[(j, k)])),
                       "n": repeats})
             for k in shots} for j, r in enumerate(rows)]
