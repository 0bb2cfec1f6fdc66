"""Fitted scikit-learn heads rewritten as torch modules, for export (:mod:`featurecache.export`).

Each module maps the features a head was fitted on (``(N, d)`` float32, the scaler not yet
applied) to its named outputs, in the columns of the fitted estimator's ``classes_`` (the
order of :attr:`featurecache.persist.Head.column_classes`), computing what the pipeline
computes, up to float32 rounding:

* :class:`LinearHead`: ``StandardScaler`` folded into one ``nn.Linear`` (logistic regression,
  the primal linear SVM; the mean subtracted first, the scale folded into the weights, so
  float32 keeps the precision of small logits over large means), logits or decision values,
  then the softmax when they are probabilities;
* :class:`OvoHead`: a one-vs-one linear SVM (:class:`~featurecache.estimators.GramLinearSVC`):
  the pairwise hyperplanes in one ``nn.Linear``, then scikit-learn's votes plus confidences;
* :class:`CalibratedHead`: sigmoid calibration (``CalibratedClassifierCV``) of either;
* :class:`MlpHead`: ``MLPClassifier`` as its linear layers, the scaler folded into the first;
* :class:`KnnHead`: the cosine k-NN with its stored training rows (temperature-weighted votes).

Each has ``outputs`` (the names of what ``forward`` returns, in order; the last is the
probabilities when the head has them). A head kind builds its own in
:meth:`featurecache.kinds.base.HeadKind.torch_head`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .errors import ExportError

__all__ = ["LinearHead", "OvoHead", "CalibratedHead", "MlpHead", "KnnHead", "fold_scaler",
           "ScaledLinear", "binary_logits"]


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64)).float()


def fold_scaler(scaler, W, b) -> tuple:
    """``(W', b, mean)`` with ``(x - mean) @ W'.T + b == scaler.transform(x) @ W.T + b``
    (float64). The mean stays a subtraction: folded into the bias it would make small
    logits the difference of large numbers in float32."""
    W, b = np.asarray(W, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = W.shape[1]
    mean = scaler.mean_ if scaler.with_mean else np.zeros(d)
    s = scaler.scale_ if scaler.with_std else np.ones(d)
    return W / s, b, np.asarray(mean, dtype=np.float64)


class ScaledLinear(nn.Module):
    """``x -> (x - mean) @ W.T + b``: a scaler and a linear layer in one (see
    :func:`fold_scaler`)."""

    def __init__(self, W, b, mean):
        super().__init__()
        self.register_buffer("mean", _t(mean))
        self.fc = _linear(W, b)

    def forward(self, x):
        return self.fc(x - self.mean)


def binary_logits(W, b) -> tuple:
    """One score ``z`` (class 1) as two logits ``(-z/2, z/2)``: their softmax is
    ``(1 - sigmoid(z), sigmoid(z))``, scikit-learn's binary probabilities."""
    return np.vstack([-W / 2, W / 2]), np.array([-b[0] / 2, b[0] / 2])


def _linear(W, b) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        lin.weight.copy_(_t(W))
        lin.bias.copy_(_t(b))
    return lin


class LinearHead(nn.Module):
    """``x -> x @ W.T + b`` (the scaler folded in): ``("logits", "probabilities")`` with
    ``softmax``, else ``("scores",)`` (decision values). A binary decision value ``d`` is
    given as ``(-d, d)`` (``two_sided``), as :meth:`featurecache.persist.Head.scores` does."""

    def __init__(self, scaler, W, b, softmax: bool, two_sided: bool = False):
        super().__init__()
        W, b, mean = fold_scaler(scaler, np.atleast_2d(W), np.atleast_1d(b))
        if two_sided:
            W, b = np.vstack([-W, W]), np.concatenate([-b, b])
        self.fc = ScaledLinear(W, b, mean)
        self.softmax = softmax
        self.outputs = ("logits", "probabilities") if softmax else ("scores",)

    def forward(self, x):
        z = self.fc(x)
        return (z, z.softmax(1)) if self.softmax else (z,)


def ovo_matrices(n_classes: int) -> tuple:
    """``(plus, minus)`` of shape ``(pairs, classes)``: pair ``k = (i, j)`` (i < j, in
    libsvm's order) has ``plus[k, i] = 1`` and ``minus[k, j] = 1``."""
    pairs = [(i, j) for i in range(n_classes) for j in range(i + 1, n_classes)]
    plus, minus = np.zeros((len(pairs), n_classes)), np.zeros((len(pairs), n_classes))
    for k, (i, j) in enumerate(pairs):
        plus[k, i], minus[k, j] = 1, 1
    return plus, minus


class OvoHead(nn.Module):
    """A one-vs-one linear SVM (``coef_`` one row per pair of classes): the decision values
    of :meth:`featurecache.estimators.GramLinearSVC.decision_function`, i.e. votes plus
    confidences squashed into (-1/3, 1/3); binary: ``(-d, d)``."""

    outputs = ("scores",)

    def __init__(self, scaler, coef, intercept, n_classes: int):
        super().__init__()
        self.binary = n_classes == 2
        self.fc = ScaledLinear(*fold_scaler(scaler, coef, intercept))
        plus, minus = ovo_matrices(n_classes)
        self.register_buffer("plus", _t(plus))
        self.register_buffer("minus", _t(minus))

    def forward(self, x):
        dec = self.fc(x)
        if self.binary:
            return (torch.cat([-dec, dec], 1),)
        positive = (dec > 0).float()
        votes = positive @ self.plus + (1 - positive) @ self.minus
        conf = dec @ (self.plus - self.minus)
        return (votes + conf / (3 * (conf.abs() + 1)),)


class CalibratedHead(nn.Module):
    """``CalibratedClassifierCV(method="sigmoid")``: each calibrated classifier's sigmoid
    per decision column (``1 / (1 + exp(a f + b))``), normalised (binary: ``1 - p``, ``p``),
    averaged over the calibrated classifiers. ``("scores", "probabilities")``: the scores
    are the first classifier's decision values."""

    outputs = ("scores", "probabilities")

    def __init__(self, bases: list, calibrators: list, n_classes: int):
        super().__init__()
        self.bases = nn.ModuleList(bases)
        self.register_buffer("a", _t([[c.a_ for c in cals] for cals in calibrators]))
        self.register_buffer("b", _t([[c.b_ for c in cals] for cals in calibrators]))
        self.binary = n_classes == 2
        self.n_classes = n_classes

    def forward(self, x):
        probas, first = [], None
        for m, base in enumerate(self.bases):
            scores = base(x)[0]
            first = scores if first is None else first
            f = scores[:, 1:] if self.binary else scores  # binary: the class-1 decision
            p = torch.sigmoid(-(self.a[m] * f + self.b[m]))
            if self.binary:
                p = torch.cat([1 - p, p], 1)
            else:
                total = p.sum(1, keepdim=True)
                p = torch.where(total > 0, p / total.clamp_min(1e-30),
                                torch.full_like(p, 1.0 / self.n_classes))
            probas.append(p)
        return first, torch.stack(probas).mean(0)


_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "logistic": torch.sigmoid,
                "identity": lambda z: z}


class MlpHead(nn.Module):
    """``MLPClassifier``: its linear layers (the scaler folded into the first), its hidden
    activation, and the softmax (a binary net's one logistic unit as two logits)."""

    outputs = ("logits", "probabilities")

    def __init__(self, scaler, mlp):
        super().__init__()
        if mlp.activation not in _ACTIVATIONS or mlp.out_activation_ not in ("softmax",
                                                                             "logistic"):
            raise ExportError(f"an MLP with activation {mlp.activation!r} and output "
                              f"{mlp.out_activation_!r} cannot be exported.")
        layers = []
        for n, (W, b) in enumerate(zip(mlp.coefs_, mlp.intercepts_)):
            W, b, mean = np.asarray(W).T, np.asarray(b), None
            if n == 0:
                W, b, mean = fold_scaler(scaler, W, b)
            if n == len(mlp.coefs_) - 1 and mlp.out_activation_ == "logistic":
                W, b = binary_logits(W, b)
            layers.append(_linear(W, b) if mean is None else ScaledLinear(W, b, mean))
        self.layers = nn.ModuleList(layers)
        self.activation = mlp.activation

    def forward(self, x):
        act = _ACTIVATIONS[self.activation]
        for layer in self.layers[:-1]:
            x = act(layer(x))
        z = self.layers[-1](x)
        return z, z.softmax(1)


class KnnHead(nn.Module):
    """The cosine k-NN (``KNeighborsClassifier``, brute force) with its training rows kept in
    the graph: the scaled, L2-normalised input against the normalised rows, the top ``k``,
    votes ``exp(cos / T)`` per class, normalised (``("probabilities",)``).

    The weights are computed as ``exp((cos - 1) / T)``: the same probabilities (a common
    factor cancels) without float32 overflow."""

    outputs = ("probabilities",)

    def __init__(self, scaler, rows, labels, k: int, n_classes: int, temperature: float):
        super().__init__()
        rows = np.asarray(rows, dtype=np.float64)
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        self.register_buffer("rows_t", _t(rows.T).contiguous())
        self.register_buffer("labels", torch.as_tensor(np.asarray(labels, dtype=np.int64)))
        mean = scaler.mean_ if scaler.with_mean else np.zeros(rows.shape[1])
        scale = scaler.scale_ if scaler.with_std else np.ones(rows.shape[1])
        self.register_buffer("mean", _t(mean))
        self.register_buffer("scale", _t(scale))
        self.register_buffer("class_ids", torch.arange(n_classes))
        self.k, self.temperature = int(k), float(temperature)

    def forward(self, x):
        z = (x - self.mean) / self.scale
        z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim, idx = (z @ self.rows_t).topk(self.k, dim=1)
        w = torch.exp((sim - 1) / self.temperature)
        onehot = (self.labels[idx].unsqueeze(-1) == self.class_ids).float()
        votes = (onehot * w.unsqueeze(-1)).sum(1)
        return (votes / votes.sum(1, keepdim=True),)
