"""The rows of a comparison as typed, frozen data.

A :class:`Row` is one candidate: a frozen head (backbone x layer x head kind) or a fine-tuned
model, with its identity, its CV score, the score the choice used (``selection``), its test
scores with intervals, and what the later steps add (lead over the runner-up, margin over the
best frozen head, few-shot curve, head file). Rows never change: each step returns new rows
(:func:`dataclasses.replace`).

A row also reads as the mapping that ``results.json`` holds (``row["cv_score"]``,
``row["layer"]``, ...): :meth:`Row.as_dict` is that file's format, key for key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Row", "Interval", "FrozenHead", "FineTune", "Selection", "FROZEN", "format_params"]

FROZEN = "frozen"


def format_params(params: dict) -> str:
    """``"C=0.01, k=10"``: floats to 3 significant digits, anything else (whole numbers, a
    kind's string or bool hyperparameter) as it is."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


@dataclass(frozen=True)
class Interval:
    """A test metric: the point value and its bootstrap 95% interval."""

    value: float
    lo: float
    hi: float


@dataclass(frozen=True)
class FrozenHead:
    """A head fitted on stored features; ``head_file`` once the report saved it."""

    head_file: str | None = None


@dataclass(frozen=True)
class FineTune:
    """A fine-tuned model (``featurecache finetune``): the blocks above ``from_layer`` were
    trained, up to ``final_layer``; it picked its epoch on ``n_val`` validation rows."""

    folder: str
    from_layer: str
    final_layer: str
    n_val: int
    seconds: float
    seconds_per_epoch: float


@dataclass(frozen=True)
class Selection:
    """The score every candidate was chosen by when they were all scored on the same
    validation rows (``compare --finetuned``), its standard error, and which rows."""

    score: float
    sem: float
    on: str


@dataclass(frozen=True, eq=False)
class Row(Mapping):
    """One candidate of a comparison. Compares equal to a row with the same ``as_dict()``."""

    backbone: str
    layer: str                 # the stored layer (or ``a+b``); a fine-tune's final layer
    head: str                  # head kind, or ``lp-ft``
    strategy: str              # ``frozen``, ``fine-tune (cache)``, ``fine-tune (images)``
    depth: float
    rel_depth: float
    dim: int
    params: dict
    cv_score: float
    cv_std: float
    cv_sem: float
    grid_evaluated: int
    grid_points: int
    origin: FrozenHead | FineTune = field(default_factory=FrozenHead)
    selection: Selection | None = None
    test: dict | None = None   # metric -> Interval, after the choice
    lead_over_runner_up: dict | None = None
    margin_over_frozen: dict | None = None
    few_shot: dict | None = None
    few_shot_metric: str | None = None

    @property
    def name(self) -> str:
        """``"backbone layer (head)"``, the row's name in the verdict."""
        return f"{self['backbone']} {self['layer']} ({self.head})"

    @property
    def tuned(self) -> bool:
        return isinstance(self.origin, FineTune)

    def as_dict(self) -> dict:
        """The row as ``results.json`` holds it."""
        o = self.origin
        d = {"backbone": self.backbone,
             "layer": f"{o.from_layer}..{o.final_layer}" if self.tuned else self.layer,
             "head": self.head, "strategy": self.strategy, "depth": self.depth,
             "rel_depth": self.rel_depth, "dim": self.dim, "params": self.params,
             "cv_score": self.cv_score, "cv_std": self.cv_std}
        if self.tuned:
            d["n_val"] = o.n_val
        d.update(cv_sem=self.cv_sem, grid_evaluated=self.grid_evaluated,
                 grid_points=self.grid_points)
        if self.tuned:
            d.update(seconds=o.seconds, seconds_per_epoch=o.seconds_per_epoch, folder=o.folder)
        if self.selection is not None:
            d.update(select_score=self.selection.score, select_sem=self.selection.sem,
                     selected_on=self.selection.on)
        for m, iv in (self.test or {}).items():
            d[m], d[m + "_lo"], d[m + "_hi"] = iv.value, iv.lo, iv.hi
        for key in ("lead_over_runner_up", "margin_over_frozen", "few_shot", "few_shot_metric"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if not self.tuned and o.head_file is not None:
            d["head_file"] = o.head_file
        return d

    # the mapping view: results.json's keys
    def __getitem__(self, key):
        return self.as_dict()[key]

    def __iter__(self):
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

    def __repr__(self) -> str:
        return f"Row({self.name})"
