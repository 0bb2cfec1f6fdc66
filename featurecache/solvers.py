"""How each head kind is fitted and scored inside one fold: the numerics under the search.

Linear SVMs on the precomputed Gram matrix (libsvm) or by ``LinearSVC`` (primal) depending on
the shape (:func:`use_gram`); logistic regression warm-started along the ``C`` path; k-NN votes
for every ``k`` from one similarity pass; one standardisation per fold. :mod:`.estimators`
builds the saved heads with the same settings, so a ``C`` means the same in CV and refit.
"""

from __future__ import annotations

import warnings

import numpy as np

from .errors import HeadOptionError
from .options import SCORINGS

__all__ = ["GRAM_MAX_ROWS", "fold_fitter", "gram", "knn_vote_scores", "mlp_classifier", "sample_weights", "score_predictions", "standardise", "use_gram"]

# Linear SVMs use libsvm on a precomputed Gram matrix while a fit has at most this many rows:
# the matrix is rows^2 float64 (20,000 rows: 3.2 GB), libsvm then costs seconds per C.
GRAM_MAX_ROWS = 20_000
GRAM_MIN_FEATURES = 512  # narrower features: LinearSVC's primal solver (see use_gram)
MLP_MAX_ITER = 200         # epochs at most (early stopping usually ends sooner)
MLP_BATCH = 32             # small batches: sklearn's 200 leaves a small data set one Adam
                           # step per epoch, and early stopping ends it before it learns
KNN_TEMPERATURE = 0.07     # DINOv2's k-NN evaluation protocol
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


def mlp_classifier(params: dict, *, seed: int = 0, y=None):
    """scikit-learn's ``MLPClassifier`` with one hidden layer of ``params["hidden"]`` units
    and L2 penalty ``params["alpha"]``; early stopping on 10% of the rows when ``y`` allows a
    stratified 10% (every class twice, at least one row per class in the 10%)."""
    from sklearn.neural_network import MLPClassifier

    early = True
    if y is not None:
        counts = np.bincount(np.asarray(y))
        counts = counts[counts > 0]
        early = bool(counts.min() >= 2 and int(0.1 * len(y)) >= len(counts))
    return MLPClassifier(hidden_layer_sizes=(int(params["hidden"]),), alpha=params["alpha"],
                         early_stopping=early, max_iter=MLP_MAX_ITER, batch_size=MLP_BATCH,
                         random_state=seed)


def sample_weights(class_weight, y):
    """Per-row weights for estimators without ``class_weight`` (the MLP), or None."""
    if class_weight is None:
        return None
    from sklearn.utils.class_weight import compute_sample_weight

    return compute_sample_weight(class_weight, y)


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


# logistic regression: the same solver settings in the CV and in the refit, converged on
# float64 data (issue 22: at tol 1e-3, or on float32 data, lbfgs stopped short of the optimum
# and CV scores differed from a converged fit's by up to 0.017)
LOGREG = {"max_iter": 10000, "tol": 1e-6}
# the linear SVM's primal solver, one definition for the CV and the refit (sklearn's tol)
LINEAR_SVC = {"dual": False, "max_iter": 10000, "tol": 1e-4}


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


def fold_fitter(kind: str, spec, Xtr, ytr, Xte, yte):
    """A ``params -> score`` function for one fold, keeping state (warm start, Gram) across C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC, LinearSVC

    cw, seed = spec.class_weight, spec.seed
    if kind == "mlp":
        weights = sample_weights(cw, ytr)

        def fit_score(p):
            m = mlp_classifier(p, seed=seed, y=ytr).fit(Xtr, ytr, sample_weight=weights)
            return score_predictions(spec.scoring, yte, m.predict(Xte))
        return fit_score
    if kind == "logreg":
        # float64: lbfgs on float32 data stops at float32's precision, short of the optimum
        Xtr, Xte = Xtr.astype(np.float64), Xte.astype(np.float64)
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
        m = LinearSVC(class_weight=cw, random_state=seed, **LINEAR_SVC, **p)
        return score_predictions(spec.scoring, yte, m.fit(Xtr, ytr).predict(Xte))
    return fit_score


