"""``svm``: a linear or rbf-kernel support vector machine.

Linear kernel: libsvm on the precomputed Gram matrix (:class:`~featurecache.estimators.GramLinearSVC`
in the saved head) for wide features up to :data:`~featurecache.solvers.GRAM_MAX_ROWS` rows,
``LinearSVC``'s primal problem otherwise, solved with BLAS
(:class:`~featurecache.estimators.PrimalLinearSVC`; its CV walks C warm-started); :func:`~featurecache.solvers.use_gram` decides
from the refit's rows, in the CV folds too, so a C means the same. rbf: ``SVC``, C walked for
each of four gammas around 1/n_features. ``probability``: sigmoid calibration by CV
(``CalibratedClassifierCV``, scikit-learn's replacement for ``SVC(probability=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import option
from ..estimator_defaults import LIBSVM_MAX_ITER
from .base import HeadKind, c_fine_grid, c_grid


@dataclass(frozen=True)
class Settings:
    """The solver settings of the CV and of the refit (one definition)."""

    libsvm_max_iter: int = LIBSVM_MAX_ITER  # the saved GramLinearSVC's cap too
    # the primal solver (LinearSVC), sklearn's tol
    primal_dual: bool = False
    primal_max_iter: int = 10000
    primal_tol: float = 1e-4
    gamma_decades: tuple = (-2, -1, 0, 1)  # rbf: gamma = 10^e / n_features
    calibration_folds: int = 5             # at most (fewer when a class has fewer rows)
    # what the rbf search costs compare on 2 cores, 5 folds (benchmarks/head_costs.py,
    # 2026-12-06: 1,000 and 2,000 rows x 1,280, 1,000 x 80): seconds = (rows / 1000) **
    # rbf_power x (rbf_seconds + rbf_seconds_per_feature x features); libsvm's kernel solver,
    # whose C paths also grow longer with the rows
    rbf_power: float = 2.95
    rbf_seconds: float = 9.65
    rbf_seconds_per_feature: float = 0.0293

    def primal(self) -> dict:
        return {"dual": self.primal_dual, "max_iter": self.primal_max_iter, "tol": self.primal_tol}


SETTINGS = Settings()


def _use_gram(fit, n_features) -> bool:
    from ..solvers import use_gram

    if fit.gram is not None:
        return fit.gram
    return use_gram(fit.n_rows if fit.solver_rows is None else fit.solver_rows, n_features)


class Svm(HeadKind, name="svm", cost=2, default=True, settings=SETTINGS,
          skops_types=("featurecache.estimators.GramLinearSVC",
                       "featurecache.estimators.PrimalLinearSVC",
                       # --probability: the calibrated wrapper's own parts
                       "sklearn.calibration._CalibratedClassifier",
                       "sklearn.calibration._SigmoidCalibration")):

    def coarse_grid(self, n_features, kernel="linear", **options):
        if kernel == "rbf":
            gammas = [10.0 ** e / n_features for e in self.settings.gamma_decades]
            return [p for g in gammas for p in c_grid(gamma=g)]
        return c_grid()

    def fine_grid(self, best):
        return c_fine_grid(best)

    def paths(self, grid, kernel="linear"):
        if kernel != "rbf":
            return [grid]
        paths = {}
        for p in grid:
            paths.setdefault(p["gamma"], []).append(p)
        return list(paths.values())

    def search_minutes(self, n_rows, n_features, kernel="linear", **options):
        """rbf only: the linear kernel grows linearly in its rows (never skipped)."""
        if kernel != "rbf":
            return None
        st = self.settings
        return (n_rows / 1000) ** st.rbf_power * (st.rbf_seconds +
                                                  st.rbf_seconds_per_feature * n_features) / 60

    def _svc(self, fit, kernel, **params):
        from sklearn.svm import SVC

        return SVC(kernel=kernel, class_weight=fit.class_weight, random_state=fit.seed,
                   max_iter=self.settings.libsvm_max_iter, **params)

    def _primal(self, fit, **params):
        from ..estimators import PrimalLinearSVC

        return PrimalLinearSVC(class_weight=fit.class_weight, random_state=fit.seed,
                         **self.settings.primal(), **params)

    def fold_fitter(self, fit, fold):
        Xtr, ytr, Xte, yte = fold.Xtr, fold.ytr, fold.Xte, fold.yte
        if fit.kernel == "rbf":
            def fit_score(p):
                return fit.score(yte, self._svc(fit, "rbf", **p).fit(Xtr, ytr).predict(Xte))
            return fit_score
        if _use_gram(fit, Xtr.shape[1]):
            import numpy as np

            from ..solvers import gram

            K = gram(Xtr).astype(np.float64)
            Kte = gram(Xte, Xtr).astype(np.float64)

            def fit_score(p):
                return fit.score(yte, self._svc(fit, "precomputed", **p).fit(K, ytr).predict(Kte))
            return fit_score

        return _primal_path(fit, fold, self.settings)

    def estimator(self, params, fit):
        if fit.kernel == "rbf":
            clf = self._svc(fit, "rbf", C=params["C"], gamma=params["gamma"])
        elif _use_gram(fit, fit.n_features):
            from ..estimators import GramLinearSVC

            clf = GramLinearSVC(C=params["C"], class_weight=fit.class_weight,
                                max_iter=self.settings.libsvm_max_iter, random_state=fit.seed)
        else:
            clf = self._primal(fit, C=params["C"])
        if fit.probability:
            from sklearn.calibration import CalibratedClassifierCV

            import numpy as np

            folds = 3 if fit.y is None else \
                min(self.settings.calibration_folds, int(np.unique(fit.y, return_counts=True)[1].min()))
            clf = CalibratedClassifierCV(clf, ensemble=False, cv=folds)
        return clf

    def torch_head(self, pipeline):
        """Linear kernels only: an rbf SVM's decision needs every support vector and
        libsvm's kernel sums (not exported; a linear SVM or logreg head exports exactly)."""
        from sklearn.calibration import CalibratedClassifierCV

        from ..errors import ExportError
        from ..torch_heads import CalibratedHead

        scaler, clf = pipeline.named_steps["scale"], pipeline.named_steps["clf"]
        n_classes = len(clf.classes_)
        if not isinstance(clf, CalibratedClassifierCV):
            return _decision_module(scaler, clf, n_classes)
        if clf.method != "sigmoid":
            raise ExportError(f"an SVM calibrated by {clf.method!r} cannot be exported "
                              f"(sigmoid calibration can).")
        cals = clf.calibrated_classifiers_
        return CalibratedHead([_decision_module(scaler, c.estimator, n_classes) for c in cals],
                              [c.calibrators for c in cals], n_classes)


def _primal_path(fit, fold, settings):
    """The primal fold scorer: :class:`~featurecache.estimators.PrimalLinearSVC`'s problem
    at each C, warm-started from the previous C's solution (the refit's problem exactly)."""
    import numpy as np

    from ..solvers import squared_hinge_ovr

    classes, yi = np.unique(fold.ytr, return_inverse=True)
    cw = None
    if fit.class_weight is not None:
        from sklearn.utils.class_weight import compute_class_weight

        cw = compute_class_weight(fit.class_weight, classes=classes, y=fold.ytr)
    state = {"W": None}

    def fit_score(p):
        W, _ = squared_hinge_ovr(fold.Xtr, yi, len(classes), p["C"], class_weight=cw,
                                 W0=state["W"], tol=settings.primal_tol,
                                 max_iter=settings.primal_max_iter)
        state["W"] = W
        dec = fold.Xte @ W[:-1].astype(np.float32) + W[-1]
        pred = (dec[:, 0] > 0).astype(int) if len(classes) == 2 else dec.argmax(1)
        return fit.score(fold.yte, classes[pred])
    return fit_score


def _decision_module(scaler, clf, n_classes: int):
    """The torch module of a fitted SVM's decision values (as ``Head.scores`` gives them)."""
    from sklearn.svm import LinearSVC

    from ..errors import ExportError
    from ..estimators import GramLinearSVC
    from ..torch_heads import LinearHead, OvoHead

    if isinstance(clf, GramLinearSVC):
        return OvoHead(scaler, clf.coef_, clf.intercept_, n_classes)
    if isinstance(clf, LinearSVC):
        return LinearHead(scaler, clf.coef_, clf.intercept_, softmax=False,
                          two_sided=n_classes == 2)
    raise ExportError(f"an SVM with the {getattr(clf, 'kernel', type(clf).__name__)!r} kernel "
                      f"cannot be exported: its decision needs every support vector and "
                      f"libsvm's kernel sums. Fit a linear SVM ({option('kernel', 'linear')}) "
                      f"or a logreg head, which export exactly.")


KIND = Svm()
