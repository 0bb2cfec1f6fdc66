"""The detection probe: which depth of the stored maps detects best, with a cell head
(objectness and class in one: background is class 0) and a box regression per map cell.

For each probe (a stored map, or a hypercolumn) and head:

1. every cell of a training image is labelled with the class of the box whose centre falls in
   it (the larger box when two do), or background; the positive cells regress their box:
   the centre's offset from the cell centre and the log of its width and height, in cells;
2. every positive cell and a seeded share of the background cells (about ``n_cells`` in all)
   are read in bounded batches; the cell head is searched by CV grouped by image on cell
   mIoU (the CV score of a row), the regression is a ``RidgeCV`` on the positive cells;
3. on the test split, a box is a cell whose class probability is a 3x3 local maximum over
   ``THRESHOLD``, regressed, then non-maximum suppression per class (IoU 0.5, at most 100
   boxes per image); COCO mAP@0.5 by ``pycocotools``.

The point is the depth comparison, not a state-of-the-art detector.
"""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np

from ..errors import HeadError
from ..options import validated
from . import cells
from . import heads as cell_heads

__all__ = ["detect", "cell_targets", "decode_boxes", "map50", "THRESHOLD"]

THRESHOLD = 0.05   # lowest class probability of a box (COCO evaluations keep low scores)
NMS_IOU = 0.5
MAX_BOXES = 100    # per image, as COCO's maxDets


def cell_targets(boxes_per_image, grid: int, size: int):
    """``(labels (n, g, g) int64, offsets (n, g, g, 4) float32)``: each cell's class (0 =
    background) and, for a positive cell, its box as ``(dx, dy, log w, log h)`` in cells."""
    n = len(boxes_per_image)
    labels = np.zeros((n, grid, grid), dtype=np.int64)
    offsets = np.zeros((n, grid, grid, 4), dtype=np.float32)
    cell = size / grid
    for i, boxes in enumerate(boxes_per_image):
        for c, x, y, w, h in sorted(boxes, key=lambda b: b[3] * b[4]):  # larger last: it wins
            cx, cy = x + w / 2, y + h / 2
            j, k = min(grid - 1, int(cy // cell)), min(grid - 1, int(cx // cell))
            labels[i, j, k] = int(c)
            offsets[i, j, k] = (cx / cell - (k + 0.5), cy / cell - (j + 0.5),
                                np.log(max(w, 1e-3) / cell), np.log(max(h, 1e-3) / cell))
    return labels, offsets


def decode_boxes(probs: np.ndarray, meta: dict, out_size=None, offsets=None,
                 features=None) -> dict:
    """Boxes of one image from its cell probabilities ``(g, g, K)``: 3x3 local maxima of
    each class over the threshold, regressed (``offsets (g, g, 4)``, or predicted from the
    cells' ``features`` by ``meta["regressor"]``), NMS. Returns ``{"size": (W, H),
    "boxes": [[class, x, y, w, h, score], ...]}`` in the pixels of ``out_size`` (default:
    the input size)."""
    import torch
    import torch.nn.functional as F
    from torchvision.ops import batched_nms

    size = meta["size"]
    g = probs.shape[0]
    W, H = out_size or (size, size)
    p = torch.from_numpy(np.ascontiguousarray(probs.transpose(2, 0, 1)))[1:]  # no background
    peak = (p == F.max_pool2d(p[None], 3, stride=1, padding=1)[0]) & (p >= meta["threshold"])
    cls, rows, cols = (t.numpy() for t in torch.nonzero(peak, as_tuple=True))
    if not len(cls):
        return {"size": (int(W), int(H)), "boxes": []}
    if offsets is None:
        offsets = meta["regressor"].predict(features.reshape(g, g, -1)[rows, cols])
    else:
        offsets = offsets[rows, cols]
    cell = size / g
    cx = (cols + 0.5 + offsets[:, 0]) * cell
    cy = (rows + 0.5 + offsets[:, 1]) * cell
    w = np.exp(np.clip(offsets[:, 2], -6, 6)) * cell
    h = np.exp(np.clip(offsets[:, 3], -6, 6)) * cell
    xyxy = np.stack([np.clip(cx - w / 2, 0, size), np.clip(cy - h / 2, 0, size),
                     np.clip(cx + w / 2, 0, size), np.clip(cy + h / 2, 0, size)], 1)
    score = p[cls, rows, cols].numpy()
    ok = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    xyxy, score, cls = xyxy[ok], score[ok], cls[ok]
    keep = batched_nms(torch.from_numpy(xyxy).float(), torch.from_numpy(score).float(),
                       torch.from_numpy(cls), NMS_IOU).numpy()[:MAX_BOXES]
    sx, sy = W / size, H / size
    out = [[int(cls[i]) + 1, float(xyxy[i, 0] * sx), float(xyxy[i, 1] * sy),
            float((xyxy[i, 2] - xyxy[i, 0]) * sx), float((xyxy[i, 3] - xyxy[i, 1]) * sy),
            float(score[i])] for i in keep]
    return {"size": (int(W), int(H)), "boxes": out}


def map50(truth: list, predicted: list, n_classes: int, size: int) -> tuple:
    """COCO mAP@0.5 (pycocotools) of per-image boxes (``truth``: ``[[c, x, y, w, h]]``,
    ``predicted``: ``[[c, x, y, w, h, score]]``), and the AP@0.5 of each class id (None for
    a class without true boxes)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    anns = []
    for i, bs in enumerate(truth):
        for c, x, y, w, h in bs:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    gt.dataset = {"images": [{"id": i + 1, "width": size, "height": size}
                             for i in range(len(truth))],
                  "annotations": anns, "categories": [{"id": c} for c in range(1, n_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dets = [{"image_id": i + 1, "category_id": int(c), "bbox": [x, y, w, h], "score": s}
                for i, bs in enumerate(predicted) for c, x, y, w, h, s in bs]
        if not dets or not anns:
            return 0.0, {c: (None if not any(a["category_id"] == c for a in anns) else 0.0)
                         for c in range(1, n_classes)}
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    prec = ev.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, every recall, class, all areas, 100
    per = {}
    for k, c in enumerate(ev.params.catIds):
        v = prec[:, k]
        has = any(a["category_id"] == c for a in anns)
        per[c] = float(v[v > -1].mean()) if has and (v > -1).any() else (0.0 if has else None)
    return max(0.0, float(ev.stats[1])), per


def _sample(ff, probe, train, size, n_cells, seed):
    """All positive cells of the training images and a seeded share of background cells:
    ``(X, labels, offsets, groups)``."""
    boxes = ff.target_rows("boxes", train)
    n_pos = int(sum(len(b) for b in boxes))
    neg_each = max(1, int(np.ceil(max(n_cells - n_pos, len(train)) / len(train))))
    Xs, ys, os_, gs = [], [], [], []
    step = cells.images_per_batch(probe)
    for s in range(0, len(train), step):
        batch = train[s:s + step]
        lab, off = cell_targets(boxes[s:s + step], probe.grid, size)
        feats = cells.grid_features(ff, probe, batch).reshape(len(batch), -1, probe.dim)
        lab, off = lab.reshape(len(batch), -1), off.reshape(len(batch), -1, 4)
        for j, r in enumerate(batch):
            pos, neg = np.flatnonzero(lab[j] > 0), np.flatnonzero(lab[j] == 0)
            rng = np.random.default_rng([seed, int(r)])
            take = np.sort(np.r_[pos, rng.choice(neg, min(neg_each, len(neg)), replace=False)])
            Xs.append(feats[j, take])
            ys.append(lab[j, take])
            os_.append(off[j, take])
            gs.append(np.full(len(take), int(r)))
    return np.concatenate(Xs), np.concatenate(ys), np.concatenate(os_), np.concatenate(gs)


def _regressor(X, y, offsets):
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pos = y > 0
    if not pos.any():
        raise HeadError("no training box has its centre in a cell: the images have no boxes.")
    return make_pipeline(StandardScaler(), RidgeCV(alphas=(0.1, 1.0, 10.0, 100.0, 1000.0))).fit(
        X[pos].astype(np.float32), offsets[pos])


def detect_outputs(head, feats: np.ndarray, sizes) -> list:
    """The boxes of each image from its grid features ``(b, g, g, dim)`` (a saved head on new
    images, or the probe on the test split)."""
    g, dim = feats.shape[1], feats.shape[-1]
    probs = head.model_.probabilities(feats.reshape(-1, dim)).reshape(len(feats), g, g, -1)
    return [decode_boxes(probs[j], head.meta, size, features=feats[j])
            for j, size in enumerate(sizes)]


@validated("detect")
def detect(features, out_dir, *, layers: list = [], hypercolumn: list = ["auto"],  # noqa: B006
           heads: list = ["logreg"], n_cells: int = 30000, cv: int = 3,  # noqa: B006
           n_jobs: int = -1, seed: int = 0, overwrite: bool = False,
           progress: bool = True):
    """Compare the stored maps (and hypercolumns) x cell heads for detection by COCO
    mAP@0.5; write the report folder (``results.json``, ``report.md``,
    ``layer_depth.png``, ``predictions.png``, ``heads/``, ``best.joblib``).

    Raises:
        HeadError: the file has no boxes or maps, or too few images for the CV.
        UnknownLayerError: a layer whose map is not stored.
        FeaturecacheError: the output folder exists and is not empty (without ``overwrite``).
    """
    from ..files import output_folder
    from . import report
    from .model import DenseHead
    from .segment import _hyper, _Progress, DenseReport, choose, dense_provenance, open_dense, split_rows

    t0 = time.perf_counter()
    try:
        import pycocotools  # noqa: F401 - the mAP@0.5
    except ImportError:
        raise HeadError("detect scores boxes with pycocotools, which is not installed: "
                        "pip install 'featurecache[dense]'.") from None
    out = output_folder(out_dir, overwrite, "detection report")
    ff = open_dense(features, "boxes")
    probes = cells.probes_for(ff, layers, _hyper(hypercolumn))
    kinds = [cell_heads.get(h) for h in dict.fromkeys(heads)]
    train, test = split_rows(ff)
    classes = list(ff.classes)
    K, size = len(classes), int(ff.provenance["preprocess"]["crop"])
    truth = ff.target_rows("boxes", test)
    show = [int(r) for r in test[:4]]
    bar = _Progress(progress, len(probes) * len(kinds), "detect")
    rows, heads_of = [], {}
    try:
        for probe in probes:
            bar.note(f"{probe.name}: sampling cells")
            X, y, offsets, groups = _sample(ff, probe, train, size, n_cells, seed)
            reg = _regressor(X, y, offsets)
            for kind in kinds:
                bar.note(f"{probe.name} {kind.name}: CV")
                t1 = time.perf_counter()
                params, cv_score, results = kind.search(X, y, groups, K, folds=cv, n_jobs=n_jobs)
                head = DenseHead("detect", kind.name, probe.layers, probe.grid, classes,
                                 dense_provenance(ff, probe), kind.fit(X, y, params, K), params,
                                 cv_score, {"regressor": reg, "size": size,
                                            "threshold": THRESHOLD})
                bar.note(f"{probe.name} {kind.name}: test")
                predicted = []
                step = cells.images_per_batch(probe)
                for s in range(0, len(test), step):
                    feats = cells.grid_features(ff, probe, test[s:s + step])
                    predicted += [o["boxes"] for o in
                                  detect_outputs(head, feats, [None] * len(feats))]
                m, per = map50(truth, predicted, K, size)
                row = {"layer": probe.name, "head": kind.name, "backbone": ff.provenance["backbone"],
                       "grid": probe.grid, "dim": probe.dim, "depth": probe.depth,
                       "n_cells": int(len(y)), "n_positive_cells": int((y > 0).sum()),
                       "cv_score": cv_score, "params": params, "map50": m,
                       "map50_lo": None, "map50_hi": None,
                       "per_class_ap50": {classes[c]: v for c, v in per.items()},
                       "n_test": int(len(test)),
                       "seconds": round(time.perf_counter() - t1, 2), "cv_results": results}
                rows.append(row)
                heads_of[id(row)] = (head, {int(r): b for r, b in zip(test, predicted)
                                            if int(r) in show})
                bar.step()
    finally:
        bar.close()
    winner = choose(rows)
    info = {"features": str(ff.path), "n_train_images": int(len(train)),
            "n_test_images": int(len(test)), "classes": classes, "cv": cv, "n_cells": n_cells,
            "seed": seed, "cv_score": "cell mIoU of the centre-cell classifier",
            "seconds": round(time.perf_counter() - t0, 2)}
    report.publish(out, "detect", rows, winner, info, lambda r: heads_of[id(r)][0],
                   pictures=lambda path: report.box_picture(
                       path, ff, show, heads_of[id(winner)][1], classes, winner))
    return DenseReport(rows, winner, out, "detect", info)
