"""The hand-written practitioner script for dense (segmentation) linear probes.

Independent of featurecache: reads an HDF5 feature file (``/maps/<layer>`` (N, C, S, S),
``/targets/mask`` (N, H, W) uint8 with 255 = ignore, ``/splits``, ``/classes``, root attribute
``n_committed``) and fits a per-cell logistic regression on one layer or a hypercolumn:

* every map cell of a train image is a sample labelled with the majority class of the mask
  pixels under it (ignore pixels excluded; cells with only ignore pixels dropped);
* ``n_cells`` of them are drawn at random; StandardScaler + LogisticRegression with C and
  class_weight chosen by GroupKFold CV (groups = image) on cell mIoU, then refit;
* test: cell logits upsampled bilinearly to the mask size, argmax, one pixel confusion matrix
  over the test set -> mIoU (mmseg style) and pixel accuracy.

    python benchmarks/dense_practitioner.py FILE.h5 [--layers stage3,stage4,stage3+stage4]
"""

from __future__ import annotations

import argparse
import json
import time

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, make_scorer
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

BATCH = 64  # images read at a time


def iou_per_class(cm):
    """IoU = TP / (TP + FP + FN) per class; NaN where the class is in neither truth nor prediction."""
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def cell_miou(y_true, y_pred):
    labels = np.union1d(y_true, y_pred)
    return float(np.nanmean(iou_per_class(confusion_matrix(y_true, y_pred, labels=labels))))


def upsample(x, size):
    """Bilinear (align_corners=False) resize of an (B, C, h, w) float32 array."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False).numpy()


def features(f, layers, rows, grid):
    """(len(rows), gh*gw, C_total) features of the images `rows` (increasing indices)."""
    maps = [upsample(f["maps"][name][rows].astype(np.float32), grid) for name in layers]
    x = np.concatenate(maps, axis=1)  # B, C, gh, gw
    return x.transpose(0, 2, 3, 1).reshape(len(rows), grid[0] * grid[1], -1)


def cell_labels(mask, grid, k):
    """Majority class of the mask pixels under each cell, -1 for all-ignore cells: (B, gh*gw)."""
    b, h, w = mask.shape
    cell = (np.arange(h) * grid[0] // h)[:, None] * grid[1] + (np.arange(w) * grid[1] // w)[None, :]
    n = grid[0] * grid[1]
    key = (np.arange(b)[:, None, None] * n + cell) * k + mask
    counts = np.bincount(key[mask != 255], minlength=b * n * k).reshape(b, n, k)
    return np.where(counts.sum(-1) > 0, counts.argmax(-1), -1)


def segment_probe(path, layers, *, n_cells=30000, seed=0, Cs=(0.01, 0.1, 1.0, 10.0), folds=3,
                  n_jobs=-1) -> dict:
    t0 = time.perf_counter()
    with h5py.File(path, "r") as f:
        n = int(f.attrs["n_committed"])
        splits = np.array([s.decode() if isinstance(s, bytes) else s for s in f["splits"][:n]])
        k = len(f["classes"])
        grid = max((f["maps"][name].shape[-2:] for name in layers), key=lambda s: s[0] * s[1])
        masks = f["targets/mask"]
        train, test = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "test")

        # Labels of every train cell (masks only, in batches), then the random subsample.
        labels = np.concatenate([cell_labels(masks[train[i:i + BATCH]], grid, k)
                                 for i in range(0, len(train), BATCH)])
        img, cell = np.nonzero(labels >= 0)  # row-major: sorted by image, then cell
        rng = np.random.RandomState(seed)
        if len(img) > n_cells:
            keep = np.sort(rng.choice(len(img), n_cells, replace=False))
            img, cell = img[keep], cell[keep]
        y, groups = labels[img, cell], train[img]

        # Features of the sampled cells only, reading the images that have any, in batches.
        X = []
        used = np.unique(img)
        for i in range(0, len(used), BATCH):
            chunk = used[i:i + BATCH]
            feats = features(f, layers, train[chunk], grid)
            sel = np.isin(img, chunk)
            X.append(feats[np.searchsorted(chunk, img[sel]), cell[sel]])
        X = np.concatenate(X)

        search = GridSearchCV(
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
            {"logisticregression__C": list(Cs), "logisticregression__class_weight": [None, "balanced"]},
            scoring=make_scorer(cell_miou), cv=GroupKFold(n_splits=folds), refit=True,
            n_jobs=n_jobs)
        search.fit(X, y, groups=groups)
        model = search.best_estimator_
        classes = model.classes_

        # Test: cell logits -> bilinear to mask size -> argmax; one confusion matrix over pixels.
        cm = np.zeros((k, k), dtype=np.int64)
        for i in range(0, len(test), BATCH):
            rows = test[i:i + BATCH]
            feats, gt = features(f, layers, rows, grid), masks[rows]
            logits = model.decision_function(feats.reshape(-1, feats.shape[-1]))
            if logits.ndim == 1:  # binary: the sign of the score decides
                logits = np.stack([-logits, logits], axis=1)
            logits = logits.reshape(len(rows), grid[0], grid[1], -1).transpose(0, 3, 1, 2)
            pred = classes[upsample(np.ascontiguousarray(logits, dtype=np.float32),
                                    gt.shape[1:]).argmax(1)]
            valid = gt != 255
            cm += np.bincount(gt[valid].astype(np.int64) * k + pred[valid],
                              minlength=k * k).reshape(k, k)

    iou = iou_per_class(cm)
    best = search.best_params_
    return {"layers": list(layers), "miou": float(np.nanmean(iou)),
            "pixel_accuracy": float(np.trace(cm) / cm.sum()), "cv_score": float(search.best_score_),
            "C": best["logisticregression__C"], "class_weight": best["logisticregression__class_weight"],
            "seconds": time.perf_counter() - t0,
            "per_class_iou": [None if np.isnan(v) else float(v) for v in iou]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--layers", help="comma-separated probes; a+b+c is a hypercolumn "
                    "(default: each map, and stage3+stage4+the 7x7 maps)")
    ap.add_argument("--n-cells", type=int, default=30000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-jobs", type=int, default=-1)
    args = ap.parse_args(argv)
    if args.layers:
        probes = [p.split("+") for p in args.layers.split(",")]
    else:
        with h5py.File(args.path, "r") as f:
            sizes = {name: f["maps"][name].shape[-1] for name in f["maps"]}
        probes = [[name] for name in sizes]
        hyper = [m for m in ("stage3", "stage4") if m in sizes]
        hyper += [m for m, s in sizes.items() if s == 7 and m not in hyper]
        if len(hyper) > 1:
            probes.append(hyper)
    for layers in probes:
        print(json.dumps(segment_probe(args.path, layers, n_cells=args.n_cells, seed=args.seed,
                                       n_jobs=args.n_jobs)),
              flush=True)


if __name__ == "__main__":
    main()
