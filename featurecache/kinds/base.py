"""The contract of a head kind, and what its fold scorer and its saved estimator share.

A kind is one object (a :class:`HeadKind`) that says, from one settings record of its own:

* its grids: :meth:`~HeadKind.coarse_grid` (first sweep, in path order), :meth:`~HeadKind.fine_grid`
  (second sweep around the best point; none by default) and :meth:`~HeadKind.paths` (how a grid
  splits into paths walked from strong to weak regularisation, with early stopping);
* its fold scorer: :meth:`~HeadKind.fold_fitter` (a ``params -> score`` function for one fold,
  keeping state such as a warm start or a Gram matrix across the path), or
  :meth:`~HeadKind.fold_scores` for a kind that scores its whole grid at once;
* its saved estimator: :meth:`~HeadKind.estimator` (the ``clf`` step after the scaler) and
  :meth:`~HeadKind.fit_params` (keyword arguments of its ``fit``);
* its export: :meth:`~HeadKind.torch_head` (the fitted pipeline as a torch module);
* its size: :meth:`~HeadKind.search_minutes` (an estimate of what it costs compare, for a
  kind that is costly at scale; compare skips it above ``max_head_minutes``);
* ``name``, ``cost`` (rank for the one-standard-error rule, cheaper first), ``default`` (in
  compare's default heads), ``skops_types`` (types beyond skops' defaults a saved head of this
  kind holds), ``dtype`` (the features' dtype in the CV and the refit).

Nothing here imports numpy or scikit-learn at import time: :mod:`featurecache.options` reads
the registry. A kind imports scikit-learn inside its functions.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Fit", "Fold", "HeadKind", "c_grid", "c_fine_grid", "C_DECADES", "C_FINE_STEPS",
           "DECLARED"]

# what a kind declares in its class statement (see HeadKind)
DECLARED = ("name", "cost", "default", "skops_types", "dtype", "settings")

# the C path of the linear-probe literature: 1e-6 .. 1e6 one decade at a time, then
# quarter-decades around the best (kinds with a C share these)
C_DECADES = tuple(range(-6, 7))
C_FINE_STEPS = (-0.75, -0.5, -0.25, 0.25, 0.5, 0.75)


def c_grid(**extra) -> list[dict]:
    """``[{"C": 1e-6}, ..., {"C": 1e6}]`` (strong to weak), each with ``extra``."""
    return [{"C": 10.0 ** e, **extra} for e in C_DECADES]


def c_fine_grid(best: dict) -> list[dict]:
    """Quarter-decade steps around the best C (other params kept)."""
    return [{**best, "C": best["C"] * 10.0 ** s} for s in C_FINE_STEPS]


@dataclass(frozen=True, eq=False)
class Fit:
    """What a kind's fold scorer and its saved estimator share besides the hyperparameters.

    ``n_rows``: training rows of the refit (in the CV too: they decide the linear SVM's solver
    for the folds, so a C means the same in CV and refit); ``solver_rows``: rows that choose
    the solver when they differ (few-shot refits use the search's); ``gram`` forces it.
    ``y``: the refit's labels (early stopping, calibration folds, sample weights).
    """

    kernel: str = "linear"
    class_weight: object = None
    seed: int = 0
    scoring: str = "balanced_accuracy"
    n_rows: int = 0
    n_features: int = 0
    probability: bool = False
    solver_rows: int | None = None
    gram: bool | None = None
    y: object = None

    def score(self, y_true, y_pred) -> float:
        """The CV score of predictions (``scoring``)."""
        from ..scoring import score_predictions

        return score_predictions(self.scoring, y_true, y_pred)


@dataclass(frozen=True, eq=False)
class Fold:
    """One CV fold, standardised by its training rows; ``n_classes`` of the whole data."""

    Xtr: object
    ytr: object
    Xte: object
    yte: object
    n_classes: int

    def astype(self, dtype) -> Fold:
        return Fold(self.Xtr.astype(dtype), self.ytr, self.Xte.astype(dtype), self.yte,
                    self.n_classes)


class HeadKind:
    """One head kind. Subclasses declare what they are in their class statement
    (``class Knn(HeadKind, name="knn", cost=0, default=True, settings=SETTINGS)``; class
    attributes of these names work too) and define the grids, the fold scorer and the
    estimator; instances must pickle (they travel to joblib workers)."""

    name: str = ""
    cost: int | None = None
    default: bool = False
    skops_types: tuple = ()
    dtype: str = "float32"
    settings: object = None  # the kind's settings record, one for its CV and its refit

    def __init_subclass__(cls, **declared):
        """Set the declarations given as keywords of the class statement; a keyword that is
        none of them is refused here (as a class attribute, a misspelt one would be ignored)."""
        super().__init_subclass__()
        unknown = sorted(set(declared) - set(DECLARED))
        if unknown:
            raise TypeError(f"head kind {cls.__name__}: {', '.join(unknown)} is not one of "
                            f"{', '.join(DECLARED)}")
        for key, value in declared.items():
            setattr(cls, key, value)

    # grids
    def coarse_grid(self, n_features: int, kernel: str = "linear", **options) -> list[dict]:
        """The first sweep, in path order. ``options``: the search's grid options (a kind
        takes the ones it knows, e.g. ``mlp_widths``)."""
        raise NotImplementedError

    def fine_grid(self, best: dict) -> list[dict]:
        """The second sweep around the best point of the first (none by default)."""
        return []

    def paths(self, grid: list, kernel: str = "linear") -> list[list]:
        """The grid split into paths walked from strong to weak regularisation."""
        return [grid]

    # the CV
    def fold_fitter(self, fit: Fit, fold: Fold):
        """A ``params -> score`` function for one fold (state may be kept along a path)."""
        raise NotImplementedError

    def fold_scores(self, grid: list, fit: Fit, fold: Fold, walk) -> list:
        """One fold's score of every grid point (None where a path stopped early):
        ``walk(path, fit_score)`` walks one path with the search's early stopping."""
        if self.dtype != "float32":
            fold = fold.astype(self.dtype)
        fit_score = self.fold_fitter(fit, fold)
        scores = []
        for path in self.paths(grid, fit.kernel):
            got = walk(path, fit_score)
            scores.extend(got + [None] * (len(path) - len(got)))
        return scores

    # its size
    def search_minutes(self, n_rows: int, n_features: int, kernel: str = "linear", **options):
        """An estimate of what this kind costs compare on one layer of ``n_rows`` training rows
        x ``n_features``: its search (5-fold CV, both sweeps, the refit; ``options``: the
        search's grid options, as :meth:`coarse_grid` takes them) and its predictions of a
        quarter as many test rows, in minutes on 2 cores, from a cost model fitted to
        ``benchmarks/head_costs.py``; None (the default) for a kind whose time grows linearly
        in its rows (measured to 100,000 rows by ``benchmarks/heads.py --scale``), which is
        never skipped. :func:`featurecache.report.compare` scales it to its folds (the refit
        costing about as much as a fold) and skips a kind on a layer where it exceeds its
        ``max_head_minutes``, and says why."""
        return None

    # the saved head
    def estimator(self, params: dict, fit: Fit):
        """The unfitted estimator after the scaler, with chosen hyperparameters."""
        raise NotImplementedError

    def fit_params(self, fit: Fit) -> dict:
        """Keyword arguments of the estimator's ``fit`` (e.g. sample weights)."""
        return {}

    def torch_head(self, pipeline):
        """The fitted pipeline (scaler, estimator) as a torch module from the unscaled
        features to the head's outputs (see :mod:`featurecache.torch_heads`), for export.

        Raises:
            ExportError: this kind (or this fitted estimator) cannot be exported, and why.
        """
        from ..errors import ExportError

        raise ExportError(f"a {self.name} head cannot be exported (its kind defines no torch "
                          f"version).")

    def pipeline(self, params: dict, fit: Fit):
        """``Pipeline([("scale", StandardScaler()), ("clf", estimator)])``, unfitted."""
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        return Pipeline([("scale", StandardScaler()), ("clf", self.estimator(params, fit))])

    def __repr__(self) -> str:
        return f"<head kind {self.name!r}>"
