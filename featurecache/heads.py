"""Stage 2: shallow scikit-learn heads on stored features, chosen by cross-validation.

Head kinds: ``logreg`` (logistic regression), ``svm`` (linear or rbf kernel) and ``knn``
(cosine k-NN with temperature-weighted votes); how each is built is in
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

import warnings
from dataclasses import MISSING, dataclass, field
from pathlib import Path

import joblib
import numpy as np

from . import __version__
from .errors import DataWarning, HeadError
from .search import (HEAD_KINDS, KERNELS, SCORINGS, check_options, coarse_grid, make_folds,
                     search_layers)

__all__ = ["Head", "fit_head", "fit_heads", "training_data", "load_head", "search", "refit",
           "HEAD_KINDS", "KERNELS", "SCORINGS", "coarse_grid"]

# provenance fields a head and a feature file (or an image pipeline) must agree on
_MATCH_KEYS = ("backbone", "weights", "weights_sha256", "preprocess", "specs")


def refit(X, y, kind: str, params: dict, *, kernel: str = "linear", class_weight=None,
          seed: int = 0, probability: bool = False, solver_rows: int | None = None):
    """Fit the pipeline of ``kind`` with ``params`` on all of ``X, y``.

    ``solver_rows``: pick the linear SVM's solver as for this many rows (few-shot refits use
    the solver the hyperparameters were searched with); default ``len(y)``."""
    from sklearn.exceptions import ConvergenceWarning

    from .estimators import make_estimator

    X = np.asarray(X, dtype=np.float32)
    from .search import use_gram

    pipe = make_estimator(kind, params, kernel=kernel, class_weight=class_weight, seed=seed,
                          n_rows=len(y), n_features=X.shape[1], probability=probability,
                          gram=use_gram(len(y) if solver_rows is None else solver_rows,
                                        X.shape[1]))
    if probability and kind == "svm":
        pipe.set_params(clf__cv=min(5, _min_count(y)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return pipe.fit(X, y)


def search(X, y, kind: str = "logreg", kernel: str = "linear", *, folds=None, cv: int = 5,
           scoring: str = "balanced_accuracy", class_weight=None, seed: int = 0, n_jobs=-1,
           probability: bool = False, early_stop: bool = True):
    """Search one head kind on one matrix and refit the winner.

    Returns ``(fitted pipeline, best params, best CV score, cv table)``; the table has one row
    per grid point (see :class:`~featurecache.search.SearchResult`).
    """
    check_options([kind], kernel, scoring)
    y = np.asarray(y)
    if folds is None:
        folds = make_folds(y, cv, seed)
    res = search_layers({"X": X}, y, [kind], folds=folds, kernel=kernel, scoring=scoring,
                        class_weight=class_weight, seed=seed, early_stop=early_stop,
                        n_jobs=n_jobs)[("X", kind)]
    pipe = refit(X, y, kind, res.params, kernel=kernel, class_weight=class_weight, seed=seed,
                 probability=probability)
    return pipe, res.params, res.score, res.table


@dataclass
class Head:
    """A fitted head plus what it needs to be checked against features or images.

    Attributes end in ``_`` when they come from fitting (sklearn's convention).
    """

    pipeline_: object              # sklearn Pipeline(StandardScaler, estimator)
    kind: str
    kernel: str
    layer: str
    classes: list
    provenance: dict               # backbone, weights, weights_sha256, preprocess, specs, ...
    params_: dict
    cv_score_: float
    cv_results_: list
    scoring: str = "balanced_accuracy"
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
                                f"{mine!r}, but for {what}, {key} = {theirs!r}.")

    @property
    def column_classes(self) -> list:
        """Class names in the order of the columns of :meth:`scores` / :meth:`predict_proba`
        (the fitted estimator's ``classes_``, which index :attr:`classes`)."""
        return [self.classes[int(i)] for i in self.pipeline_.classes_]

    def evaluate(self, features, split: str = "test") -> dict:
        """Score this head on ``split`` of a feature file made the same way.

        Returns ``{n, accuracy, balanced_accuracy, macro_f1, split, feature_file}``.

        Raises:
            HeadError: the file was made differently (names the field), lacks the layer, or
                holds classes this head does not know.
            StoreError: the file is unfinished or has no such split.
        """
        from .stats import metric_values
        from .store import FeatureFile, open_features

        ff = features if isinstance(features, FeatureFile) else open_features(features)
        ff.check_complete()
        ff.check_layer(self.layer)
        self.check_compatible(ff.layer_provenance(self.layer), str(ff.path))
        y = ff.y(split)
        unknown = sorted({ff.classes[i] for i in set(y.tolist())} - set(self.classes))
        if unknown:
            raise HeadError(f"{ff.path} has {split} rows of classes this head was not trained "
                            f"on: {unknown}.")
        index = {c: i for i, c in enumerate(self.classes)}
        y = np.array([index[ff.classes[i]] for i in y], dtype=np.int64)
        pred = self.predict(ff.X(self.layer, split))
        m = metric_values(np.ones((1, len(y))), y, pred, len(self.classes))
        return {"feature_file": str(ff.path), "split": split, "n": int(len(y)),
                **{k: float(v[0]) for k, v in m.items()}}

    def save(self, path) -> Path:
        """Save as joblib (any suffix) or skops (``.skops``: safe to load from others)."""
        from .persist import dump_head

        return dump_head({k: getattr(self, k) for k in self.__dataclass_fields__}, path)


def _min_count(y) -> int:
    return int(np.unique(y, return_counts=True)[1].min())


def load_head(path) -> Head:
    """Load a head saved by :meth:`Head.save` (``.joblib`` or ``.skops``).

    joblib files are pickles: only load trusted ones. ``.skops`` files are checked against an
    allow-list of types before anything is built.

    Raises:
        HeadError: the file is missing, unreadable, untrusted, or not a featurecache head.
    """
    from .persist import load_head_dict

    data = load_head_dict(path)
    required = [k for k, f in Head.__dataclass_fields__.items()
                if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in data]
    prov = data.get("provenance")
    if not missing and isinstance(prov, dict):
        missing = [f"provenance.{k}" for k in ("backbone", "weights", "preprocess", "specs")
                   if k not in prov]
    if missing or not hasattr(data["pipeline_"], "predict") or not isinstance(prov, dict) \
            or not isinstance(data["classes"], list) or not data["classes"]:
        what = f"it lacks {', '.join(missing)}" if missing else "its fields have the wrong types"
        raise HeadError(f"{path} is a damaged or edited featurecache head ({what}); fit it "
                        f"again with `featurecache fit-head` (or `compare`).")
    return Head(**{k: data[k] for k in Head.__dataclass_fields__ if k in data})


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


def fit_heads(jobs: dict, kinds, *, kernel: str = "linear", cv: int = 5,
              scoring: str = "balanced_accuracy", class_weight=None, seed: int = 0, n_jobs=-1,
              probability: bool = False, early_stop: bool = True, progress=None) -> dict:
    """Search and refit every head kind on every ``(feature file, layer)`` in ``jobs``.

    ``jobs`` maps a key to ``(FeatureFile, layer)``; every job must hold the same training
    rows (same labels), so all are scored on the same folds. One joblib pool runs the folds of
    all jobs, another the refits. Returns ``{(key, kind): Head}``.
    """
    import sklearn

    check_options(kinds, kernel, scoring)  # before any feature is read
    Xs, y, folds, how = {}, None, None, ""
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
        Xs[key] = X
    results = search_layers(Xs, y, kinds, folds=folds, kernel=kernel, scoring=scoring,
                            class_weight=class_weight, seed=seed, early_stop=early_stop,
                            n_jobs=n_jobs, progress=progress)
    order = list(results)
    pipes = joblib.Parallel(n_jobs=n_jobs)(
        joblib.delayed(refit)(Xs[key], y, kind, results[(key, kind)].params, kernel=kernel,
                              class_weight=class_weight, seed=seed, probability=probability)
        for key, kind in order)
    from .store.layout import created_now  # the one UTC timestamp (SOURCE_DATE_EPOCH aware)

    created = created_now()
    heads = {}
    for (key, kind), pipe in zip(order, pipes):
        ff, layer = jobs[key]
        res = results[(key, kind)]
        meta = {"created": created, "featurecache_version": __version__,
                "sklearn_version": sklearn.__version__, "feature_file": str(ff.path),
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


def fit_head(features, layer: str, kind: str = "logreg", *, kernel: str = "linear",
             cv: int = 5, scoring: str = "balanced_accuracy", class_weight=None, seed: int = 0,
             n_jobs=-1, probability: bool = False, progress: bool = False) -> Head:
    """Search, refit and return a head on ``layer`` of a feature file.

    Args:
        features: a :class:`~featurecache.store.FeatureFile` or a path to one.
        layer: a stored layer, or several joined with ``+`` (their columns concatenated).
        kind: ``logreg``, ``svm`` or ``knn``; ``kernel``: ``linear`` or ``rbf`` (svm only).
        cv: folds of the stratified CV on the train split (a ``val`` split, when the file has
            one, is used instead).
        scoring: the CV score that picks the hyperparameters: ``balanced_accuracy``,
            ``accuracy`` or ``f1_macro``.
        class_weight: ``None`` or ``"balanced"``.
        n_jobs: parallel CV folds (joblib; -1: all cores).
        probability: calibrate SVM probability estimates (sigmoid, by CV; slower).
        progress: show a progress bar of the CV folds on stderr.

    Raises:
        UnknownLayerError: the layer is not stored (the message lists the stored ones).
        HeadError: an unknown kind, or too few classes or rows to search.
    """
    from .store import FeatureFile, open_features

    ff = features if isinstance(features, FeatureFile) else open_features(features)
    bar = Progress(progress, f"fit-head {kind} on {layer} (CV)")
    try:
        return fit_heads({layer: (ff, layer)}, [kind], kernel=kernel, cv=cv, scoring=scoring,
                         class_weight=class_weight, seed=seed, n_jobs=n_jobs,
                         probability=probability, progress=bar.update)[(layer, kind)]
    finally:
        bar.close()
