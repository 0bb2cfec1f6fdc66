"""``logreg``: logistic regression (lbfgs, multinomial), warm-started along the C path.

Converged on float64 data in the CV and the refit alike (issue 22: at tol 1e-3, or on float32
data, lbfgs stopped short of the optimum and CV scores differed from a converged fit's by up
to 0.017).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .base import HeadKind, c_fine_grid, c_grid


@dataclass(frozen=True)
class Settings:
    """The solver settings of the CV and of the refit (one definition)."""

    max_iter: int = 10000
    tol: float = 1e-6


SETTINGS = Settings()


# float64: lbfgs on float32 data stops at float32's precision, short of the optimum
class LogReg(HeadKind, name="logreg", cost=1, default=True, settings=SETTINGS, dtype="float64"):

    def coarse_grid(self, n_features, kernel="linear", **options):
        return c_grid()

    def fine_grid(self, best):
        return c_fine_grid(best)

    def _model(self, fit, **kw):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(class_weight=fit.class_weight, random_state=fit.seed, **kw,
                                  **asdict(self.settings))

    def fold_fitter(self, fit, fold):
        est = self._model(fit, warm_start=True)

        def fit_score(p):
            est.set_params(**p).fit(fold.Xtr, fold.ytr)
            return fit.score(fold.yte, est.predict(fold.Xte))
        return fit_score

    def estimator(self, params, fit):
        return self._model(fit, C=params["C"])

    def torch_head(self, pipeline):
        from ..torch_heads import LinearHead, binary_logits

        scaler, clf = pipeline.named_steps["scale"], pipeline.named_steps["clf"]
        W, b = clf.coef_, clf.intercept_
        if len(clf.classes_) == 2:  # sigmoid(z) = softmax(-z/2, z/2)
            W, b = binary_logits(W, b)
        return LinearHead(scaler, W, b, softmax=True)


KIND = LogReg()
