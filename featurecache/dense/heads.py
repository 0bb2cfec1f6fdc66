"""The heads of a dense probe: per-cell classifiers, each searched by CV grouped by image.

A cell head is one object (:class:`CellHead`) registered here by name; the probes and the
saved dense heads ask it, never its name:

* ``logreg``: StandardScaler + multinomial ``LogisticRegression`` (lbfgs), C and the class
  weights (none / balanced) by grouped CV on cell mIoU, each fold's C path warm-started
  (the grid of a hand-written ``GridSearchCV`` probe, fitted in float32 at scikit-learn's
  default tolerance);
* ``knn``: StandardScaler + cosine k-NN with temperature-weighted votes (the
  nonparametric twin: Hummingbird's retrieval of cells), k by grouped CV.

The folds are :class:`~sklearn.model_selection.GroupKFold` over the images: the cells of
one image are never on both sides of a fold (they are correlated). This module imports no
numpy or scikit-learn until a head runs (``featurecache --help`` reads the names).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CellHead", "get", "names", "grouped_folds", "cell_score", "CellModel"]

_REGISTRY: dict = {}


def names() -> tuple:
    return tuple(_REGISTRY)


def get(name: str) -> "CellHead":
    from ..errors import HeadOptionError

    if name not in _REGISTRY:
        raise HeadOptionError(f"dense head {name!r} is not one of {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def grouped_folds(groups, folds: int) -> list:
    """``[(train, test)]`` index arrays of :class:`~sklearn.model_selection.GroupKFold`
    with ``folds`` splits over the ``groups`` (each cell's image)."""
    import numpy as np
    from sklearn.model_selection import GroupKFold

    groups = np.asarray(groups)
    n = len(np.unique(groups))
    if n < folds:
        from ..errors import HeadError

        raise HeadError(f"{n} training image(s) have labelled cells; {folds}-fold CV grouped "
                        f"by image needs at least {folds} (lower --cv or add images).")
    return list(GroupKFold(n_splits=folds).split(np.zeros(len(groups)), groups=groups))


def cell_score(y_true, y_pred, n_classes: int) -> float:
    """Cell mIoU: the mean IoU over the classes in the truth or the prediction."""
    from .cells import confusion, miou

    return miou(confusion(y_true, y_pred, n_classes, ignore=-1))


class CellModel:
    """A fitted cell head: ``scores(X) -> (n, n_classes)`` float32, the columns the class
    ids (a class absent from training scores lowest), higher = more likely."""

    def __init__(self, scaler, estimator, n_classes: int, kind: str, params: dict):
        self.scaler, self.estimator, self.n_classes = scaler, estimator, n_classes
        self.kind, self.params = kind, params

    def scores(self, X):
        import numpy as np

        Z = self.scaler.transform(np.asarray(X, dtype=np.float32))
        return get(self.kind).scores(self, Z)

    def probabilities(self, X):
        """``(n, n_classes)`` class probabilities (rows sum to 1)."""
        import numpy as np

        Z = self.scaler.transform(np.asarray(X, dtype=np.float32))
        return get(self.kind).probabilities(self, Z)

    def predict(self, X):
        return self.scores(X).argmax(1)


@dataclass(frozen=True)
class CellHead:
    """One kind of cell classifier. ``grid()`` lists its candidate parameters;
    ``fold_scores(Xtr, ytr, Xte, yte, n_classes, group)`` scores the candidates of one
    ``group`` (those that share a fit) on one fold; ``fit`` the chosen ones on all cells;
    ``scores`` a fitted model's class scores of standardised cells."""

    name: str
    compact = True  # its fitted model is small (a report saves it for every row)

    def groups_of(self):
        """Candidate groups: each is a list of parameter dicts fitted along one path."""
        raise NotImplementedError

    def search(self, X, y, groups, n_classes: int, *, folds: int = 3, n_jobs: int = 1,
               progress=None) -> tuple:
        """``(best params, best mean CV cell mIoU, [{params, score, fold_scores}])``; ties go
        to the candidate listed first (the most regularised)."""
        import warnings

        import numpy as np
        from joblib import Parallel, delayed

        splits = grouped_folds(groups, folds)
        cands = self.groups_of()
        tasks = [(g, f) for g in range(len(cands)) for f in range(len(splits))]
        with warnings.catch_warnings():  # loky replacing a worker that grew: not the user's
            warnings.filterwarnings("ignore", message="A worker stopped while some jobs")
            out = Parallel(n_jobs=n_jobs)(
                delayed(_fold)(self, X, y, splits[f][0], splits[f][1], n_classes, cands[g])
                for g, f in tasks)
        per = {}
        for (g, f), scores in zip(tasks, out):
            for params, s in zip(cands[g], scores):
                per.setdefault(_key(params), (params, []))[1].append(s)
        results = [{"params": p, "score": float(np.mean(s)), "fold_scores": [float(v) for v in s]}
                   for p, s in per.values()]
        best = max(results, key=lambda r: r["score"])  # the first of equals
        if progress:
            progress()
        return best["params"], best["score"], results

    def fit(self, X, y, params: dict, n_classes: int) -> CellModel:
        import numpy as np
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(np.asarray(X, dtype=np.float32))
        Z = scaler.transform(np.asarray(X, dtype=np.float32))
        return CellModel(scaler, self.estimator(Z, y, params, n_classes), n_classes, self.name,
                         params)


def _key(params: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in params.items()))


def _fold(head, X, y, tr, te, n_classes, cands):
    import numpy as np
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(X, dtype=np.float32)
    scaler = StandardScaler().fit(X[tr])
    return head.fold_scores(scaler.transform(X[tr]), y[tr], scaler.transform(X[te]), y[te],
                            n_classes, cands)


def _register(head: CellHead) -> CellHead:
    _REGISTRY[head.name] = head
    return head


@dataclass(frozen=True)
class LogregCells(CellHead):
    Cs: tuple = (0.01, 0.1, 1.0, 10.0)
    class_weights: tuple = (None, "balanced")
    max_iter: int = 1000
    tol: float = 1e-4  # scikit-learn's default

    def groups_of(self):
        return [[{"C": C, "class_weight": cw} for C in self.Cs] for cw in self.class_weights]

    def _model(self, params, warm: bool = False):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=params["C"], class_weight=params["class_weight"],
                                  max_iter=self.max_iter, tol=self.tol, warm_start=warm)

    def fold_scores(self, Xtr, ytr, Xte, yte, n_classes, cands):
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        clf, out = self._model(cands[0], warm=True), []
        for params in cands:  # ascending C: each fit starts from the previous solution
            clf.set_params(C=params["C"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(Xtr, ytr)
            out.append(cell_score(yte, clf.predict(Xte), n_classes))
        return out

    def estimator(self, Z, y, params, n_classes):
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return self._model(params).fit(Z, y)

    def scores(self, model, Z):
        import numpy as np

        est = model.estimator
        d = est.decision_function(Z)
        if d.ndim == 1:
            d = np.stack([-d, d], 1)
        out = np.full((len(Z), model.n_classes), -1e4, dtype=np.float32)
        out[:, est.classes_.astype(int)] = d
        return out

    def probabilities(self, model, Z):
        import numpy as np

        est = model.estimator
        out = np.zeros((len(Z), model.n_classes), dtype=np.float32)
        out[:, est.classes_.astype(int)] = est.predict_proba(Z)
        return out


@dataclass(frozen=True)
class KnnCells(CellHead):
    compact = False  # it keeps its training cells (a report saves it only when it wins)
    ks: tuple = (10, 20, 50)
    temperature: float = 0.07  # DINOv2's k-NN protocol, as the classification head

    def groups_of(self):
        return [[{"k": k} for k in self.ks]]

    def fold_scores(self, Xtr, ytr, Xte, yte, n_classes, cands):
        ks = sorted({min(p["k"], len(ytr)) for p in cands})
        votes = self.votes(_unit(Xtr), ytr, Xte, ks, n_classes)
        return [cell_score(yte, votes[min(p["k"], len(ytr))].argmax(1), n_classes)
                for p in cands]

    def votes(self, cells, labels, Z, ks, n_classes: int, step: int = 2048) -> dict:
        """``{k: (n, n_classes) float32}`` temperature-weighted votes of the ``k`` most
        cosine-similar training ``cells`` (unit rows), by blocked products (torch's matmul
        and top-k: never an n x n matrix, a block of ``step`` queries at a time)."""
        import numpy as np
        import torch

        tr = torch.from_numpy(np.ascontiguousarray(cells, dtype=np.float32))
        lab = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        kmax = min(max(ks), len(lab))
        out = {k: np.zeros((len(Z), n_classes), dtype=np.float32) for k in ks}
        for s in range(0, len(Z), step):
            q = torch.from_numpy(_unit(Z[s:s + step]))
            sim, idx = torch.topk(q @ tr.T, kmax, dim=1)  # sorted, best first
            w = torch.exp((sim - 1) / self.temperature)  # (a constant factor: no overflow)
            nb = lab[idx]
            for k in ks:
                v = torch.zeros((len(q), n_classes))
                v.scatter_add_(1, nb[:, :k], w[:, :k])
                out[k][s:s + step] = v.numpy()
        return out

    def estimator(self, Z, y, params, n_classes):
        import numpy as np

        return {"cells": _unit(Z), "labels": np.asarray(y, dtype=np.int64),
                "k": int(min(params["k"], len(y)))}

    def scores(self, model, Z):
        return self.probabilities(model, Z)

    def probabilities(self, model, Z):
        import numpy as np

        e = model.estimator
        v = self.votes(e["cells"], e["labels"], Z, [e["k"]], model.n_classes)[e["k"]]
        return v / np.maximum(v.sum(1, keepdims=True), 1e-30)


def _unit(a):
    import numpy as np

    a = np.asarray(a, dtype=np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


_register(LogregCells("logreg"))
_register(KnnCells("knn"))
