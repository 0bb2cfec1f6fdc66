"""The project's own scikit-learn estimators inside saved heads, and the head pipelines.

Every head is ``Pipeline([("scale", StandardScaler()), ("clf", estimator)])``; which
estimator, with which settings, is the head kind's (:mod:`featurecache.kinds`, one module per
kind; :func:`featurecache.kinds.make_estimator` builds one). Saved heads name the estimators
below by this module's path, so they stay here, below the kinds (their fixed numbers are in
:mod:`featurecache.estimator_defaults`, which the kinds' settings take):

* :class:`GramLinearSVC`: a linear-kernel SVM solved by libsvm on the precomputed Gram matrix,
  saved as one weight vector per pair of classes (the linear SVM head for wide features).
* :class:`PrimalLinearSVC`: ``LinearSVC``'s own problem (squared hinge, one-vs-rest) solved
  by Newton-CG on BLAS matrix products (:func:`~featurecache.solvers.squared_hinge_ovr`): the
  linear SVM head beyond the Gram matrix's rows and for narrow features.
* :func:`temperature_weights`: DINOv2's temperature-weighted k-NN votes (the cosine k-NN head).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.svm import LinearSVC
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .estimator_defaults import KNN_TEMPERATURE, LIBSVM_MAX_ITER
from .solvers import gram, squared_hinge_ovr

__all__ = ["GramLinearSVC", "PrimalLinearSVC", "temperature_weights"]


def temperature_weights(distances):
    """k-NN vote weights ``exp(cos_sim / T)`` from cosine distances (``1 - cos_sim``)."""
    return np.exp((1.0 - np.asarray(distances, dtype=np.float64)) / KNN_TEMPERATURE)


class GramLinearSVC(ClassifierMixin, BaseEstimator):
    """A linear-kernel SVM (libsvm, one-vs-one) solved on the precomputed Gram matrix.

    It solves the same problem as ``SVC(kernel="linear")``; computing ``X X^T`` once with
    BLAS and handing it to libsvm is much faster than libsvm's own kernel evaluations. For a
    linear kernel each pairwise classifier is a hyperplane ``w = sum(alpha_i y_i x_i)``, so the
    fitted model keeps only ``coef_`` (one row per pair of classes) and ``intercept_``, and
    predicts from features alone, exactly as ``SVC`` would (one-vs-one votes, ties to the first
    class).
    """

    def __init__(self, C=1.0, class_weight=None, max_iter=LIBSVM_MAX_ITER,
                 random_state=None):
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X, y):
        from sklearn.svm import SVC

        # the saved head: full precision; dense, finite, 2-d, non-empty (as scikit-learn's checks ask)
        X, y = validate_data(self, X, y, dtype=np.float64, order="C")
        check_classification_targets(y)
        svc = SVC(kernel="precomputed", C=self.C, class_weight=self.class_weight,
                  max_iter=self.max_iter, random_state=self.random_state)
        svc.fit(gram(X), y)
        sv = X[svc.support_]
        self.classes_ = svc.classes_
        self.n_iter_ = svc.n_iter_
        self.n_support_ = svc.n_support_
        self.intercept_ = svc.intercept_.copy()
        if len(self.classes_) == 2:
            self.coef_ = svc.dual_coef_ @ sv
        else:  # libsvm's layout: dual_coef_[j - 1] for class-i SVs, dual_coef_[i] for class j
            starts = np.r_[0, np.cumsum(svc.n_support_)]
            rows = []
            for i in range(len(self.classes_)):
                for j in range(i + 1, len(self.classes_)):
                    a, b = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
                    rows.append(svc.dual_coef_[j - 1, a] @ sv[a] + svc.dual_coef_[i, b] @ sv[b])
            self.coef_ = np.vstack(rows)
        return self

    def _pairwise(self, X):
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return X @ self.coef_.T + self.intercept_

    def _votes(self, dec):
        n = len(self.classes_)
        votes, conf = np.zeros((len(dec), n)), np.zeros((len(dec), n))
        k = 0
        for i in range(n):
            for j in range(i + 1, n):
                votes[:, i] += dec[:, k] > 0
                votes[:, j] += dec[:, k] <= 0
                conf[:, i] += dec[:, k]
                conf[:, j] -= dec[:, k]
                k += 1
        return votes, conf

    def decision_function(self, X):
        """Binary: ``(n,)``, positive for ``classes_[1]``; otherwise SVC's one-vs-rest shape
        (votes plus a confidence in (-1/3, 1/3))."""
        dec = self._pairwise(X)
        if len(self.classes_) == 2:
            return dec.ravel()
        votes, conf = self._votes(dec)
        return votes + conf / (3 * (np.abs(conf) + 1))

    def predict(self, X):
        dec = self._pairwise(X)
        if len(self.classes_) == 2:
            return self.classes_[(dec.ravel() > 0).astype(int)]
        return self.classes_[self._votes(dec)[0].argmax(1)]



class PrimalLinearSVC(LinearSVC):
    """``LinearSVC`` whose fit solves liblinear's primal problem with BLAS.

    The same problem as ``LinearSVC(dual=False)`` (L2 penalty, squared hinge, one-vs-rest,
    the intercept a penalised feature of value ``intercept_scaling``, liblinear's class
    weights) and the same stopping rule at ``tol``, solved by
    :func:`~featurecache.solvers.squared_hinge_ovr` on the dense float32 rows: at 40,000 x
    1,280 one fit takes seconds where liblinear takes minutes. ``decision_function`` and
    ``predict`` are ``LinearSVC``'s. Settings the solver does not cover (another penalty or
    loss, ``crammer_singer``, no intercept, sparse input) fit by liblinear.
    """

    def _own_problem(self, X, sample_weight) -> bool:
        import scipy.sparse as sp

        return (self.penalty == "l2" and self.loss == "squared_hinge"
                and self.multi_class == "ovr" and self.fit_intercept
                and self.intercept_scaling == 1 and not sp.issparse(X))

    def fit(self, X, y, sample_weight=None):
        if not self._own_problem(X, sample_weight):
            return super().fit(X, y, sample_weight=sample_weight)
        from sklearn.utils.class_weight import compute_class_weight
        from sklearn.utils.validation import _check_sample_weight

        self._validate_params()
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64], order="C")
        check_classification_targets(y)
        self.classes_, yi = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"This solver needs samples of at least 2 classes in the data, "
                             f"but the data contains only one class: {self.classes_[0]!r}")
        cw = None if self.class_weight is None else \
            compute_class_weight(self.class_weight, classes=self.classes_, y=y)
        sw = None if sample_weight is None else _check_sample_weight(sample_weight, X)
        W, self.n_iter_ = squared_hinge_ovr(X, yi, len(self.classes_), self.C, class_weight=cw,
                                            sample_weight=sw, tol=self.tol,
                                            max_iter=self.max_iter)
        self.coef_ = np.ascontiguousarray(W[:-1].T)
        self.intercept_ = W[-1].copy()
        return self
