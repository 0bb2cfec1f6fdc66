"""The segmentation probe: which depth of the stored maps (or which hypercolumn) segments
best, with a linear probe (and k-NN) per map cell.

For each probe (a stored map, or several upsampled to one grid and concatenated) and head:

1. every cell of a training image is a sample labelled with the majority class of the mask
   pixels under it; about ``n_cells`` of them are drawn (the same number per image, seeded),
   reading the maps in bounded batches of images;
2. the head's parameters are chosen by CV **grouped by image** on cell mIoU, then it is
   refitted on every sampled cell;
3. on the test split, every cell is scored, the scores are upsampled bilinearly to the mask
   size and the argmax is the predicted class; mIoU (mean over the classes present,
   background included: the mmseg definition), pixel accuracy and per-class IoU are read
   from the summed confusion, with 95% intervals from a bootstrap over test images.

The winner is the row with the best CV score (the test split is read only to report).
This is a linear probe on frozen, unaugmented features, not the DINOv2 training protocol.

Example::

    >>> res = segment("scenes.h5", "reports/seg/")            # doctest: +SKIP
    >>> res.winner["layer"], round(res.winner["miou"], 3)    # doctest: +SKIP
    ('stage3+stage4+stage5', 0.29)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import HeadError
from ..options import validated
from . import cells
from . import heads as cell_heads

__all__ = ["segment", "DenseReport", "CAVEAT"]

CAVEAT = ("A linear probe (and k-NN) on frozen, unaugmented features, one map cell per "
          "sample: a depth comparison, not the DINOv2 segmentation training protocol (no "
          "augmentation, no fine-tuning, no multi-scale test).")
N_PICTURES = 4


@dataclass
class DenseReport:
    """What ``segment`` / ``detect`` return: the rows, the winner (chosen by CV), the folder."""

    rows: list
    winner: dict
    out_dir: Path
    task: str
    info: dict = field(default_factory=dict)

    def table(self) -> str:
        metric = "miou" if self.task == "segment" else "map50"
        lines = [f"{'layer':<28} {'head':<7} {'grid':>5} {'cv':>7} {metric:>7}"]
        for r in self.rows:
            star = " *" if r is self.winner else ""
            lines.append(f"{r['layer']:<28} {r['head']:<7} {r['grid']:>5} {r['cv_score']:7.3f} "
                         f"{r[metric]:7.3f}{star}")
        return "\n".join(lines)


def split_rows(ff):
    """``(fit rows, test rows)``: every row not in the test split fits (CV inside it)."""
    splits = np.asarray(ff.splits())
    test = np.flatnonzero(splits == "test")
    train = np.flatnonzero(splits != "test")
    if not len(test) or not len(train):
        raise HeadError(f"{ff.path} has {len(train)} training and {len(test)} test rows; a "
                        f"dense probe needs both (a test/ split folder, or embed with "
                        f"--test-size).")
    return train, test


def open_dense(features, target: str):
    """The feature file, complete, holding ``target`` (mask or boxes) and maps."""
    from ..store import FeatureFile, open_features

    ff = features if isinstance(features, FeatureFile) else open_features(features)
    ff.check_complete()
    if target not in ff.targets:
        what = "masks (<split>/masks/)" if target == "mask" else "boxes (<split>/annotations.json)"
        raise HeadError(f"{ff.path} holds no {target} targets; embed a dense folder with "
                        f"{what} and classes.txt, with --keep-map (e.g. --keep-map "
                        f"stage2,stage3,stage4,stage5).")
    if not ff.maps:
        raise HeadError(f"{ff.path} stores no feature maps; embed again with --keep-map "
                        f"stage2,stage3,stage4,stage5 (a dense probe reads the maps).")
    return ff


def dense_provenance(ff, probe) -> dict:
    """What a saved dense head needs to rebuild its maps from images."""
    keys = ("backbone", "weights", "weights_sha256", "preprocess", "extraction_method",
            "dtype", "fingerprint")
    return {**{k: ff.provenance.get(k) for k in keys}, "layer": probe.name,
            "specs": [ff.maps[n].to_attrs() for n in probe.layers]}


def cell_scores(ff, probe, model, rows, kind: str = "scores"):
    """Yield ``(rows of the batch, (b, K, grid, grid) float32 scores)`` over ``rows``."""
    import torch

    step = cells.images_per_batch(probe)
    for s in range(0, len(rows), step):
        batch = rows[s:s + step]
        X = cells.grid_features(ff, probe, batch)
        flat = X.reshape(-1, probe.dim)
        sc = model.scores(flat) if kind == "scores" else model.probabilities(flat)
        sc = sc.reshape(len(batch), probe.grid, probe.grid, -1)
        yield batch, torch.from_numpy(np.ascontiguousarray(sc.transpose(0, 3, 1, 2)))


def upsampled_argmax(scores, size) -> np.ndarray:
    """Bilinear (``align_corners=False``) upsampling of ``(b, K, g, g)`` scores to ``size``,
    then the argmax: ``(b, H, W)`` class ids."""
    import torch.nn.functional as F

    up = F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)
    return up.argmax(1).numpy().astype(np.uint8)


def evaluate_masks(ff, probe, model, test, n_classes, ignore, keep=()):
    """Per-image confusions ``(n_test, K, K)`` of the model on ``test``, and the predicted
    masks of the rows in ``keep`` (for the picture)."""
    per_image, kept = [], {}
    for batch, sc in cell_scores(ff, probe, model, test):
        truth = ff.target_rows("mask", batch)
        pred = upsampled_argmax(sc, truth.shape[1:])
        for j, r in enumerate(batch):
            per_image.append(cells.confusion(truth[j], pred[j], n_classes, ignore))
            if int(r) in keep:
                kept[int(r)] = pred[j]
    return np.stack(per_image), kept


def metrics(per_image: np.ndarray, classes: list, n_boot: int, seed: int) -> dict:
    """mIoU, pixel accuracy and per-class IoU of the summed confusion, each with a 95%
    bootstrap interval over the test images."""
    cm = per_image.sum(0)
    boots = cells.bootstrap_confusions(per_image, n_boot, seed)
    iou = cells.iou_per_class(cm)
    iou_b = np.stack([cells.iou_per_class(b) for b in boots])
    m_b = np.array([cells.miou(b) for b in boots])
    pa_b = np.array([cells.pixel_accuracy(b) for b in boots])

    def ci(v):
        v = v[np.isfinite(v)]
        return [float(x) for x in np.percentile(v, [2.5, 97.5])] if len(v) else [None, None]

    out = {"miou": cells.miou(cm), "pixel_accuracy": cells.pixel_accuracy(cm)}
    out["miou_lo"], out["miou_hi"] = ci(m_b)
    out["pixel_accuracy_lo"], out["pixel_accuracy_hi"] = ci(pa_b)
    out["per_class_iou"] = {c: (None if not np.isfinite(iou[i]) else float(iou[i]))
                            for i, c in enumerate(classes)}
    out["per_class_iou_ci"] = {c: ci(iou_b[:, i]) for i, c in enumerate(classes)
                               if np.isfinite(iou[i])}
    return out


def choose(rows: list) -> dict:
    """The row with the best CV score (the first of equals: the rows are in depth order)."""
    return max(rows, key=lambda r: r["cv_score"])


class _Progress:
    def __init__(self, on: bool, total: int, what: str):
        self.bar = None
        if on:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=what, unit="fit", dynamic_ncols=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@validated("segment")
def segment(features, out_dir, *, layers: list = [], hypercolumn: list = ["auto"],  # noqa: B006
            heads: list = ["logreg", "knn"], n_cells: int = 30000, cv: int = 3,  # noqa: B006
            n_jobs: int = -1, n_boot: int = 1000, seed: int = 0, overwrite: bool = False,
            progress: bool = True) -> DenseReport:
    """Compare the stored maps (and hypercolumns) x cell heads for segmentation; write the
    report folder (``results.json``, ``report.md``, ``layer_depth.png``,
    ``predictions.png``, ``heads/``, ``best.joblib``).

    Raises:
        HeadError: the file has no masks or maps, or too few images for the CV.
        UnknownLayerError: a layer whose map is not stored.
        FeaturecacheError: the output folder exists and is not empty (without ``overwrite``).
    """
    from ..files import output_folder

    t0 = time.perf_counter()
    out = output_folder(out_dir, overwrite, "segmentation report")
    ff = open_dense(features, "mask")
    probes = cells.probes_for(ff, layers, _hyper(hypercolumn))
    kinds = [cell_heads.get(h) for h in dict.fromkeys(heads)]
    train, test = split_rows(ff)
    classes, ignore = list(ff.classes), int(ff.provenance["dense"]["ignore_index"])
    K = len(classes)
    show = [int(r) for r in test[:N_PICTURES]]
    bar = _Progress(progress, len(probes) * len(kinds), "segment")
    rows, models, kept = [], {}, {}
    try:
        for probe in probes:
            bar.note(f"{probe.name}: sampling cells")
            X, y, groups = cells.sample_cells(
                ff, probe, train, lambda rs, g=probe.grid: cells.cell_labels(
                    ff.target_rows("mask", rs), g, K, ignore), n_cells, seed)
            for kind in kinds:
                bar.note(f"{probe.name} {kind.name}: CV")
                t1 = time.perf_counter()
                params, cv_score, results = kind.search(X, y, groups, K, folds=cv,
                                                        n_jobs=n_jobs)
                model = kind.fit(X, y, params, K)
                bar.note(f"{probe.name} {kind.name}: test")
                per_image, pred = evaluate_masks(ff, probe, model, test, K, ignore, set(show))
                row = {"layer": probe.name, "head": kind.name, "backbone": ff.provenance["backbone"],
                       "grid": probe.grid, "dim": probe.dim, "depth": probe.depth,
                       "n_cells": int(len(y)), "cv_score": cv_score, "params": params,
                       **metrics(per_image, classes, n_boot, seed),
                       "n_test": int(len(test)), "seconds": round(time.perf_counter() - t1, 2),
                       "cv_results": results}
                rows.append(row)
                models[id(row)] = (probe, model)
                kept[id(row)] = pred
                bar.step()
    finally:
        bar.close()
    winner = choose(rows)
    probe, model = models[id(winner)]
    info = {"features": str(ff.path), "n_train_images": int(len(train)),
            "n_test_images": int(len(test)), "classes": classes, "ignore_index": ignore,
            "cv": cv, "n_cells": n_cells, "seed": seed, "seconds": 0.0}
    from .model import DenseHead

    def head_of(r):
        p, m = models[id(r)]
        return DenseHead("segment", r["head"], p.layers, p.grid, classes, dense_provenance(ff, p),
                         m, r["params"], r["cv_score"], {"ignore_index": ignore})

    info["seconds"] = round(time.perf_counter() - t0, 2)
    from . import report

    report.publish(out, "segment", rows, winner, info, head_of,
                   pictures=lambda path: report.mask_picture(
                       path, ff, show, kept[id(winner)], classes, ignore, winner))
    return DenseReport(rows, winner, out, "segment", info)


def _hyper(hypercolumn):
    values = [h for h in (hypercolumn or []) if h]
    if not values or values == ["auto"]:
        return "auto"
    if values == ["none"]:
        return "none"
    if "auto" in values or "none" in values:
        from ..errors import OptionError

        raise OptionError(f"--hypercolumn {','.join(values)}: 'auto' and 'none' stand alone; "
                          f"otherwise name layers joined with '+' (stage3+stage4+stage5).")
    return values
