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


def standardise(X_train, X_other=None, *, rows=None, other_rows=None, chunk: int = 4096):
    """Standardise by the training rows' mean and std (as StandardScaler: std 0 -> 1), float32.

    ``rows`` / ``other_rows``: row indices into ``X_train`` / ``X_other`` (a fold's rows of one
    matrix: ``standardise(X, X, rows=train, other_rows=test)``), read block by block, so the
    memory used is the float32 outputs plus one block (no float64 or indexed copy of the rows).
    """
    def blocks(A, idx):
        n = len(A) if idx is None else len(idx)
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            yield sl, np.asarray(A[sl] if idx is None else A[idx[sl]], dtype=np.float64)

    n = len(X_train) if rows is None else len(rows)
    total = np.zeros(X_train.shape[1])
    for _, b in blocks(X_train, rows):
        total += b.sum(0)
    mean = total / max(n, 1)
    sq = np.zeros_like(mean)
    for _, b in blocks(X_train, rows):  # two passes: the variance of the centred values
        sq += ((b - mean) ** 2).sum(0)
    std = np.sqrt(sq / max(n, 1))
    std[std == 0] = 1.0

    def scaled(A, idx):
        out = np.empty((len(A) if idx is None else len(idx), A.shape[1]), dtype=np.float32)
        for sl, b in blocks(A, idx):
            out[sl] = (b - mean) / std
        return out

    out = [scaled(X_train, rows)]
    if X_other is not None:
        out.append(scaled(X_other, other_rows))
    return out


def squared_hinge_ovr(X, y, n_classes: int, C: float, *, class_weight=None, sample_weight=None,
                      W0=None,
                      tol: float = 1e-4, max_iter: int = 1000, cg_max_iter: int = 500):
    """LinearSVC's primal problem (L2 penalty, squared hinge, one-vs-rest, intercept as a
    feature of value 1 and penalised, as liblinear's ``intercept_scaling=1``), solved by
    Newton-CG with a line search (liblinear's method) on all classes at once with BLAS.

    For each problem ``c`` (one problem when there are two classes: class 1 positive),
    ``min_w 0.5 |w|^2 + sum_i C_ic max(0, 1 - s_ic w.[x_i, 1])^2`` with ``s_ic = +-1``;
    ``C_ic = C * class_weight[y_i]`` for two classes, and liblinear's one-vs-rest weights
    otherwise (``C * class_weight[c]`` for the positives, ``C`` for the rest), times the row's
    ``sample_weight``. Each problem
    stops as liblinear's does: ``|grad| <= tol * max(min(pos, neg), 1) / n * |grad at 0|``.

    liblinear works row by row on a sparse copy of ``X`` (16 bytes per value): at 40,000 x
    1,280 one C of a 10-class problem takes minutes; here every step is two matrix products
    with the float32 rows, shared by the classes. ``W0``: a warm start (the previous C's
    solution along a path). Returns ``(W, n_iter)``, ``W`` of shape ``(d + 1, K)``, float64,
    the intercepts in its last row.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y)
    n, d = X.shape
    K = 1 if n_classes == 2 else n_classes
    cw = np.ones(n_classes) if class_weight is None else np.asarray(class_weight, np.float64)
    if K == 1:
        S = np.where(y == 1, 1.0, -1.0)[:, None]
        Cm = (C * cw[y])[:, None]
    else:
        S = np.where(y[:, None] == np.arange(K), 1.0, -1.0)
        Cm = np.where(S > 0, C * cw[None, :], C)
    if sample_weight is not None:
        Cm = Cm * np.asarray(sample_weight, np.float64)[:, None]
    pos = (S > 0).sum(0)
    stop = tol * np.maximum(np.minimum(pos, n - pos), 1) / n

    def product(V):  # [X, 1] @ V, float32 BLAS, float64 result
        return (X @ V[:d].astype(np.float32)).astype(np.float64) + V[d]

    def transposed(Z):  # [X, 1]^T @ Z
        return np.vstack([(X.T @ Z.astype(np.float32)).astype(np.float64), Z.sum(0)])

    def objective(W, M):
        R = np.maximum(1.0 - S * M, 0.0)
        return 0.5 * (W * W).sum(0) + (Cm * R * R).sum(0), R

    g0 = np.linalg.norm(-2.0 * transposed(Cm * S), axis=0)  # the gradient at w = 0
    W = np.zeros((d + 1, K)) if W0 is None else np.array(W0, dtype=np.float64)
    M = product(W)
    f, R = objective(W, M)
    n_iter, stalled = 0, np.zeros(K, bool)
    for n_iter in range(1, max_iter + 1):
        G = W - 2.0 * transposed(Cm * R * S)
        gnorm = np.linalg.norm(G, axis=0)
        todo = (gnorm > stop * g0) & ~stalled
        if not todo.any():
            n_iter -= 1
            break
        D = np.where(R > 0, Cm, 0.0)  # the generalised Hessian: I + 2 [X,1]^T D [X,1]
        # conjugate gradients on H P = -G, one system per class, in lockstep
        P, Rc = np.zeros_like(W), -G * todo
        Dir = Rc.copy()
        rr = (Rc * Rc).sum(0)
        done = ~todo
        for _ in range(cg_max_iter):
            if done.all():
                break
            HD = Dir + 2.0 * transposed(D * product(Dir))
            alpha = np.where(done, 0.0, rr / np.maximum((Dir * HD).sum(0), 1e-300))
            P += alpha * Dir
            Rc -= alpha * HD
            rr_new = (Rc * Rc).sum(0)
            done |= np.sqrt(rr_new) <= 0.1 * gnorm  # liblinear's eps_cg
            Dir = Rc + np.where(done, 0.0, rr_new / np.maximum(rr, 1e-300)) * Dir
            rr = rr_new
        # backtracking (Armijo) line search per class; margins move linearly
        MP = product(P)
        slope = (G * P).sum(0)
        step = np.ones(K)
        newW, newM, newf, newR = W, M, f, R
        for _ in range(30):
            Wt, Mt = W + step * P, M + step * MP
            ft, Rt = objective(Wt, Mt)
            ok = (ft <= f + 0.01 * step * slope) | ~todo
            newW = np.where(ok, Wt, newW)
            newM = np.where(ok, Mt, newM)
            newf = np.where(ok, ft, newf)
            newR = np.where(ok, Rt, newR)
            if ok.all():
                break
            step = np.where(ok, step, step * 0.5)
        else:  # no decrease for some class: it sits at float32 precision's optimum
            stalled |= ~ok
        W, M, f, R = newW, newM, newf, newR
    return W, n_iter
