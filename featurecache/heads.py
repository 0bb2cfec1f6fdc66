"""Stage 2: shallow scikit-learn heads on stored features, with a real hyperparameter search.

A head is ``Pipeline(StandardScaler, LogisticRegression | SVC(linear or rbf) | LinearSVC)``
(LinearSVC for linear SVMs with more rows than features). The
search follows the linear-probe protocols (CLIP appendix A.3; Kornblith et al. 2019): the
best ``C`` spans many decades across data sets, so a coarse sweep over ``1e-6 .. 1e6``
comes first, then a finer sweep around the best decade (and ``gamma`` for rbf). Candidates
are scored by stratified k-fold CV on the train split (or on a ``val`` split when the file
has one); the winner is refit on all training rows. Logistic regression warm-starts along
the ``C`` path inside each fold. Folds run in parallel through joblib, so a Dask cluster can
take them with ``joblib.parallel_backend("dask")``.

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

import datetime
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import joblib
import numpy as np
import sklearn
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import get_scorer
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from . import __version__
from .errors import HeadError

__all__ = ["Head", "fit_head", "load_head", "search", "HEAD_KINDS", "coarse_grid"]

HEAD_KINDS = ("logreg", "svm")
KERNELS = ("linear", "rbf")
_FORMAT = "featurecache-head"
_FORMAT_VERSION = 1
# provenance fields a head and a feature file (or an image pipeline) must agree on
_MATCH_KEYS = ("backbone", "weights", "weights_sha256", "preprocess", "specs")
# Linear SVMs: with no more rows than features the data are separable and libsvm's
# SVC(kernel="linear") solves the small n x n dual fast at every C (20x faster than LinearSVC
# on 365 x 1,280); with more rows, liblinear's LinearSVC (primal, linear in the rows).
# libsvm gets an iteration cap, since at C = 1e6 on non-separable data it can run for hours.
_SVC_MAX_ITER = 1_000_000


def coarse_grid(kind: str, kernel: str, n_features: int) -> list[dict]:
    """First sweep: C = 1e-6 .. 1e6 (one point a decade); rbf adds gamma around 1/n_features."""
    cs = [10.0 ** e for e in range(-6, 7)]
    if kind == "svm" and kernel == "rbf":
        gammas = [10.0 ** e / n_features for e in (-2, -1, 0, 1)]
        return [{"C": c, "gamma": g} for g in gammas for c in cs]
    return [{"C": c} for c in cs]


def _fine_grid(best: dict) -> list[dict]:
    """Second sweep: quarter-decade steps around the best C (other params kept)."""
    return [{**best, "C": best["C"] * 10.0 ** s} for s in (-0.75, -0.5, -0.25, 0.25, 0.5, 0.75)]


def _estimator(kind: str, kernel: str, class_weight, seed: int, shape: tuple) -> Pipeline:
    if kind == "logreg":
        clf = LogisticRegression(max_iter=300, tol=1e-3, class_weight=class_weight,
                                 random_state=seed, warm_start=True)
    elif kernel == "linear" and shape[0] > shape[1]:
        clf = LinearSVC(class_weight=class_weight, random_state=seed, max_iter=2000, tol=1e-3)
    else:
        clf = SVC(kernel=kernel, class_weight=class_weight, random_state=seed,
                  max_iter=_SVC_MAX_ITER)
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def _fold_scores(est, X, y, train, test, grid, scorer):
    """Fit every candidate on one fold, in grid order (so logreg warm-starts along C)."""
    est = clone(est)
    scores = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for params in grid:
            est.set_params(**{f"clf__{k}": v for k, v in params.items()})
            est.fit(X[train], y[train])
            scores.append(scorer(est, X[test], y[test]))
    return scores


def search(X, y, kind: str = "logreg", kernel: str = "linear", folds=None, cv: int = 5,
           scoring: str = "accuracy", class_weight=None, seed: int = 0, n_jobs=None,
           probability: bool = False):
    """Two-stage CV search; returns ``(refit pipeline, best params, best score, cv table)``.

    ``folds`` is a list of ``(train_idx, test_idx)``; by default stratified ``cv``-fold.
    The cv table has one row per grid point: ``{stage, params, mean, std, folds}``.
    """
    if kind not in HEAD_KINDS:
        raise HeadError(f"head {kind!r} is not one of {', '.join(HEAD_KINDS)}.")
    if kernel not in KERNELS:
        raise HeadError(f"kernel {kernel!r} is not one of {', '.join(KERNELS)}.")
    X = np.asarray(X, dtype=np.float32)  # float16 features are upcast before fitting
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise HeadError(f"the training rows hold a single class ({classes.tolist()}); a head "
                        f"needs at least two.")
    if folds is None:
        k = min(cv, int(counts.min()))
        if k < 2:
            raise HeadError(f"a class has only {counts.min()} training row(s); stratified CV needs "
                            f"at least 2 per class.")
        folds = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(X, y))
    est = _estimator(kind, kernel, class_weight, seed, X.shape)
    scorer = get_scorer(scoring)
    table = []
    grid = coarse_grid(kind, kernel, X.shape[1])
    for stage in (1, 2):
        per_fold = joblib.Parallel(n_jobs=n_jobs)(
            joblib.delayed(_fold_scores)(est, X, y, tr, te, grid, scorer) for tr, te in folds)
        scores = np.array(per_fold)  # (folds, candidates)
        for j, params in enumerate(grid):
            table.append({"stage": stage, "params": params, "mean": float(scores[:, j].mean()),
                          "std": float(scores[:, j].std()), "folds": scores[:, j].tolist()})
        # first best wins ties: the smallest C, i.e. the most regularised head
        best = max(table, key=lambda r: r["mean"])
        if stage == 1:
            grid = _fine_grid(best["params"])
    best = max(table, key=lambda r: r["mean"])
    final = clone(est).set_params(**{f"clf__{k}": v for k, v in best["params"].items()})
    if probability and kind == "svm":  # sklearn's replacement for SVC(probability=True)
        final.steps[-1] = ("clf", CalibratedClassifierCV(final[-1], ensemble=False,
                                                         cv=min(5, int(counts.min()))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        final.fit(X, y)
    return final, best["params"], best["mean"], table


@dataclass
class Head:
    """A fitted head plus what it needs to be checked against features or images.

    Attributes end in ``_`` when they come from fitting (sklearn's convention).
    """

    pipeline_: Pipeline
    kind: str
    kernel: str
    layer: str
    classes: list
    provenance: dict               # backbone, weights, weights_sha256, preprocess, specs, ...
    params_: dict
    cv_score_: float
    cv_results_: list
    scoring: str = "accuracy"
    meta: dict = field(default_factory=dict)

    def features(self, X) -> np.ndarray:
        return np.asarray(X, dtype=np.float32)

    def predict(self, X) -> np.ndarray:
        return self.pipeline_.predict(self.features(X))

    def predict_proba(self, X) -> np.ndarray | None:
        """Class probabilities, or None for an SVM fitted without ``probability``."""
        if not hasattr(self.pipeline_[-1], "predict_proba"):
            return None
        return self.pipeline_.predict_proba(self.features(X))

    def scores(self, X) -> np.ndarray:
        """``(n, n_classes)`` scores: probabilities when available, else decision values."""
        p = self.predict_proba(X)
        if p is not None:
            return p
        d = self.pipeline_.decision_function(self.features(X))
        return np.stack([-d, d], 1) if d.ndim == 1 else d

    def check_compatible(self, provenance: dict, what: str = "the features") -> None:
        """Refuse features (or an image pipeline) made differently from this head's training.

        Raises:
            HeadError: naming the first field that differs.
        """
        for key in _MATCH_KEYS:
            mine, theirs = self.provenance.get(key), provenance.get(key)
            if key == "specs":
                mine = [{k: s[k] for k in ("node", "kind", "pool", "dim")} for s in mine or []]
                theirs = [{k: s[k] for k in ("node", "kind", "pool", "dim")} for s in theirs or []]
            if mine != theirs:
                raise HeadError(f"this head was trained on layer {self.layer!r} with {key} = "
                                f"{mine!r}, but {what} have {key} = {theirs!r}.")

    def save(self, path) -> Path:
        path = Path(path)
        if not path.parent.is_dir():
            raise HeadError(f"folder {path.parent} does not exist; create it first.")
        joblib.dump({"format": _FORMAT, "format_version": _FORMAT_VERSION,
                     **{k: getattr(self, k) for k in self.__dataclass_fields__}}, path)
        return path


def _min_count(y) -> int:
    return int(np.unique(y, return_counts=True)[1].min())


def load_head(path) -> Head:
    """Load a head saved by :meth:`Head.save`. joblib files are pickles: only load trusted ones.

    Raises:
        HeadError: the file is missing, unreadable, or not a featurecache head.
    """
    path = Path(path)
    if not path.is_file():
        raise HeadError(f"head file {path} does not exist.")
    try:
        data = joblib.load(path)
    except Exception as exc:  # noqa: BLE001 - unpickling fails in many ways
        raise HeadError(f"cannot read {path} as a joblib file ({type(exc).__name__}: {exc}).") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise HeadError(f"{path} is not a featurecache head (make one with `featurecache fit-head`).")
    if data["format_version"] != _FORMAT_VERSION:
        raise HeadError(f"{path} is head format {data['format_version']}; this featurecache reads "
                        f"{_FORMAT_VERSION}. Fit it again.")
    return Head(**{k: data[k] for k in Head.__dataclass_fields__})


def fit_head(features, layer: str, kind: str = "logreg", kernel: str = "linear",
             cv: int = 5, scoring: str = "accuracy", class_weight=None, seed: int = 0,
             n_jobs=None, probability: bool = False) -> Head:
    """Search, refit and return a head on ``layer`` of a feature file.

    Args:
        features: a :class:`~featurecache.store.FeatureFile` or a path to one.
        layer: a stored layer, or several joined with ``+`` (their columns concatenated).
        kind: ``logreg`` or ``svm``; ``kernel``: ``linear`` or ``rbf`` (svm only).
        cv: folds of the stratified CV on the train split (a ``val`` split, when the file has
            one, is used instead).
        class_weight: ``None`` or ``"balanced"``.
        probability: calibrate SVM probability estimates (sigmoid, by CV; slower).

    Raises:
        UnknownLayerError: the layer is not stored (the message lists the stored ones).
        HeadError: too few classes or rows to search.
    """
    from .store import FeatureFile, open_features

    ff = features if isinstance(features, FeatureFile) else open_features(features)
    ff.check_layer(layer)
    X, y = ff.X(layer, "train"), ff.y("train")
    folds = None
    if "val" in set(ff.splits()):
        Xv, yv = ff.X(layer, "val"), ff.y("val")
        folds = [(np.arange(len(y)), np.arange(len(y), len(y) + len(yv)))]
        X, y = np.concatenate([X, Xv]), np.concatenate([y, yv])
    pipe, params, score, table = search(X, y, kind, kernel, folds=folds, cv=cv, scoring=scoring,
                                        class_weight=class_weight, seed=seed, n_jobs=n_jobs,
                                        probability=probability)
    meta = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "featurecache_version": __version__, "sklearn_version": sklearn.__version__,
            "feature_file": str(ff.path), "n_train": int(len(y)), "class_weight": class_weight,
            "seed": seed,
            "cv": "val split" if folds else f"stratified {min(cv, _min_count(y))}-fold",
            "refit_on": "train + val" if folds else "train",
            "estimator": type(pipe[-1]).__name__}
    return Head(pipe, kind, kernel, layer, list(ff.classes), ff.layer_provenance(layer), params,
                score, table, scoring, meta)
