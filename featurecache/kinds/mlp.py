"""``mlp``: scikit-learn's ``MLPClassifier`` with one hidden layer ("your own small network").

Width and ``alpha`` searched (each alpha path walked strong to weak per width; no fine sweep:
each fit is a training run); early stopping on a stratified 10% of the rows when the labels
allow one; class weights become sample weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import HeadKind


@dataclass(frozen=True)
class Settings:
    widths: tuple = (256, 1024)          # hidden widths (the mlp_widths option's default)
    alphas: tuple = (1.0, 1e-2, 1e-4)    # L2 penalties, strong to weak
    max_iter: int = 200                  # epochs at most (early stopping usually ends sooner)
    batch_size: int = 32                 # small batches: sklearn's 200 leaves a small data set
                                         # one Adam step per epoch, and early stopping ends it
                                         # before it learns
    early_share: float = 0.1             # the rows early stopping holds out
    # what the search costs compare on 2 cores, 5 folds (benchmarks/head_costs.py, 2026-12-06:
    # 1,000 to 4,000 rows x 1,280 and 1,000 x 80, widths 256 + 1024): seconds = (rows / 1000)
    # ** power x (base_seconds + seconds_per_feature_unit x features x the widths' sum); rough, as
    # early stopping decides the epochs
    power: float = 1.16
    base_seconds: float = 6.07
    seconds_per_feature_unit: float = 5.10e-5


SETTINGS = Settings()


def classifier(params: dict, *, seed: int = 0, y=None, settings: Settings = SETTINGS):
    """``MLPClassifier`` with one hidden layer of ``params["hidden"]`` units and L2 penalty
    ``params["alpha"]``; early stopping on 10% of the rows when ``y`` allows a stratified 10%
    (every class twice, at least one row per class in the 10%)."""
    import numpy as np
    from sklearn.neural_network import MLPClassifier

    early = True
    if y is not None:
        counts = np.bincount(np.asarray(y))
        counts = counts[counts > 0]
        early = bool(counts.min() >= 2 and int(settings.early_share * len(y)) >= len(counts))
    return MLPClassifier(hidden_layer_sizes=(int(params["hidden"]),), alpha=params["alpha"],
                         early_stopping=early, max_iter=settings.max_iter,
                         batch_size=settings.batch_size, random_state=seed)


# not a default head: each grid point is a training run
class Mlp(HeadKind, name="mlp", cost=3, default=False, settings=SETTINGS,
          skops_types=("sklearn.neural_network._stochastic_optimizers.AdamOptimizer",)):

    def coarse_grid(self, n_features, kernel="linear", **options):
        widths = options.get("mlp_widths", self.settings.widths)
        return [{"hidden": int(h), "alpha": a} for h in widths for a in self.settings.alphas]

    def paths(self, grid, kernel="linear"):
        paths = {}
        for p in grid:
            paths.setdefault(p["hidden"], []).append(p)
        return list(paths.values())

    def search_minutes(self, n_rows, n_features, kernel="linear", **options):
        st, units = self.settings, sum(options.get("mlp_widths") or self.settings.widths)
        return (n_rows / 1000) ** st.power * (st.base_seconds + st.seconds_per_feature_unit *
                                              n_features * units) / 60

    def fold_fitter(self, fit, fold):
        from ..solvers import sample_weights

        weights = sample_weights(fit.class_weight, fold.ytr)

        def fit_score(p):
            m = classifier(p, seed=fit.seed, y=fold.ytr).fit(fold.Xtr, fold.ytr,
                                                              sample_weight=weights)
            return fit.score(fold.yte, m.predict(fold.Xte))
        return fit_score

    def estimator(self, params, fit):
        return classifier(params, seed=fit.seed, y=fit.y)

    def torch_head(self, pipeline):
        from ..torch_heads import MlpHead

        return MlpHead(pipeline.named_steps["scale"], pipeline.named_steps["clf"])

    def fit_params(self, fit):
        from ..solvers import sample_weights

        return {"sample_weight": sample_weights(fit.class_weight, fit.y)}


KIND = Mlp()
