"""A fitted head (:class:`Head`) and its file: joblib (the default) or skops (safe to load
from someone else).

A head file holds a plain dict: ``format``, ``format_version`` and the fields of
:class:`Head` (the scikit-learn pipeline, layer, classes, provenance, CV
results). Two encodings, chosen by the file suffix:

* ``.joblib`` (or any other suffix): a pickle. Loading a pickle can run arbitrary code:
  **load only joblib heads you trust**.
* ``.skops``: `skops.io <https://skops.readthedocs.io>`_, which rebuilds objects without
  pickle and only from types it trusts. Loading refuses any type outside scikit-learn's,
  numpy's and the two featurecache estimators' (named in the error), so a ``.skops`` head
  from a colleague cannot run code on your machine.

Both are written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from pathlib import Path

import numpy as np

from .errors import HeadError
from .files import atomic_output
from .kinds import skops_types

__all__ = ["Head", "load_head", "dump_head", "load_head_dict", "SKOPS_TRUSTED", "FORMAT", "FORMAT_VERSION"]

FORMAT = "featurecache-head"
FORMAT_VERSION = 1
# types a head may hold beyond what skops trusts by default: each head kind names its own
# (featurecache's estimators, the optimizer state an MLP keeps); loading reads the registry
# (kinds.skops_types()), so a kind registered later is trusted too
SKOPS_TRUSTED = skops_types()


def _is_skops(path: Path) -> bool:
    return path.suffix.lower() == ".skops"


def dump_head(data: dict, path) -> Path:
    """Write a head dict to ``path`` (skops for ``.skops``, joblib otherwise), atomically."""
    path = Path(path)
    if not path.parent.is_dir():
        raise HeadError(f"folder {path.parent} does not exist; create it first.")
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **data}
    with atomic_output(path) as tmp:
        if _is_skops(path):
            _skops().dump(data, tmp)
        else:
            import joblib

            joblib.dump(data, tmp)
    return path


def load_head_dict(path) -> dict:
    """Read a head dict; ``.skops`` files are checked against the allow-list first.

    Raises:
        HeadError: missing, unreadable, untrusted types (named), or not a featurecache head.
    """
    path = Path(path)
    if not path.is_file():
        raise HeadError(f"head file {path} does not exist.")
    with open(path, "rb") as f:
        if f.read(8) == b"\x89HDF\r\n\x1a\n":
            raise HeadError(f"{path} is a feature file, not a head: the head comes first "
                            f"(`featurecache predict HEAD IMAGES`, `featurecache score HEAD "
                            f"FEATURES`).")
    try:
        if _is_skops(path):
            sio = _skops()
            trusted = skops_types()
            untrusted = [t for t in sio.get_untrusted_types(file=path) if t not in trusted]
            if untrusted:
                raise HeadError(f"{path} holds types that a featurecache head never contains and "
                                f"that could run code when loaded: {', '.join(untrusted)}. "
                                f"Refusing to load it.")
            data = sio.load(path, trusted=list(trusted))
        else:
            import joblib

            data = joblib.load(path)
    except HeadError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling / unzipping fails in many ways
        kind = "skops" if _is_skops(path) else "joblib"
        raise HeadError(f"cannot read {path} as a {kind} file ({type(exc).__name__}: {exc}).") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise HeadError(f"{path} is not a featurecache head (make one with `featurecache fit-head`).")
    if data.get("format_version") != FORMAT_VERSION:
        raise HeadError(f"{path} is head format {data.get('format_version')}; this featurecache "
                        f"reads {FORMAT_VERSION}. Fit it again.")
    return data


def _skops():
    try:
        import skops.io as sio
    except ImportError:
        raise HeadError("the .skops format needs the skops package: `pip install skops`.") from None
    return sio


# provenance fields a head and a feature file (or an image pipeline) must agree on
_MATCH_KEYS = ("backbone", "weights", "weights_sha256", "preprocess", "specs")


@dataclass
class Head:
    """A fitted head plus what it needs to be checked against features or images: a
    :class:`featurecache.saved.SavedModel`, as a fine-tuned model is.

    Attributes end in ``_`` when they come from fitting (sklearn's convention).
    """

    MATCH_KEYS = _MATCH_KEYS  # (no annotation: not a field) what features or images must share

    pipeline_: object              # sklearn Pipeline(StandardScaler, estimator)
    kind: str
    kernel: str
    layer: str
    classes: list
    provenance: dict               # backbone, weights, weights_sha256, preprocess, specs, ...
    params_: dict
    cv_score_: float
    cv_results_: list
    scoring: str = "balanced_accuracy"
    meta: dict = field(default_factory=dict)

    def features(self, X) -> np.ndarray:
        return np.asarray(X, dtype=np.float32)

    def predict(self, X) -> np.ndarray:
        return self.pipeline_.predict(self.features(X))

    def predict_proba(self, X) -> np.ndarray | None:
        """Class probabilities, or None for an SVM fitted without ``probability``."""
        if not hasattr(self.pipeline_[-1], "predict_proba"):
            return None
        return self.pipeline_.predict_proba(self.features(X))

    def scores(self, X) -> np.ndarray:
        """``(n, n_classes)`` scores: probabilities when available, else decision values."""
        p = self.predict_proba(X)
        if p is not None:
            return p
        d = self.pipeline_.decision_function(self.features(X))
        return np.stack([-d, d], 1) if d.ndim == 1 else d

    def check_compatible(self, provenance: dict, what: str = "the features") -> None:
        """Refuse features (or an image pipeline) made differently from this head's training.

        Raises:
            HeadError: naming the first field that differs.
        """
        for key in self.MATCH_KEYS:
            mine, theirs = self.provenance.get(key), provenance.get(key)
            if key == "specs":
                mine = [{k: s[k] for k in ("node", "kind", "pool", "dim")} for s in mine or []]
                theirs = [{k: s[k] for k in ("node", "kind", "pool", "dim")} for s in theirs or []]
            if mine != theirs:
                raise HeadError(f"this head was trained on layer {self.layer!r} with {key} = "
                                f"{mine!r}, but for {what}, {key} = {theirs!r}.")

    @property
    def column_classes(self) -> list:
        """Class names in the order of the columns of :meth:`scores` / :meth:`predict_proba`
        (the fitted estimator's ``classes_``, which index :attr:`classes`)."""
        return [self.classes[int(i)] for i in self.pipeline_.classes_]

    def evaluate(self, features, split: str = "test") -> dict:
        """Score this head on ``split`` of a feature file made the same way.

        Returns ``{n, accuracy, balanced_accuracy, macro_f1, split, feature_file}``.

        Raises:
            HeadError: the file was made differently (names the field), lacks the layer, or
                holds classes this head does not know.
            StoreError: the file is unfinished or has no such split.
        """
        from .stats import point_metrics
        from .store import FeatureFile, open_features

        ff = features if isinstance(features, FeatureFile) else open_features(features)
        ff.check_complete()
        ff.check_layer(self.layer)
        self.check_compatible(ff.layer_provenance(self.layer), str(ff.path))
        y = ff.y(split)
        unknown = sorted({ff.classes[i] for i in set(y.tolist())} - set(self.classes))
        if unknown:
            raise HeadError(f"{ff.path} has {split} rows of classes this head was not trained "
                            f"on: {unknown}.")
        index = {c: i for i, c in enumerate(self.classes)}
        y = np.array([index[ff.classes[i]] for i in y], dtype=np.int64)
        pred = self.predict(ff.X(self.layer, split))
        return {"feature_file": str(ff.path), "split": split, "n": int(len(y)),
                **point_metrics(y, pred, len(self.classes))}

    def describe(self) -> str:
        """What this model is, in a phrase: ``logreg head on avgpool``."""
        return f"{self.kind} head on {self.layer}"

    def image_scorer(self):
        """An :class:`~featurecache.extract.ImageScorer` for images: the head's backbone
        rebuilt from its provenance (same weights, checked by sha256), run up to its layer,
        the features rounded to the stored dtype as in training, then this head.

        Raises:
            HeadError: the rebuilt backbone does not match the head's training (the field).
        """
        from .extract import ImageScorer

        bb, extractor, dtype = self._extractor()

        def score(images):
            out = extractor(images)  # rounded to the stored dtype, as the head saw in training
            X = np.concatenate([out[s.name].cpu().numpy().astype(dtype) for s in extractor.specs], axis=1)
            proba = self.predict_proba(X)
            return (proba, True) if proba is not None else (self.scores(X), False)

        # score columns follow the fitted estimator's classes, which index self.classes
        return ImageScorer(bb, score, self.column_classes, (bb.model,))

    def _extractor(self):
        """``(backbone, FeatureExtractor of the head's layers, stored dtype)``: the backbone
        rebuilt from the provenance and checked against it."""
        from .backbones import backbone_for
        from .extract import FeatureExtractor
        from .layers import LayerSpec

        prov = self.provenance
        bb = backbone_for(prov)
        specs = [LayerSpec.from_attrs(s) for s in prov["specs"]]
        self.check_compatible({**prov, **bb.provenance(), "specs": prov["specs"]}, "the images")
        extractor = FeatureExtractor(bb.model, specs)  # shares the model's modules
        return bb, extractor, prov.get("dtype") or "float32"

    def exportable(self):
        """An :class:`~featurecache.export.Exportable`: images -> the layers, pooled and
        rounded as in training -> the head as torch layers (its kind's ``torch_head``).

        Raises:
            ExportError: the head's kind (or its fitted estimator) cannot be exported.
        """
        from . import kinds
        from .export import Exportable, HeadGraph

        head = kinds.get(self.kind).torch_head(self.pipeline_)
        bb, extractor, dtype = self._extractor()
        return Exportable(HeadGraph(extractor, dtype, head.eval()).eval(), head.outputs,
                          self.column_classes, bb,
                          {"layer": self.layer, "head": self.kind, "kernel": self.kernel,
                           "params": self.params_, "feature_dtype": dtype,
                           "cv_score": self.cv_score_, "scoring": self.scoring})

    def save(self, path) -> Path:
        """Save as joblib (any suffix) or skops (``.skops``: safe to load from others)."""
        return dump_head({k: getattr(self, k) for k in self.__dataclass_fields__}, path)


def load_head(path) -> Head:
    """Load a head saved by :meth:`Head.save` (``.joblib`` or ``.skops``).

    joblib files are pickles: only load trusted ones. ``.skops`` files are checked against an
    allow-list of types before anything is built.

    Raises:
        HeadError: the file is missing, unreadable, untrusted, or not a featurecache head.
    """
    from pathlib import Path

    p = Path(path)
    if p.name in ("summary.json", "curve.png") and (p.parent / "model.pt").exists():
        raise HeadError(f"{path} is a file of the fine-tune in {p.parent}; give the folder "
                        f"({p.parent}) or {p.parent / 'model.pt'}.")
    data = load_head_dict(path)
    if data.get("task", "classify") != "classify":  # a dense head (segment, detect)
        from .dense.model import DenseHead

        return DenseHead.from_dict(data, path)
    required = [k for k, f in Head.__dataclass_fields__.items()
                if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in data]
    prov = data.get("provenance")
    if not missing and isinstance(prov, dict):
        missing = [f"provenance.{k}" for k in ("backbone", "weights", "preprocess", "specs")
                   if k not in prov]
    if missing or not hasattr(data["pipeline_"], "predict") or not isinstance(prov, dict) \
            or not isinstance(data["classes"], list) or not data["classes"]:
        what = f"it lacks {', '.join(missing)}" if missing else "its fields have the wrong types"
        raise HeadError(f"{path} is a damaged or edited featurecache head ({what}); fit it "
                        f"again with `featurecache fit-head` (or `compare`).")
    return Head(**{k: data[k] for k in Head.__dataclass_fields__ if k in data})
