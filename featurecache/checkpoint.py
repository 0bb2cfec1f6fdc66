"""The file of a fine-tuned model (``ft/model.pt``): save, load, check, predict.

A torch checkpoint of plain data only (tensors, numbers, strings, lists, dicts), so it loads
with ``torch.load(weights_only=True)``: no pickled code runs. It holds the state of the
fine-tuned top blocks and classifier, the classes, the training history, and the provenance
needed to rebuild the rest: the backbone, its weights (and their sha256), the preprocessing,
the ``--from`` layer and its map (node, shape, dtype), and the final pooled layer. Loading
rebuilds the frozen bottom from the same weights (checked by sha256) and cuts the same top
blocks out of it, then loads the fine-tuned state into them.

Example::

    >>> ft = load_finetuned("ft/model.pt")                            # doctest: +SKIP
    >>> ft.provenance["from_layer"], ft.classes[:2]                  # doctest: +SKIP
    ('stage4', ['airplane', 'bird'])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import HeadError

__all__ = ["Finetuned", "save_finetuned", "load_finetuned", "is_checkpoint", "FORMAT"]

FORMAT = "featurecache-finetuned"
VERSION = 1
# what a feature file (or an image pipeline) must share with the checkpoint's training maps
MATCH_KEYS = ("backbone", "weights_sha256", "preprocess", "from_node", "map_shape")


def is_checkpoint(path) -> bool:
    """A folder (a fine-tune's, holding ``model.pt``; heads are files) or a ``.pt`` file."""
    p = Path(path)
    return p.is_dir() or p.suffix == ".pt"


@dataclass
class Finetuned:
    """A loaded fine-tuned model: ``model`` maps the ``--from`` map to class scores. A
    :class:`featurecache.saved.SavedModel`, as a frozen head is."""

    MATCH_KEYS = MATCH_KEYS  # (no annotation: not a field) what maps or images must share

    model: torch.nn.Module
    backbone: object
    classes: list
    provenance: dict
    history: list
    path: Path
    run_id: str | None = None    # the fine-tune run that wrote model.pt and summary.json

    def check_compatible(self, provenance: dict, what: str = "the features",
                         keys=MATCH_KEYS) -> None:
        """Refuse maps made differently from the training maps, naming the field.

        Raises:
            HeadError: the first field of :data:`MATCH_KEYS` that differs.
        """
        for key in keys:
            mine, theirs = self.provenance.get(key), provenance.get(key)
            if mine != theirs:
                raise HeadError(f"{self.path} was fine-tuned on maps with {key} = {mine!r}, "
                                f"but {what} has {key} = {theirs!r}; use maps made the same way.")

    @torch.inference_mode()
    def scores(self, maps: torch.Tensor) -> np.ndarray:
        """Class probabilities ``(b, n_classes)`` of a batch of maps."""
        self.model.eval()
        return self.model(maps).softmax(1).cpu().numpy()

    def predict_file(self, ff, split: str | None = None, batch_size: int = 32) -> tuple:
        """``(rows, class indices of self.classes)``: predictions on the stored maps of
        ``split`` (all rows when None) of a feature file made as the training maps were."""
        feed = self.maps_of(ff)
        rows = np.arange(ff.n_rows) if split is None else np.flatnonzero(feed.splits == split)
        pred = np.empty(len(rows), dtype=np.int64)
        dev = next(self.model.parameters()).device
        for pos, maps in feed.batches(rows, batch_size):
            pred[pos] = self.scores(maps.to(dev)).argmax(1)
        return rows, pred

    def evaluate(self, features, split: str = "test") -> dict:
        """Score on ``split`` of a feature file that stores the ``--from`` map (as
        :meth:`featurecache.heads.Head.evaluate` does for heads)."""
        from .stats import point_metrics
        from .store import FeatureFile, open_features

        ff = features if isinstance(features, FeatureFile) else open_features(features)
        ff.check_complete()
        if ff.classes != self.classes:
            raise HeadError(f"{ff.path} has classes {ff.classes}; {self.path} was fine-tuned "
                            f"on {self.classes}.")
        ff.y(split)  # names the splits present when there is no such split
        rows, pred = self.predict_file(ff, split)
        y = ff.y()[rows]
        return {"feature_file": str(ff.path), "split": split, "n": int(len(y)),
                **point_metrics(y, pred, len(self.classes))}

    def describe(self) -> str:
        """What this model is, in a phrase: ``fine-tuned top of efficientnet_lite0 above
        stage4``."""
        p = self.provenance
        return f"fine-tuned top of {p['backbone']} above {p['from_layer']}"

    def image_scorer(self):
        """An :class:`~featurecache.extract.ImageScorer`: ``images (b, 3, H, W) ->
        (probabilities, True)`` through the frozen bottom and the fine-tuned top, with the map
        pooled and rounded as the training maps were."""
        from .extract import ImageScorer, raw_extractor, to_layout
        from .feeds import bottom_maps

        p = self.provenance
        bottom, _ = raw_extractor(self.backbone.model, [p["from_node"]])

        def score(images):
            maps = bottom_maps(bottom, images, p["from_node"], p["from_kind"],
                               p["map_shape"][1:], p["map_dtype"])
            return self.scores(to_layout(maps)), True
        return ImageScorer(self.backbone, score, self.classes, (self.backbone.model, self.model))

    def exportable(self):
        """An :class:`~featurecache.export.Exportable`: images -> the frozen bottom's map
        (pooled and rounded as the training maps were) -> the fine-tuned top."""
        import copy

        from .export import Exportable, FinetuneGraph
        from .extract import raw_extractor

        p = self.provenance
        bottom, _ = raw_extractor(self.backbone.model, [p["from_node"]])
        graph = FinetuneGraph(bottom, p["from_node"], p["from_kind"], p["map_shape"][1:],
                              p["map_dtype"], copy.deepcopy(self.model).eval())
        return Exportable(graph.eval(), ("logits", "probabilities"), list(self.classes),
                          self.backbone, {"from_layer": p["from_layer"],
                                          "final_layer": p.get("final_layer", p["final_node"]),
                                          "map_dtype": p["map_dtype"], "head": "finetuned"})

    def maps_of(self, ff):
        """The feed of a feature file's stored map of the ``--from`` layer, after checking it
        was made as the training maps were."""
        from .feeds import CachedMaps

        self.check_compatible(ff.provenance, str(ff.path), MATCH_KEYS[:3])  # the backbone
        spec = next((s for s in ff.maps.values() if s.node == self.provenance["from_node"]),
                    None)
        if spec is None:
            ff.check_map(self.provenance["from_layer"])  # raises, saying how to keep it
        self.check_compatible({"from_node": spec.node, "map_shape": list(spec.shape)},
                              str(ff.path), MATCH_KEYS[3:])
        return CachedMaps(ff, spec)


def save_finetuned(path, model, classes, provenance: dict, history: list, settings: dict,
                   run_id: str | None = None) -> None:
    torch.save({"format": FORMAT, "version": VERSION, "run_id": run_id, "classes": list(classes),
                "provenance": provenance, "history": history, "settings": settings,
                "state_dict": {k: v.detach().cpu().contiguous() for k, v in
                               model.state_dict().items()}}, path)


def load_finetuned(path) -> Finetuned:
    """Load ``ft/model.pt`` (or the ``ft/`` folder) and rebuild the model.

    Raises:
        HeadError: not a featurecache checkpoint, damaged, or its weights changed.
    """
    from .backbones import backbone_for
    from .topblocks import TopModel, split_top

    from .files import published

    p = Path(path)
    file = published(p) / "model.pt" if p.is_dir() else p
    if not file.is_file():
        raise HeadError(f"{path} is not a fine-tuned model (no model.pt); make one with "
                        f"`featurecache finetune`.")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise HeadError(f"{file} is not a readable fine-tuned model ({type(exc).__name__}); "
                        f"make it again with `featurecache finetune`.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise HeadError(f"{file} is a torch file but not a featurecache fine-tuned model.")
    prov = data["provenance"]
    bb = backbone_for(prov)
    top = split_top(bb.model, prov["from_node"], prov["final_node"])
    model = TopModel(top, prov["final_kind"], prov["final_pool"], int(prov["final_dim"]),
                     len(data["classes"]))
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as exc:
        raise HeadError(f"{file} does not fit the blocks of {prov['backbone']} above "
                        f"{prov['from_layer']} ({str(exc).splitlines()[0]}).") from None
    return Finetuned(model.eval(), bb, list(data["classes"]), prov, data.get("history", []),
                     file, data.get("run_id"))


def run_id_of(file) -> str | None:
    """The run id saved in a fine-tuned model file, read without loading its tensors."""
    try:
        data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the loader reports damaged files; here: no id
        return None
    return data.get("run_id") if isinstance(data, dict) else None
