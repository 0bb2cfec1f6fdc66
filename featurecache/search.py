"""Cross-validated hyperparameter search for the heads: fast, early-stopped, shared folds.

The protocol follows the linear-probe literature (CLIP appendix A.3; Kornblith et al. 2019):
the best ``C`` spans many decades across data sets, so the coarse sweep walks
``C = 1e-6 .. 1e6`` one decade at a time, then a fine sweep takes quarter-decades around the
best. What makes it fast (``benchmarks/heads.py`` checks that the chosen CV score stays
within 0.005 of the exhaustive grid's):

* **Early stopping along the path.** Each fold walks ``C`` from strong to weak regularisation
  and stops once its score has been below its best for two decades in a row (past the peak,
  weaker regularisation only overfits and costs more). Grid points a fold did not reach are
  kept in the table with status ``partial`` or ``skipped``; only points every fold evaluated
  can be chosen.
* **State kept along a path**, by each kind's fold scorer (:mod:`featurecache.kinds`): linear
  SVMs solve every ``C`` on one Gram matrix ``K = X X^T`` per fold while the fold has at most
  :data:`GRAM_MAX_ROWS` rows (libsvm on the precomputed kernel: seconds where liblinear needs
  minutes), logistic regression warm-starts, k-NN scores every ``k`` from one similarity pass.
* **One standardisation per fold**, shared by every head kind; arrays are float32,
  C-contiguous, prepared once.
* **One joblib pool over layers x folds** (:func:`search_layers`), so two cores stay busy
  whatever the number of folds, and ``joblib.parallel_backend("dask")`` moves it to a cluster.

Every candidate is scored on the same folds, so CV scores are comparable across layers, head
kinds and (for files of the same images) backbones. The grids, the paths and the fold scorers
are the kinds' (:mod:`featurecache.kinds`); this module walks them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from . import kinds as _kinds
from .errors import HeadError, HeadOptionError, option
from .kinds import Fit, Fold
from .kinds.knn import vote_scores as knn_vote_scores  # compat: featurecache.search's old name
from .kinds.mlp import SETTINGS as _MLP
from .options import HEAD_KINDS, KERNELS, SCORINGS, declared
from .scoring import score_predictions
from .solvers import GRAM_MAX_ROWS, gram, standardise, use_gram

__all__ = [
    "GRAM_MAX_ROWS",
    "HEAD_KINDS",
    "KERNELS",
    "SCORINGS",
    "SearchResult",
    "check_options",
    "coarse_grid",
    "fine_grid",
    "gram",
    "knn_vote_scores",
    "make_folds",
    "score_predictions",
    "search_layers",
    "standardise",
    "use_gram",
]

MLP_WIDTHS = _MLP.widths  # compat: the default of the heads' mlp_widths option
PATIENCE = 2               # decades below the best before a fold stops walking C


def coarse_grid(kind, kernel: str, n_features: int, **grid_options) -> list[dict]:
    """The kind's first sweep, in path order (e.g. C = 1e-6 .. 1e6 one point a decade).
    ``grid_options``: options a kind's grid reads (``mlp_widths``)."""
    return _kinds.get(kind).coarse_grid(n_features, kernel, **grid_options)


def fine_grid(kind, best: dict) -> list[dict]:
    """The kind's second sweep around the best point (e.g. quarter-decades around the best C;
    none for kinds whose every fit is costly)."""
    return _kinds.get(kind).fine_grid(best)


def check_options(kinds=(), kernel: str = "linear", scoring: str = "balanced_accuracy") -> None:
    """Refuse an unknown head kind, kernel or scoring (the one check every entry point uses).

    Raises:
        HeadError: naming the bad value and the choices.
    """
    for kind in kinds:
        _kinds.get(kind)  # HeadOptionError naming the choices
    declared("kernel").check(kernel)  # HeadOptionError: the declarations' rule (options.py)
    declared("scoring").check(scoring)


def make_folds(y, cv: int = 5, seed: int = 0) -> list:
    """Stratified, shuffled, seeded folds ``[(train_idx, test_idx)]``; the same labels and seed
    give the same folds, so every layer, head and backbone is scored on the same rows.

    Raises:
        HeadError: a single class, or a class with fewer than 2 rows.
    """
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise HeadError(f"the training rows hold a single class ({classes.tolist()}); a head "
                        f"needs at least two.")
    k = min(cv, int(counts.min()))
    if k < 2:
        raise HeadError(f"a class has only {counts.min()} training row(s); stratified CV needs "
                        f"at least 2 per class.")
    if k < cv:
        import warnings

        from .errors import DataWarning

        warnings.warn(DataWarning(
            f"{option('cv', cv)} asked, but the smallest class has {k} training rows: using "
            f"{k}-fold CV."), stacklevel=2)
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


@dataclass
class SearchResult:
    """The outcome of one (layer, head) search.

    ``table`` has one row per grid point: ``{stage, params, status, mean, std, folds}`` with
    status ``evaluated`` (every fold), ``partial`` (some folds stopped before it) or
    ``skipped`` (no fold reached it); only evaluated points have a mean.
    """

    kind: str
    params: dict
    score: float
    std: float
    folds: list
    table: list = field(default_factory=list)

    @property
    def sem(self) -> float:
        """Standard error of the mean CV score (for the one-standard-error rule)."""
        return self.std / np.sqrt(max(len(self.folds) - 1, 1))


@dataclass(frozen=True)
class _Spec:
    fit: Fit  # kernel, scoring, class weight, seed and the refit's rows (the SVM solver)
    early_stop: bool


def _walk(path, fit_score, early_stop: bool) -> list:
    """Scores along one path. With early stopping, stop once PATIENCE points in a row have not
    beaten the best, after the path has risen above its first score (the strongly regularised
    start often sits flat at chance level; past the peak, scores fall, or stay flat once the
    data are separated and C no longer changes the solution)."""
    scores, best, stale = [], -np.inf, 0
    for params in path:
        s = fit_score(params)
        scores.append(s)
        if s > best:
            best, stale = s, 0
        else:
            stale += 1
            if early_stop and stale >= PATIENCE and best > scores[0]:
                break
    return scores


def _fold_task(X, y, train, test, spec: _Spec, grids: dict) -> dict:
    """One fold of one layer: standardise once, score every head kind's grid on it.

    ``grids`` maps a kind's name -> (the kind, grid points, walk as paths with early
    stopping?). Returns name -> list of scores (None where a path stopped early).
    """
    from sklearn.exceptions import ConvergenceWarning

    Xtr, Xte = standardise(X, X, rows=train, other_rows=test)
    fold = Fold(Xtr, y[train], Xte, y[test], int(y.max()) + 1)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name, (kind, grid, stop) in grids.items():
            if not grid:
                out[name] = []
                continue
            early = stop and spec.early_stop
            out[name] = kind.fold_scores(grid, spec.fit, fold,
                                         lambda path, fit_score: _walk(path, fit_score, early))
    return out


def _table(stage: int, grid: list, per_fold: list) -> list:
    """Table rows for one stage: per_fold[f][j] is fold f's score of grid point j or None."""
    rows = []
    for j, params in enumerate(grid):
        got = [f[j] for f in per_fold]
        done = [s for s in got if s is not None]
        row = {"stage": stage, "params": params, "folds": got}
        if len(done) == len(got):
            row.update(status="evaluated", mean=float(np.mean(done)), std=float(np.std(done)))
        else:
            row.update(status="partial" if done else "skipped", mean=None, std=None)
        rows.append(row)
    return rows


def search_layers(Xs: dict, y, kinds, *, folds, kernel: str = "linear",
                  scoring: str = "balanced_accuracy", class_weight=None, seed: int = 0,
                  early_stop: bool = True, n_jobs=-1, progress=None, **grid_options) -> dict:
    """Search every head kind on every layer, on the same folds, in one joblib pool.

    Args:
        Xs: ``{layer: (rows, dim) array}`` of the training rows (any float dtype).
        y: class indices of those rows.
        kinds: head kinds (names in :mod:`featurecache.kinds`, or kind objects).
        grid_options: options the kinds' grids read (``mlp_widths``: the hidden-layer widths).
        folds: ``[(train_idx, test_idx)]``, e.g. from :func:`make_folds`.
        early_stop: stop each fold's C path once past its peak (False: the full grid).
        progress: optional ``callable(n_done_tasks, n_tasks)``.

    Returns:
        ``{(layer, kind): SearchResult}``.
    """
    import joblib

    kinds = tuple(kinds)
    check_options(kinds, kernel, scoring)
    objs = {k.name: k for k in map(_kinds.get, kinds)}  # travel to the workers as objects
    kinds = tuple(objs)
    y = np.asarray(y)
    Xs = {name: np.ascontiguousarray(X, dtype=np.float32) for name, X in Xs.items()}
    spec = _Spec(Fit(kernel=kernel, class_weight=class_weight, seed=seed, scoring=scoring,
                     n_rows=len(y)), early_stop)
    stages = {}
    grids = {(l, k): objs[k].coarse_grid(X.shape[1], kernel, **grid_options)
             for l, X in Xs.items() for k in kinds}
    for stage in (1, 2):
        if not any(grids.values()):
            if progress:
                progress(1, 1)
            break
        tasks = [(layer, f) for layer in Xs for f in range(len(folds))]
        calls = (joblib.delayed(_fold_task)(
            Xs[layer], y, folds[f][0], folds[f][1], spec,
            {k: (objs[k], grids[(layer, k)], stage == 1) for k in kinds}) for layer, f in tasks)
        results = joblib.Parallel(n_jobs=n_jobs, return_as="generator")(calls)
        per = {}
        for i, ((layer, f), res) in enumerate(zip(tasks, results)):
            per.setdefault(layer, [None] * len(folds))[f] = res
            if progress:
                progress(i + 1 + (stage - 1) * len(tasks), 2 * len(tasks))
        for layer in Xs:
            for k in kinds:
                stages.setdefault((layer, k), []).extend(
                    _table(stage, grids[(layer, k)], [r[k] for r in per[layer]]))
        if stage == 1:
            grids = {key: objs[key[1]].fine_grid(_best(rows)["params"])
                     for key, rows in stages.items()}
    out = {}
    for (layer, kind), rows in stages.items():
        best = _best(rows)
        out[(layer, kind)] = SearchResult(kind, best["params"], best["mean"], best["std"],
                                          best["folds"], rows)
    return out


def _best(rows) -> dict:
    """The evaluated point with the highest mean; the first wins ties (path order: the most
    regularised C, the smallest k)."""
    done = [r for r in rows if r["status"] == "evaluated"]
    return max(done, key=lambda r: r["mean"])
