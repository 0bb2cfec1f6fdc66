"""``knn``: cosine k-NN with DINOv2's temperature-weighted votes (T = 0.07).

The CV scores every ``k`` of the grid from one similarity pass per fold (:func:`vote_scores`);
the saved head is ``KNeighborsClassifier`` (cosine, brute force) weighting its votes with
:func:`featurecache.estimators.temperature_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..estimator_defaults import KNN_TEMPERATURE
from .base import HeadKind


@dataclass(frozen=True)
class Settings:
    ks: tuple = (10, 20, 50)
    temperature: float = KNN_TEMPERATURE  # DINOv2's k-NN evaluation protocol (the saved head's)
    # what it costs compare on 2 cores, 5 folds (benchmarks/head_costs.py, 2026-12-06: 10,000
    # to 40,000 rows x 1,280): seconds = 2 + a rows x features + b rows^2 x features (every
    # test row of a fold, and of the test split, meets every training row)
    seconds_per_row_feature: float = 1.17e-8
    seconds_per_row2_feature: float = 1.91e-11


SETTINGS = Settings()


def vote_scores(X_train, y_train, X_test, ks, n_classes: int,
                temperature: float = SETTINGS.temperature, chunk: int | None = None) -> dict:
    """Temperature-weighted k-NN class scores for every ``k`` from one similarity pass.

    Cosine similarity between L2-normalised rows; the top ``k`` neighbours vote with weight
    ``exp(sim / T)``. Returns ``{k: (n_test, n_classes) votes}``. The test rows go in blocks
    of ``chunk`` (by default as many as keep a block's similarities near 4M values, 16 MB,
    whatever the training rows: never an ``n_test x n_train`` matrix).
    """
    import numpy as np

    def inverse_norms(a):  # the rows' 1/|x| (no normalised copy of the training rows)
        return (1.0 / np.maximum(np.linalg.norm(a, axis=1), 1e-12)).astype(a.dtype)

    tr, te = X_train, X_test
    inv_tr, inv_te = inverse_norms(tr), inverse_norms(te)
    kmax = max(ks)
    if chunk is None:
        chunk = max(16, min(1024, (1 << 22) // max(len(tr), 1)))
    out = {k: np.zeros((len(te), n_classes)) for k in ks}
    for s in range(0, len(te), chunk):
        sim = te[s:s + chunk] @ tr.T
        sim *= inv_te[s:s + chunk, None]
        sim *= inv_tr[None, :]
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


class Knn(HeadKind, name="knn", cost=0, default=True, settings=SETTINGS,
          skops_types=("featurecache.estimators.temperature_weights",)):

    def coarse_grid(self, n_features, kernel="linear", **options):
        return [{"k": k} for k in self.settings.ks]

    def fold_scores(self, grid, fit, fold, walk):
        n = len(fold.ytr)
        ks = sorted({min(p["k"], n) for p in grid})
        votes = vote_scores(fold.Xtr, fold.ytr, fold.Xte, ks, fold.n_classes,
                            self.settings.temperature)
        return [fit.score(fold.yte, votes[min(p["k"], n)].argmax(1)) for p in grid]

    def search_minutes(self, n_rows, n_features, kernel="linear", **options):
        st = self.settings
        return (2 + n_features * n_rows * (st.seconds_per_row_feature +
                                           st.seconds_per_row2_feature * n_rows)) / 60

    def estimator(self, params, fit):
        from sklearn.neighbors import KNeighborsClassifier

        from ..estimators import temperature_weights

        return KNeighborsClassifier(n_neighbors=max(1, min(params["k"], fit.n_rows)),
                                    metric="cosine", algorithm="brute", weights=temperature_weights)

    def torch_head(self, pipeline):
        """The training rows go into the graph (``rows x width x 4`` bytes)."""
        from ..errors import ExportError
        from ..estimators import temperature_weights
        from ..torch_heads import KnnHead

        scaler, clf = pipeline.named_steps["scale"], pipeline.named_steps["clf"]
        if clf.weights is not temperature_weights or clf.metric != "cosine":
            raise ExportError(f"this k-NN head (metric {clf.metric!r}, weights {clf.weights!r}) "
                              f"is not featurecache's cosine k-NN; it cannot be exported.")
        return KnnHead(scaler, clf._fit_X, clf._y, clf.n_neighbors, len(clf.classes_),
                       KNN_TEMPERATURE)  # what temperature_weights uses


KIND = Knn()
