"""The blocks above a stored feature map, cut out of the backbone, and the LP-FT model on them.

:func:`split_top` traces the backbone with FX (torchvision's ``create_feature_extractor``) and
keeps the nodes between the output of ``from`` and the final pooled layer as a module of
their own: given the map stored for ``from``, it computes what the backbone computes above
it. A network whose later nodes also read outputs from below ``from`` (a skip connection
across the cut) cannot be split there, and is refused naming the node.

:class:`TopModel` is those blocks + the final pooling + a linear classifier. The classifier
starts as the logistic-regression head fitted on the final pooled features, with the head's
standardisation folded into the weights (:func:`fold_logistic`), so the model before any
training step predicts exactly what the linear probe predicts (LP-FT, Kumar et al. 2022).
The top blocks always run as at inference: BatchNorm statistics and dropout stay frozen.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .errors import OptionError
from .extract import pool_output

__all__ = ["split_top", "TopModel", "fold_logistic"]


def split_top(model: nn.Module, from_node: str, final_node: str) -> nn.Module:
    """A copy of the part of ``model`` between the output of ``from_node`` and the output of
    ``final_node``: a module mapping the ``from_node`` map to the ``final_node`` output.

    Raises:
        OptionError: a node of the top part reads an output from below ``from_node``.
    """
    from torchvision.models.feature_extraction import create_feature_extractor

    was_training = model.training
    model.eval()
    try:
        gm = create_feature_extractor(model, return_nodes={from_node: "from", final_node: "final"})
    finally:
        model.train(was_training)
    gm.eval()  # the inference graph (BatchNorm with running statistics, no dropout)
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    src, dst = out["from"], out["final"]
    above = _closure(src, lambda n: n.users)
    needed = _closure(dst, lambda n: n.all_input_nodes) | {dst}
    top = [n for n in graph.nodes if n in above and n in needed]
    kept = set(top)
    for n in top:
        for m in n.all_input_nodes:
            if m is not src and m not in kept and m.op != "get_attr":
                raise OptionError(
                    f"the blocks above {from_node!r} cannot be cut out of the network: node "
                    f"{n.name!r} also reads {m.name!r}, an output from below {from_node!r} (a "
                    f"connection across the cut). Fine-tune from a block boundary, e.g. a "
                    f"stageK alias.")
    new = torch.fx.Graph()
    env = {src: new.placeholder("x")}
    for n in graph.nodes:
        if n in kept or (n.op == "get_attr" and any(u in kept for u in n.users)):
            env[n] = new.node_copy(n, lambda m: env[m])
    new.output(env[dst])
    # a copy, trainable: the backbone's own weights stay frozen (load_backbone froze them)
    return copy.deepcopy(torch.fx.GraphModule(gm, new)).eval().requires_grad_(True)


def _closure(node, step) -> set:
    """Every node reachable from ``node`` (itself excluded) by ``step`` (users or inputs)."""
    seen, todo = set(), list(step(node))
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(step(n))
    return seen


class TopModel(nn.Module):
    """``map of from -> top blocks -> pooled final layer -> linear -> logits``.

    ``kind``/``pool``: how the final layer's output is pooled (as the embed stores it).
    """

    def __init__(self, top: nn.Module, kind: str, pool: str, dim: int, n_classes: int):
        super().__init__()
        self.top = top
        self.kind, self.pool = kind, pool
        self.fc = nn.Linear(dim, n_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.top.eval()  # frozen BatchNorm statistics, no dropout (small data)
        return self

    def features(self, maps: torch.Tensor) -> torch.Tensor:
        return pool_output(self.top(maps), self.kind, self.pool)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(maps))

    def body_parameters(self) -> list:
        return [p for p in self.top.parameters()]


def fold_logistic(pipe, n_classes: int) -> tuple:
    """``(weight (n_classes, d), bias (n_classes,))`` of one linear layer computing the same
    class scores as a fitted ``StandardScaler -> LogisticRegression`` pipeline.

    The scaler is folded in (``w / scale``, ``b - w . mean / scale``); a binary model's one
    score ``z`` becomes the logits ``(-z/2, z/2)``, whose softmax is its sigmoid. Classes the
    pipeline never saw get a very low bias.
    """
    scale, clf = pipe.named_steps["scale"], pipe.named_steps["clf"]
    mean = scale.mean_ if scale.with_mean else np.zeros(len(scale.scale_))
    s = scale.scale_ if scale.with_std else np.ones(len(mean))
    W, b = clf.coef_ / s, clf.intercept_ - (clf.coef_ / s) @ mean
    if len(clf.classes_) == 2:
        W, b = np.vstack([-W / 2, W / 2]), np.array([-b[0] / 2, b[0] / 2])
    weight = np.zeros((n_classes, W.shape[1]))
    bias = np.full(n_classes, -1e4)
    weight[clf.classes_], bias[clf.classes_] = W, b
    return torch.from_numpy(weight).float(), torch.from_numpy(bias).float()
