"""Classify new images end to end: images -> the head's backbone and layer -> the head.

The backbone is rebuilt from the head's provenance (same weights, checked by sha256; same
preprocessing and pooling), run only up to the head's layer, and its features are stored
at the training dtype before the head sees them, so predictions match the head's output on
the feature file for the same images.

Example::

    >>> rows = predict("reports/run1/best.joblib", ["photos/"])   # doctest: +SKIP
    >>> rows[0]["predicted"], rows[0]["probability"]             # doctest: +SKIP
    ('bird', 0.93)
"""

from __future__ import annotations

import csv
import glob
import json
from pathlib import Path

import numpy as np
import torch

from .backbones import DEFAULT_BACKBONE, backbone_for, load_backbone
from .data import ImageDataset, Record, collate
from .data.folders import IMAGE_EXTENSIONS, is_hidden
from .errors import DataError, FeaturecacheError
from .extract import default_device, on_device, to_layout
from .files import atomic_output, require_folder
from .options import validated

__all__ = ["predict", "predict_imagenet", "score", "expand_images", "write_predictions",
           "backbone_for"]


def expand_images(items) -> list[str]:
    """Files, folders (searched recursively for images, hidden entries left out) and glob
    patterns -> sorted paths. A name that exists is taken as it is, even with ``[`` or ``*``
    in it (``photo [1].png``); only a name that does not exist is expanded as a pattern."""
    out = []
    for item in items:
        item = str(item)
        p = Path(item)
        if p.is_dir():
            out += sorted(str(q) for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS
                          and not any(is_hidden(part) for part in q.relative_to(p).parts))
        elif not p.exists() and not p.is_symlink() and any(ch in item for ch in "*?["):
            out += sorted(glob.glob(item, recursive=True))
        else:
            out.append(item)  # a missing file is reported in its row
    if not out:
        raise DataError(f"no images found in {list(map(str, items))}.")
    return out


def _rows(paths, bb, score_fn, classes, top_k, batch_size, num_workers, dev) -> list[dict]:
    """Decode ``paths`` in batches and turn ``score_fn(images) -> (scores, are_probabilities)``
    into one row per image; an unreadable image gets a row with its reason."""
    records = [Record(p, -1, "") for p in paths]
    dataset = ImageDataset(records, bb.preprocess.transform(), bb.preprocess.exif)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         num_workers=num_workers)
    rows: list = [None] * len(paths)
    for batch in loader:
        for i, reason in batch.failed:
            rows[i] = {"path": paths[i], "predicted": None, "class_index": None,
                       "probability": None, "score": None, "top_k": [], "error": reason}
        if batch.images is None:
            continue
        with torch.inference_mode():
            scores, are_proba = score_fn(to_layout(batch.images.to(dev)))
        for j, i in enumerate(batch.index):
            order = np.argsort(-scores[j])[:top_k]
            best = int(order[0])
            rows[i] = {"path": paths[i], "predicted": classes[best], "class_index": best,
                       "probability": float(scores[j, best]) if are_proba else None,
                       "score": float(scores[j, best]),
                       "top_k": [[classes[k], float(scores[j, k])] for k in order], "error": None}
    return rows


@validated("predict")
def predict(head, images, top_k: int = 3, batch_size: int = 32, device: str | None = None,
            num_workers: int = 0) -> list[dict]:
    """Predict classes for ``images`` (files, folders, globs) with a saved head, or with a
    fine-tuned model (``ft/`` or ``ft/model.pt``: the frozen bottom, then the tuned top).

    Returns one dict per image: ``path``, ``predicted``, ``class_index``, ``probability``
    (None for an SVM without probability estimates), ``score``, ``top_k``
    (``[[class, score], ...]``) and ``error`` (the reason when the image could not be read;
    the other images are still predicted).
    """
    from .saved import load_model

    model = load_model(head)  # a Head or a Finetuned, loaded already or from its path
    paths = expand_images(images)
    scorer = model.image_scorer()  # checks the rebuilt backbone against the training's
    dev = default_device(device)
    with scorer.on(dev):  # in the layout the embed ran it in
        return _rows(paths, scorer.backbone, scorer.score, scorer.classes, top_k, batch_size,
                     num_workers, dev)


@validated("predict_imagenet")
def predict_imagenet(images, backbone: str = DEFAULT_BACKBONE, weights: str = "DEFAULT",
                     weights_file=None, top_k: int = 3, batch_size: int = 32,
                     device: str | None = None) -> list[dict]:
    """Use the backbone's own 1000-class ImageNet head ("use the pretrained model directly")."""
    bb = load_backbone(backbone, weights, weights_file)
    if bb.categories is None:
        raise FeaturecacheError(f"{backbone} has no 1000-class ImageNet head to predict with.")
    paths = expand_images(images)
    dev = default_device(device)
    with on_device(bb.model, dev) as model:
        return _rows(paths, bb, lambda x: (model(x).softmax(1).cpu().numpy(), True),
                     bb.categories, top_k, batch_size, 0, dev)


@validated("write_predictions")
def write_predictions(rows: list, dest, fmt: str = "csv"):
    """Write prediction rows as CSV (top-k joined as ``class:score;...``) or JSON, to a path
    (atomically: whole or not at all) or to an open text stream such as ``sys.stdout``."""
    if hasattr(dest, "write"):
        _write_rows(rows, dest, fmt)
        return dest
    path = Path(dest)
    require_folder(path)
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="") as f:
            _write_rows(rows, f, fmt)
    return path


@validated("score")
def score(head, features, *, split: str = "test") -> tuple[str, dict]:
    """Evaluate a saved head, or a fine-tuned model (``ft/`` or ``ft/model.pt``: on the file's
    stored map), on ``split`` of a feature file.

    Returns ``(what, scores)``: what was scored (``"logreg head on avgpool"``) and its
    ``evaluate`` result (``n``, ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ...).
    """
    from .saved import load_model

    model = load_model(head)
    return model.describe(), model.evaluate(features, split=split)


def _write_rows(rows: list, f, fmt: str) -> None:
    if fmt == "json":
        f.write(json.dumps(rows, indent=1) + "\n")
        return
    w = csv.writer(f)
    w.writerow(["path", "predicted", "probability", "score", "top_k", "error"])
    for r in rows:
        w.writerow([r["path"], r["predicted"] or "",
                    "" if r["probability"] is None else f"{r['probability']:.6f}",
                    "" if r["score"] is None else f"{r['score']:.6f}",
                    ";".join(f"{c}:{s:.4f}" for c, s in r["top_k"]), r["error"] or ""])
