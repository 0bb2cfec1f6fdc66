"""The numerics under the search that every head kind shares.

One standardisation per fold (:func:`standardise`), per-row class weights
(:func:`sample_weights`), a safe Gram matrix (:func:`gram`) and the choice between libsvm on
the Gram matrix and the primal solver for linear SVMs (:func:`use_gram`); the CV score of
predictions is :func:`featurecache.scoring.score_predictions` (also importable from here). How each kind is fitted and scored in a fold, and the settings
its CV and its refit share, are the kind's own (:mod:`featurecache.kinds`).
"""

from __future__ import annotations

import numpy as np

from .scoring import score_predictions  # the name older callers import from here

__all__ = ["GRAM_MAX_ROWS", "gram", "sample_weights", "score_predictions", "standardise", "use_gram"]

# Linear SVMs use libsvm on a precomputed Gram matrix while a fit has at most this many rows:
# the matrix is rows^2 float64 (20,000 rows: 3.2 GB), libsvm then costs seconds per C.
GRAM_MAX_ROWS = 20_000
GRAM_MIN_FEATURES = 512  # narrower features: LinearSVC's primal solver (see use_gram)


def sample_weights(class_weight, y):
    """Per-row weights for estimators without ``class_weight``, or None."""
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
