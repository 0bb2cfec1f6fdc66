"""A saved dense head (:class:`DenseHead`): a cell head on one probe (a stored map or a
hypercolumn) of a frozen backbone, for segmentation (masks) or detection (boxes).

Its file is a head file (``.joblib``; :func:`featurecache.persist.dump_head`) with a
``task`` field; :func:`featurecache.saved.load_model` loads it like any head. For new
images it rebuilds the backbone from the provenance (same weights by sha256, the whole image
resized as in training), computes the maps, rounds them to the stored dtype and scores every
cell; a mask is the argmax of the scores upsampled bilinearly to the image's own size, boxes
are decoded on the input grid and scaled to the image. It refuses features or images made
otherwise, as a classification head does.

joblib files are pickles: load only heads you trust.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import HeadError

__all__ = ["DenseHead", "TASKS"]

MATCH_KEYS = ("backbone", "weights", "weights_sha256", "preprocess", "specs")


def _segment_outputs(head, feats: np.ndarray, sizes) -> list:
    """Masks ``(H, W)`` uint8 at each image's size (``(W, H)`` in ``sizes``) from its grid
    features ``(b, g, g, dim)``."""
    import torch

    from .segment import upsampled_argmax

    g, dim = feats.shape[1], feats.shape[-1]
    sc = head.model_.scores(feats.reshape(-1, dim)).reshape(len(feats), g, g, -1)
    sc = torch.from_numpy(np.ascontiguousarray(sc.transpose(0, 3, 1, 2)))
    return [upsampled_argmax(sc[j:j + 1], (h, w))[0] for j, (w, h) in enumerate(sizes)]


def _write_masks(head, paths, outputs, output) -> str:
    """One PNG per image in the folder ``output``, named by the image's stem (pixel = class
    id of classes.txt)."""
    from PIL import Image

    from ..files import atomic_output

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise HeadError(f"-o {out} is a file; a segmentation head writes one mask PNG per image "
                        f"into a folder: give a folder (it is created).")
    if not out.parent.is_dir():
        raise HeadError(f"folder {out.parent} does not exist; create it first.")
    stems = [Path(p).stem for p, o in zip(paths, outputs) if o is not None]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise HeadError(f"two images are named {twice[0]} (in different folders); the masks are "
                        f"named by the image's stem: predict those folders separately.")
    out.mkdir(exist_ok=True)
    n = 0
    for p, mask in zip(paths, outputs):
        if mask is None:
            continue
        with atomic_output(out / f"{Path(p).stem}.png") as tmp:
            Image.fromarray(mask, mode="L").save(tmp, format="PNG")
        n += 1
    return f"wrote {n} mask PNGs to {out}/"


def _detect_outputs(head, feats, sizes) -> list:
    from .detect import detect_outputs

    return detect_outputs(head, feats, sizes)


def _write_coco(head, paths, outputs, output) -> str:
    """A COCO results file: ``images`` (file names, sizes), ``annotations`` (bbox
    ``[x, y, w, h]`` in the image's pixels, ``category_id``, ``score``) and ``categories``
    (classes.txt ids and names, background left out)."""
    import json

    from ..files import atomic_output

    out = Path(output)
    if out.is_dir():
        raise HeadError(f"-o {out} is a folder; a detection head writes one COCO JSON file "
                        f"(e.g. -o boxes.json).")
    if not out.parent.is_dir():
        raise HeadError(f"folder {out.parent} does not exist; create it first.")
    images, anns = [], []
    for i, (p, boxes) in enumerate(zip(paths, outputs), 1):
        if boxes is None:
            continue
        w, h = boxes["size"]
        images.append({"id": i, "file_name": str(p), "width": int(w), "height": int(h)})
        for b in boxes["boxes"]:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(b[0]),
                         "bbox": [round(float(v), 2) for v in b[1:5]],
                         "score": round(float(b[5]), 5)})
    cats = [{"id": i, "name": c} for i, c in enumerate(head.classes) if i > 0]
    with atomic_output(out) as tmp:
        Path(tmp).write_text(json.dumps({"images": images, "annotations": anns,
                                         "categories": cats}, indent=1))
    return f"wrote {len(anns)} boxes of {len(images)} images to {out}"


# the tasks a dense head does: (grid features -> per-image outputs, how they are written)
TASKS = {"segment": (_segment_outputs, _write_masks),
         "detect": (_detect_outputs, _write_coco)}


@dataclass
class DenseHead:
    """A fitted dense head: :attr:`task` (``segment``/``detect``), the cell head
    :attr:`kind` on :attr:`layers` (a hypercolumn when several) upsampled to a
    :attr:`grid`, the :attr:`classes` of classes.txt and the :attr:`provenance` of its maps."""

    MATCH_KEYS = MATCH_KEYS

    task: str
    kind: str
    layers: tuple
    grid: int
    classes: list
    provenance: dict
    model_: object               # featurecache.dense.heads.CellModel
    params_: dict
    cv_score_: float
    meta: dict = field(default_factory=dict)  # ignore_index; detect: box regression, threshold
    dense = True                 # (class attribute) predict writes masks or boxes

    @property
    def layer(self) -> str:
        return "+".join(self.layers)

    def describe(self) -> str:
        what = {"segment": "segmentation", "detect": "detection"}[self.task]
        return f"{self.kind} {what} head on {self.layer}"

    def check_compatible(self, provenance: dict, what: str = "the features") -> None:
        """Refuse maps made otherwise (names the first field that differs)."""
        for key in self.MATCH_KEYS:
            mine, theirs = self.provenance.get(key), provenance.get(key)
            if key == "specs":
                keep = ("node", "kind", "pool", "dim", "shape")
                mine = [{k: s.get(k) for k in keep} for s in mine or []]
                theirs = [{k: s.get(k) for k in keep} for s in theirs or []]
            if mine != theirs:
                raise HeadError(f"this head was trained on the maps {self.layer!r} with {key} = "
                                f"{mine!r}, but for {what}, {key} = {theirs!r}.")

    def check_features(self, ff) -> None:
        for n in self.layers:
            ff.check_map(n)
        self.check_compatible({**{k: ff.provenance.get(k) for k in MATCH_KEYS},
                               "specs": [ff.maps[n].to_attrs() for n in self.layers]}, str(ff.path))

    def evaluate(self, features, split: str = "test") -> dict:
        raise HeadError(f"{self.describe()} predicts {'masks' if self.task == 'segment' else 'boxes'}"
                        f"; its test scores are in the report that made it (`featurecache "
                        f"{self.task} FEATURES -o REPORT/`), not `score`.")

    def image_scorer(self):
        raise HeadError(f"{self.describe()}: give -o (a folder for the mask PNGs, a .json "
                        f"for the COCO boxes) to `featurecache predict`.")

    def exportable(self):
        from ..errors import ExportError

        raise ExportError(f"{self.describe()}: dense heads are not exported (their masks and "
                          f"boxes are upsampled, peak-picked and suppressed outside a graph); "
                          f"export a classification head or fine-tune, and predict masks or "
                          f"boxes with `featurecache predict`.")

    def save(self, path) -> Path:
        from ..persist import dump_head

        path = Path(path)
        if path.suffix.lower() == ".skops":
            raise HeadError(f"{path}: dense heads are saved as .joblib (their k-NN cells and "
                            f"box regression are not in skops' trusted types).")
        return dump_head({"task": self.task, **{k: getattr(self, k) for k in
                                                self.__dataclass_fields__ if k != "task"}}, path)

    @classmethod
    def from_dict(cls, data: dict, path) -> "DenseHead":
        fields = [k for k in cls.__dataclass_fields__ if k != "meta"]
        missing = [k for k in fields if k not in data]
        if missing or data.get("task") not in TASKS or not hasattr(data.get("model_"), "scores"):
            raise HeadError(f"{path} is a damaged or edited dense head (it lacks "
                            f"{', '.join(missing) or 'a known task'}); make it again with "
                            f"`featurecache segment` or `detect`.")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    # -- new images ------------------------------------------------------------------------
    def predict_to(self, images, output, *, batch_size: int = 16, device=None) -> tuple:
        """Predict every image of ``images`` (files, folders, globs) and write the masks (a
        folder of PNGs) or the boxes (one COCO JSON) to ``output``. Returns ``(message,
        [(path, reason)] of the unreadable images)``."""
        import torch

        from ..backbones import backbone_for
        from ..data.decode import read_file
        from ..errors import DataError
        from ..extract import FeatureExtractor, default_device, on_device, to_layout
        from ..layers import LayerSpec
        from ..predict import expand_images
        from .cells import Probe, on_grid

        per_image, write = TASKS[self.task]
        paths = expand_images(images)
        bb = backbone_for(self.provenance)
        self.check_compatible({**self.provenance, **bb.provenance(),
                               "preprocess": bb.preprocess.to_dict()}, "the images")
        specs = [LayerSpec.from_attrs(s) for s in self.provenance["specs"]]
        extractor = FeatureExtractor(bb.model, specs)
        dtype = self.provenance.get("dtype") or "float32"
        transform = bb.preprocess.transform()
        probe = Probe(tuple(self.layers), self.grid, sum(s.shape[0] for s in specs), 0)
        dev = default_device(device)
        outputs, failed = [None] * len(paths), []
        with on_device(bb.model, dev):
            for s in range(0, len(paths), batch_size):
                idx, tensors, sizes = [], [], []
                for i in range(s, min(s + batch_size, len(paths))):
                    try:
                        img = read_file(paths[i], bb.preprocess.exif)
                    except DataError as exc:
                        failed.append((paths[i], str(exc)))
                        continue
                    idx.append(i)
                    sizes.append(img.size)
                    tensors.append(transform(img))
                if not idx:
                    continue
                with torch.inference_mode():
                    out = extractor(to_layout(torch.stack(tensors).to(dev)))
                maps = {sp.name: out[sp.key].cpu().numpy().astype(dtype) for sp in specs}
                for i, o in zip(idx, per_image(self, on_grid(probe, maps), sizes)):
                    outputs[i] = o
        if all(o is None for o in outputs):
            raise DataError(f"none of the {len(paths)} images could be read "
                            f"({failed[0][1]}).")
        return write(self, paths, outputs, output), failed
