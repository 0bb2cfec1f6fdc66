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
* **Linear SVMs on the Gram matrix.** While the fold has at most :data:`GRAM_MAX_ROWS` rows,
  the kernel ``K = X X^T`` is computed once per fold and libsvm solves every ``C`` on it
  (``SVC(kernel="precomputed")``): seconds where liblinear's ``LinearSVC`` needs minutes.
  Beyond that, ``LinearSVC`` (primal).
* **Logistic regression warm-starts** along the path inside each fold.
* **One standardisation per fold**, shared by every head kind; arrays are float32,
  C-contiguous, prepared once.
* **One joblib pool over layers x folds** (:func:`search_layers`), so two cores stay busy
  whatever the number of folds, and ``joblib.parallel_backend("dask")`` moves it to a cluster.

Every candidate is scored on the same folds, so CV scores are comparable across layers, head
kinds and (for files of the same images) backbones.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import HeadError, HeadOptionError, option
from .options import HEAD_KINDS, KERNELS, SCORINGS

__all__ = ["HEAD_KINDS", "KERNELS", "SCORINGS", "GRAM_MAX_ROWS", "SearchResult", "make_folds",
           "search_layers", "coarse_grid", "fine_grid", "score_predictions", "use_gram",
           "check_options"]

# Linear SVMs use libsvm on a precomputed Gram matrix while a fit has at most this many rows:
# the matrix is rows^2 float64 (20,000 rows: 3.2 GB), libsvm then costs seconds per C.
GRAM_MAX_ROWS = 20_000
GRAM_MIN_FEATURES = 512  # narrower features: LinearSVC's primal solver (see use_gram)
KNN_KS = (10, 20, 50)
KNN_TEMPERATURE = 0.07     # DINOv2's k-NN evaluation protocol
PATIENCE = 2               # decades below the best before a fold stops walking C
_SVC_MAX_ITER = 1_000_000  # libsvm at C = 1e6 on non-separable data can otherwise run for hours


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


def coarse_grid(kind: str, kernel: str, n_features: int) -> list[dict]:
    """First sweep, in path order: C = 1e-6 .. 1e6 one point a decade (rbf: for each of four
    gammas around 1/n_features); k-NN: k in 10, 20, 50."""
    if kind == "knn":
        return [{"k": k} for k in KNN_KS]
    cs = [10.0 ** e for e in range(-6, 7)]
    if kind == "svm" and kernel == "rbf":
        gammas = [10.0 ** e / n_features for e in (-2, -1, 0, 1)]
        return [{"C": c, "gamma": g} for g in gammas for c in cs]
    return [{"C": c} for c in cs]


def fine_grid(kind: str, best: dict) -> list[dict]:
    """Second sweep: quarter-decade steps around the best C (other params kept); none for k-NN."""
    if kind == "knn":
        return []
    return [{**best, "C": best["C"] * 10.0 ** s} for s in (-0.75, -0.5, -0.25, 0.25, 0.5, 0.75)]


def check_options(kinds=(), kernel: str = "linear", scoring: str = "balanced_accuracy") -> None:
    """Refuse an unknown head kind, kernel or scoring (the one check every entry point uses).

    Raises:
        HeadError: naming the bad value and the choices.
    """
    for kind in kinds:
        if kind not in HEAD_KINDS:
            raise HeadOptionError(f"head {kind!r} is not one of {', '.join(HEAD_KINDS)}.")
    if kernel not in KERNELS:
        raise HeadOptionError(f"kernel {kernel!r} is not one of {', '.join(KERNELS)}.")
    if scoring not in SCORINGS:
        raise HeadOptionError(f"scoring {scoring!r} is not one of {', '.join(SCORINGS)}.")


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
    kinds: tuple
    kernel: str
    scoring: str
    class_weight: object
    seed: int
    early_stop: bool
    n_refit: int  # rows of the refit, which decide the linear SVM's solver for the folds too


def use_gram(n_rows: int, n_features: int) -> bool:
    """Whether a linear SVM is solved on the Gram matrix (libsvm) rather than by LinearSVC
    (liblinear, primal). The CV folds use the refit's choice, so C means the same.

    Wide features (more than :data:`GRAM_MIN_FEATURES`): the data are close to separable,
    libsvm on the precomputed kernel takes seconds at every C where the primal solver takes
    minutes at large C. Narrow features: the primal solver works on a small ``d x d`` problem
    and takes milliseconds, while libsvm crawls at large C on non-separable data (measured at
    2,800 x 24: 0.01 s against 135 s at C = 1e4).
    """
    return n_rows <= GRAM_MAX_ROWS and n_features > GRAM_MIN_FEATURES


# logistic regression: the same solver settings in the CV and in the refit
LOGREG = {"max_iter": 1000, "tol": 1e-3}


def gram(A, B=None) -> np.ndarray:
    """``A @ B.T`` (``B`` defaults to ``A``) as a plain matrix product.

    ``A @ A.T`` lets numpy call BLAS ``syrk``, and the OpenBLAS bundled with numpy 2.4
    segfaults there for float64 matrices of 16,000+ rows; transposing into a contiguous copy
    first takes the ``gemm`` path, which is safe (and about as fast).
    """
    B = A if B is None else B
    return A @ np.ascontiguousarray(B.T)


def standardise(X_train, X_other=None):
    """Standardise by the training rows' mean and std (as StandardScaler: std 0 -> 1), float32."""
    mean = X_train.mean(0, dtype=np.float64)
    std = X_train.std(0, dtype=np.float64)
    std[std == 0] = 1.0
    out = [np.ascontiguousarray(((X_train - mean) / std).astype(np.float32))]
    if X_other is not None:
        out.append(np.ascontiguousarray(((X_other - mean) / std).astype(np.float32)))
    return out


def knn_vote_scores(X_train, y_train, X_test, ks, n_classes: int,
                    temperature: float = KNN_TEMPERATURE, chunk: int = 1024) -> dict:
    """Temperature-weighted k-NN class scores for every ``k`` from one similarity pass.

    Cosine similarity between L2-normalised rows; the top ``k`` neighbours vote with weight
    ``exp(sim / T)``. Returns ``{k: (n_test, n_classes) votes}``.
    """
    def unit(a):
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    tr, te = unit(X_train), unit(X_test)
    kmax = max(ks)
    out = {k: np.zeros((len(te), n_classes)) for k in ks}
    for s in range(0, len(te), chunk):
        sim = te[s:s + chunk] @ tr.T
        top = np.argpartition(-sim, kmax - 1, axis=1)[:, :kmax] if kmax < sim.shape[1] else \
            np.broadcast_to(np.arange(sim.shape[1]), sim.shape).copy()
        top_sim = np.take_along_axis(sim, top, 1)
        order = np.argsort(-top_sim, axis=1, kind="stable")
        top, top_sim = np.take_along_axis(top, order, 1), np.take_along_axis(top_sim, order, 1)
        w = np.exp(top_sim.astype(np.float64) / temperature)
        labels = y_train[top]
        for k in ks:
            votes = out[k][s:s + chunk]
            np.add.at(votes, (np.arange(len(votes))[:, None], labels[:, :k]), w[:, :k])
    return out


def _path(grid: list, kind: str, kernel: str) -> list[list]:
    """Split a grid into paths walked from strong to weak regularisation (one per gamma)."""
    if kind == "svm" and kernel == "rbf":
        paths = {}
        for p in grid:
            paths.setdefault(p["gamma"], []).append(p)
        return list(paths.values())
    return [grid]


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

    ``grids`` maps kind -> (grid points, walk as paths with early stopping?). Returns
    kind -> list of scores (shorter than the grid where a path stopped early).
    """
    from sklearn.exceptions import ConvergenceWarning

    Xtr, Xte = standardise(X[train], X[test])
    ytr, yte = y[train], y[test]
    n_classes = int(y.max()) + 1
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for kind, (grid, stop) in grids.items():
            if not grid:
                out[kind] = []
                continue
            if kind == "knn":
                ks = sorted({min(p["k"], len(ytr)) for p in grid})
                votes = knn_vote_scores(Xtr, ytr, Xte, ks, n_classes)
                out[kind] = [score_predictions(spec.scoring, yte,
                                               votes[min(p["k"], len(ytr))].argmax(1))
                             for p in grid]
                continue
            fit_score = _fitter(kind, spec, Xtr, ytr, Xte, yte)
            scores = []
            for path in _path(grid, kind, spec.kernel):
                got = _walk(path, fit_score, stop and spec.early_stop)
                scores.extend(got + [None] * (len(path) - len(got)))
            out[kind] = scores
    return out


def _fitter(kind: str, spec: _Spec, Xtr, ytr, Xte, yte):
    """A ``params -> score`` function for one fold, keeping state (warm start, Gram) across C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC, LinearSVC

    cw, seed = spec.class_weight, spec.seed
    if kind == "logreg":
        est = LogisticRegression(class_weight=cw, random_state=seed, warm_start=True, **LOGREG)

        def fit_score(p):
            est.set_params(**p).fit(Xtr, ytr)
            return score_predictions(spec.scoring, yte, est.predict(Xte))
        return fit_score
    if spec.kernel == "rbf":
        def fit_score(p):
            m = SVC(kernel="rbf", class_weight=cw, random_state=seed, max_iter=_SVC_MAX_ITER,
                    **p).fit(Xtr, ytr)
            return score_predictions(spec.scoring, yte, m.predict(Xte))
        return fit_score
    if use_gram(spec.n_refit, Xtr.shape[1]):
        K = gram(Xtr).astype(np.float64)
        Kte = gram(Xte, Xtr).astype(np.float64)

        def fit_score(p):
            m = SVC(kernel="precomputed", class_weight=cw, random_state=seed,
                    max_iter=_SVC_MAX_ITER, **p).fit(K, ytr)
            return score_predictions(spec.scoring, yte, m.predict(Kte))
        return fit_score

    def fit_score(p):
        m = LinearSVC(class_weight=cw, random_state=seed, dual=False, max_iter=2000, tol=1e-3,
                      **p)
        return score_predictions(spec.scoring, yte, m.fit(Xtr, ytr).predict(Xte))
    return fit_score


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
                  early_stop: bool = True, n_jobs=-1, progress=None) -> dict:
    """Search every head kind on every layer, on the same folds, in one joblib pool.

    Args:
        Xs: ``{layer: (rows, dim) array}`` of the training rows (any float dtype).
        y: class indices of those rows.
        kinds: head kinds (``logreg``, ``svm``, ``knn``).
        folds: ``[(train_idx, test_idx)]``, e.g. from :func:`make_folds`.
        early_stop: stop each fold's C path once past its peak (False: the full grid).
        progress: optional ``callable(n_done_tasks, n_tasks)``.

    Returns:
        ``{(layer, kind): SearchResult}``.
    """
    import joblib

    kinds = tuple(kinds)
    check_options(kinds, kernel, scoring)
    y = np.asarray(y)
    Xs = {name: np.ascontiguousarray(X, dtype=np.float32) for name, X in Xs.items()}
    spec = _Spec(kinds, kernel, scoring, class_weight, seed, early_stop, len(y))
    stages = {}
    grids = {(l, k): coarse_grid(k, kernel, X.shape[1]) for l, X in Xs.items() for k in kinds}
    for stage in (1, 2):
        if not any(grids.values()):
            if progress:
                progress(1, 1)
            break
        tasks = [(layer, f) for layer in Xs for f in range(len(folds))]
        calls = (joblib.delayed(_fold_task)(
            Xs[layer], y, folds[f][0], folds[f][1], spec,
            {k: (grids[(layer, k)], stage == 1) for k in kinds}) for layer, f in tasks)
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
            grids = {key: fine_grid(key[1], _best(rows)["params"]) for key, rows in stages.items()}
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
