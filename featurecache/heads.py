"""Stage 2: shallow scikit-learn heads on stored features, chosen by cross-validation.

Head kinds: ``logreg`` (logistic regression), ``svm`` (linear or rbf kernel), ``knn``
(cosine k-NN with temperature-weighted votes) and ``mlp`` (one hidden layer); how each is built is in
:mod:`featurecache.estimators`, how its hyperparameters are searched in
:mod:`featurecache.search` (C = 1e-6 .. 1e6 walked with early stopping, then quarter-decades
around the best; stratified k-fold CV on the train split, or a ``val`` split when the file
has one; balanced accuracy by default). The winner is refit on all training rows.

The fitted head is saved with joblib together with what it needs to be trusted later: the
layer, the backbone and weights hash, preprocessing and pooling, classes and CV results.
**joblib files are pickles: load only heads you trust.**

Example::

    >>> ff = open_features("feats.h5")                                   # doctest: +SKIP
    >>> head = fit_head(ff, "avgpool", "logreg")                         # doctest: +SKIP
    >>> head.params_, round(head.cv_score_, 3)                           # doctest: +SKIP
    ({'C': 0.1}, 0.947)
    >>> head.save("heads/avgpool-logreg.joblib")                         # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import warnings

import joblib
import numpy as np

from . import versions
from .errors import DataWarning, HeadError
from .kinds import get as get_kind
from .options import validated
from .persist import Head, load_head
from .search import (HEAD_KINDS, KERNELS, MLP_WIDTHS, SCORINGS, coarse_grid,
                     make_folds, search_layers)

__all__ = ["Head", "fit_head", "fit_heads", "training_data", "load_head", "search", "refit",
           "HEAD_KINDS", "KERNELS", "SCORINGS", "coarse_grid"]

def refit(X, y, kind: str, params: dict, *, kernel: str = "linear", class_weight=None,
          seed: int = 0, probability: bool = False, solver_rows: int | None = None):
    """Fit the pipeline of ``kind`` with ``params`` on all of ``X, y``.

    ``solver_rows``: pick the linear SVM's solver as for this many rows (few-shot refits use
    the solver the hyperparameters were searched with); default ``len(y)``."""
    from sklearn.exceptions import ConvergenceWarning

    from .kinds import Fit, get

    k = get(kind)
    X = np.asarray(X, dtype=k.dtype)  # the kind's dtype, as in its CV
    fit = Fit(kernel=kernel, class_weight=class_weight, seed=seed, n_rows=len(y),
              n_features=X.shape[1], probability=probability, solver_rows=solver_rows, y=y)
    pipe = k.pipeline(params, fit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return pipe.fit(X, y, **{f"clf__{n}": v for n, v in k.fit_params(fit).items()})


def search(X, y, kind: str = "logreg", kernel: str = "linear", *, folds=None, cv: int = 5,
           scoring: str = "balanced_accuracy", class_weight=None, seed: int = 0, n_jobs=-1,
           probability: bool = False, early_stop: bool = True, mlp_widths=MLP_WIDTHS):
    """Search one head kind on one matrix and refit the winner.

    Returns ``(fitted pipeline, best params, best CV score, cv table)``; the table has one row
    per grid point (see :class:`~featurecache.search.SearchResult`).
    """
    y = np.asarray(y)  # (search_layers checks the kind, kernel and scoring)
    if folds is None:
        folds = make_folds(y, cv, seed)
    res = search_layers({"X": X}, y, [kind], folds=folds, kernel=kernel, scoring=scoring,
                        class_weight=class_weight, seed=seed, early_stop=early_stop,
                        n_jobs=n_jobs, mlp_widths=mlp_widths)[("X", kind)]
    pipe = refit(X, y, kind, res.params, kernel=kernel, class_weight=class_weight, seed=seed,
                 probability=probability)
    return pipe, res.params, res.score, res.table


def training_data(ff, layer: str, *, cv: int = 5, seed: int = 0):
    """``(X, y, folds, description)`` for fitting a head on ``layer`` of a feature file.

    The train split with stratified ``cv``-fold CV; when the file has a ``val`` split, the
    rows are train + val and the one fold is (train, val).
    """
    X, y = ff.X(layer, "train"), ff.y("train")
    if "val" in set(ff.splits()):
        Xv, yv = ff.X(layer, "val"), ff.y("val")
        folds = [(np.arange(len(y)), np.arange(len(y), len(y) + len(yv)))]
        return np.concatenate([X, Xv]), np.concatenate([y, yv]), folds, "val split"
    folds = make_folds(y, cv, seed)
    return X, y, folds, f"stratified {len(folds)}-fold"


def cv_plan(ff, *, cv: int = 5, seed: int = 0) -> tuple:
    """``(training rows, folds)`` that :func:`training_data` gives for ``ff``, from its
    splits and labels only (no feature is read)."""
    splits = ff.splits()
    if "val" in set(splits):
        return splits.count("train") + splits.count("val"), 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # training_data says it when it fits
        return splits.count("train"), len(make_folds(ff.y("train"), cv, seed))


def fit_heads(jobs: dict, kinds, *, kernel: str = "linear", cv: int = 5,
              scoring: str = "balanced_accuracy", class_weight=None, seed: int = 0, n_jobs=-1,
              probability: bool = False, early_stop: bool = True, progress=None,
              client=None, mlp_widths=MLP_WIDTHS) -> dict:
    """Search and refit every head kind on every ``(feature file, layer)`` in ``jobs``.

    ``jobs`` maps a key to ``(FeatureFile, layer)``; every job must hold the same training
    rows (same labels), so all are scored on the same folds. One joblib pool runs the folds of
    all jobs, another the refits; with a Dask ``client``, on its workers (each array
    scattered once). Returns ``{(key, kind): Head}``.
    """

    Xs, y, folds, how = {}, None, None, ""  # (the callers checked every option: validated)
    for key, (ff, layer) in jobs.items():
        ff.check_complete()
        ff.check_layer(layer)
        X, yk, fk, how = training_data(ff, layer, cv=cv, seed=seed)
        absent = [c for i, c in enumerate(ff.classes) if i not in set(yk.tolist())]
        if absent:
            raise HeadError(f"classes {absent} of {ff.path} have no training rows (they occur "
                            f"only in other splits); a head cannot learn them. Add training "
                            f"images of them, or leave them out of the data.")
        if y is None:
            y, folds = yk, fk
        elif not np.array_equal(y, yk):
            raise HeadError(f"{ff.path} holds other training rows than the first file; heads "
                            f"can only be compared on the same images.")
        Xs[key] = np.ascontiguousarray(X, dtype=np.float32)  # the arrays every task reads
    if client is not None:
        from .distribute import joblib_on
    with joblib_on(client, [*Xs.values(), y]) if client is not None else contextlib.nullcontext():
        results = search_layers(Xs, y, kinds, folds=folds, kernel=kernel, scoring=scoring,
                                class_weight=class_weight, seed=seed, early_stop=early_stop,
                                n_jobs=n_jobs, progress=progress, mlp_widths=mlp_widths)
        order = list(results)
        pipes = joblib.Parallel(n_jobs=n_jobs)(
            joblib.delayed(refit)(Xs[key], y, get_kind(kind), results[(key, kind)].params,
                                  kernel=kernel,
                                  class_weight=class_weight, seed=seed, probability=probability)
            for key, kind in order)
    from .store.layout import created_now  # the one UTC timestamp (SOURCE_DATE_EPOCH aware)

    created, v = created_now(), versions("scikit-learn")
    heads = {}
    for (key, kind), pipe in zip(order, pipes):
        ff, layer = jobs[key]
        res = results[(key, kind)]
        meta = {"created": created, "featurecache_version": v["featurecache"],
                "sklearn_version": v["scikit-learn"], "feature_file": str(ff.path),
                "n_train": int(len(y)), "class_weight": class_weight, "seed": seed, "cv": how,
                "cv_fold_scores": res.folds, "cv_std": res.std,
                "refit_on": "train + val" if how == "val split" else "train",
                "estimator": type(pipe[-1]).__name__}
        if _no_signal(res, y, scoring):
            meta["no_signal"] = True
            warnings.warn(DataWarning(
                f"{kind} on {layer}: every hyperparameter tried scored the same CV {scoring} "
                f"({res.score:.3f}, chance level): the features carry no signal for these "
                f"labels, or the labels are shuffled. Its predictions are guesses."))
        heads[(key, kind)] = Head(pipe, kind, kernel, layer, list(ff.classes),
                                  ff.layer_provenance(layer), res.params, res.score, res.table,
                                  scoring, meta)
    return heads


def _no_signal(res, y, scoring: str) -> bool:
    """Every grid point tied, at chance level (1/k balanced; the largest class's share for
    accuracy): no hyperparameter found anything to fit."""
    scores = {round(r["mean"], 12) for r in res.table if r["status"] == "evaluated"}
    counts = np.bincount(y)
    counts = counts[counts > 0]
    chance = counts.max() / counts.sum() if scoring == "accuracy" else 1 / len(counts)
    return len(scores) == 1 and len(res.table) > 1 and res.score <= chance + 0.05


class Progress:
    """A progress bar of CV tasks (folds x search stages) for ``progress=`` callbacks."""

    def __init__(self, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, desc=desc, unit="fold", dynamic_ncols=True)

    def update(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@validated("fit_head")
def fit_head(features, layer: str, kind: str = "logreg", *, kernel: str = "linear",
             cv: int = 5, scoring: str = "balanced_accuracy", class_weight: str | None = "none",
             seed: int = 0,
             n_jobs=-1, probability: bool = False, progress: bool = False,
             mlp_widths=MLP_WIDTHS) -> Head:
    """Search, refit and return a head on ``layer`` of a feature file.

    Args:
        features: a :class:`~featurecache.store.FeatureFile` or a path to one.
        layer: a stored layer, or several joined with ``+`` (their columns concatenated).
        kind: ``logreg``, ``svm``, ``knn`` or ``mlp``; ``kernel``: ``linear`` or ``rbf``
            (svm only); ``mlp_widths``: the hidden widths the mlp searches.
        cv: folds of the stratified CV on the train split (a ``val`` split, when the file has
            one, is used instead).
        scoring: the CV score that picks the hyperparameters: ``balanced_accuracy``,
            ``accuracy`` or ``f1_macro``.
        class_weight: ``"none"`` (or None) or ``"balanced"``.
        n_jobs: parallel CV folds (joblib; -1: all cores).
        probability: calibrate SVM probability estimates (sigmoid, by CV; slower).
        progress: show a progress bar of the CV folds on stderr.

    Raises:
        UnknownLayerError: the layer is not stored (the message lists the stored ones).
        HeadError: an unknown kind, or too few classes or rows to search.
    """
    from .options import class_weight as sklearn_class_weight
    from .store import FeatureFile, open_features

    class_weight = sklearn_class_weight(class_weight)  # every option checked: validated
    ff = features if isinstance(features, FeatureFile) else open_features(features)
    bar = Progress(progress, f"fit-head {kind} on {layer} (CV)")
    try:
        return fit_heads({layer: (ff, layer)}, [kind], kernel=kernel, cv=cv, scoring=scoring,
                         class_weight=class_weight, seed=seed, n_jobs=n_jobs,
                         probability=probability, progress=bar.update,
                         mlp_widths=mlp_widths)[(layer, kind)]
    finally:
        bar.close()
