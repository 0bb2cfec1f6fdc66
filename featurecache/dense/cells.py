"""Map cells as samples: the probes (one layer or a hypercolumn), their features on one grid,
the cells' labels from the masks (or boxes), the seeded cell sample, and the scores.

A probe reads stored maps ``(N, C, S, S)`` of one or several layers; a hypercolumn upsamples
each bilinearly to the finest grid among them and concatenates the channels. Everything is
read in bounded batches of images (:data:`BATCH_IMAGES`), never a whole map at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import HeadError, UnknownLayerError

__all__ = ["Probe", "probes_for", "grid_features", "on_grid", "cell_labels", "sample_cells",
           "confusion", "miou", "pixel_accuracy", "bootstrap_confusions",
           "images_per_batch", "BATCH_IMAGES", "BATCH_BYTES"]

BATCH_IMAGES = 32  # images whose maps are in memory at once (at most)
BATCH_BYTES = 1 << 27  # ... and at most this many bytes of float32 grid features


@dataclass(frozen=True)
class Probe:
    """What one row of a dense report reads: ``layers`` (one name, or several: a
    hypercolumn) on a ``grid`` x ``grid`` of cells."""

    layers: tuple
    grid: int
    dim: int
    depth: float  # the deepest layer's depth (+0.5 for a hypercolumn), the plot's x

    @property
    def name(self) -> str:
        return "+".join(self.layers)

    @property
    def hypercolumn(self) -> bool:
        return len(self.layers) > 1


def probes_for(ff, layers=None, hypercolumn="auto") -> list:
    """The probes of a report: each of ``layers`` (default: every stored map) alone, then the
    hypercolumns: ``auto`` (default) the deepest two and the deepest three of them together
    (the combinations a practitioner tries: deep meaning, a finer grid added; more maps at a
    56x56 grid cost far more than they add); a string ``a+b+c`` (or a list of them) those;
    ``none``: no hypercolumn.

    Raises:
        UnknownLayerError: a layer whose map is not stored (naming the stored ones).
    """
    names = list(layers) if layers else list(ff.maps)
    if not names:
        raise UnknownLayerError(f"{ff.path} stores no feature maps; embed with --keep-map "
                                f"stage2,stage3,stage4,stage5 (a dense probe reads the maps).")
    for n in names:
        ff.check_map(n)
    ordered = sorted(dict.fromkeys(names), key=lambda n: (ff.maps[n].depth, n))
    combos = []
    if hypercolumn in (None, "auto"):
        combos = [tuple(ordered[-k:]) for k in range(2, min(3, len(ordered)) + 1)]
    elif hypercolumn not in ("none", "", ()):
        given = [hypercolumn] if isinstance(hypercolumn, str) else list(hypercolumn)
        for h in given:
            parts = tuple(p for p in str(h).split("+") if p)
            if len(parts) < 2:
                raise UnknownLayerError(f"hypercolumn {h!r} names one layer; join two or more "
                                        f"stored maps with '+' (e.g. stage3+stage4+stage5).")
            for p in parts:
                ff.check_map(p)
            combos.append(tuple(sorted(dict.fromkeys(parts), key=lambda n: ff.maps[n].depth)))
    out = [_probe(ff, (n,)) for n in ordered]
    out += [_probe(ff, c) for c in dict.fromkeys(combos)]
    return out


def _probe(ff, layers: tuple) -> Probe:
    specs = [ff.maps[n] for n in layers]
    return Probe(layers, max(s.shape[1] for s in specs), sum(s.shape[0] for s in specs),
                 max(s.depth for s in specs) + (0.5 if len(layers) > 1 else 0))


def images_per_batch(probe: Probe) -> int:
    """Images read at once for ``probe``: :data:`BATCH_IMAGES`, fewer for a large grid x
    dim (a 56x56 hypercolumn of 1,456 channels is 18 MB per image)."""
    per_image = probe.grid * probe.grid * probe.dim * 4
    return max(1, min(BATCH_IMAGES, BATCH_BYTES // max(1, per_image)))


def grid_features(ff, probe: Probe, rows) -> np.ndarray:
    """``(len(rows), grid, grid, dim)`` float32: the probe's maps of these rows, each
    upsampled bilinearly (``align_corners=False``) to the grid, channels concatenated."""
    return on_grid(probe, {n: ff.map_rows(n, rows) for n in probe.layers})


def on_grid(probe: Probe, maps: dict) -> np.ndarray:
    """:func:`grid_features` of maps given as ``{layer: (b, C, S, S) array}`` (as stored, or
    just computed from images)."""
    import torch
    import torch.nn.functional as F

    parts = []
    for name in probe.layers:
        m = torch.from_numpy(np.ascontiguousarray(maps[name], dtype=np.float32))
        if m.shape[-1] != probe.grid:
            m = F.interpolate(m, size=(probe.grid, probe.grid), mode="bilinear",
                              align_corners=False)
        parts.append(m)
    return torch.cat(parts, 1).permute(0, 2, 3, 1).contiguous().numpy()


def cell_labels(masks: np.ndarray, grid: int, n_classes: int, ignore: int = 255,
                soft: bool = False) -> np.ndarray:
    """The label of every cell of a ``grid`` x ``grid`` over each mask ``(n, H, W)``: the
    majority class of the pixels under it (ignored pixels left out; ties: the lower id), -1
    for a cell of ignored pixels only. ``soft``: the class shares ``(n, grid, grid, K)``."""
    n, h, w = masks.shape
    ri = (np.arange(h) * grid) // h
    ci = (np.arange(w) * grid) // w
    cell = (ri[:, None] * grid + ci[None, :]).ravel()
    m = masks.reshape(n, -1).astype(np.int64)
    keep = m != ignore
    idx = (np.arange(n)[:, None] * grid * grid + cell[None, :]) * n_classes + np.where(keep, m, 0)
    counts = np.bincount(idx[keep], minlength=n * grid * grid * n_classes).reshape(
        n, grid, grid, n_classes)
    if soft:
        total = counts.sum(-1, keepdims=True)
        return counts / np.maximum(total, 1)
    lab = counts.argmax(-1)
    lab[counts.sum(-1) == 0] = -1
    return lab


def sample_cells(ff, probe: Probe, rows, labels_of, n_cells: int, seed: int = 0,
                 progress=None):
    """A seeded sample of about ``n_cells`` labelled cells of ``rows`` (the same number from
    each image, drawn uniformly among its labelled cells), read in batches of images:
    ``(X (m, dim) float32, y (m,), groups (m,) = the row of each cell's image)``.

    ``labels_of(rows) -> (len(rows), grid, grid)`` gives the cells' labels (-1: none).
    """
    rows = np.asarray(rows)
    per_image = max(1, int(np.ceil(n_cells / max(1, len(rows)))))
    Xs, ys, gs = [], [], []
    step = images_per_batch(probe)
    for s in range(0, len(rows), step):
        batch = rows[s:s + step]
        lab = labels_of(batch).reshape(len(batch), -1)
        feats = grid_features(ff, probe, batch).reshape(len(batch), -1, probe.dim)
        for j, r in enumerate(batch):
            valid = np.flatnonzero(lab[j] >= 0)
            if not len(valid):
                continue
            rng = np.random.default_rng([seed, int(r)])  # the image's draw, whatever the batch
            take = rng.choice(valid, size=min(per_image, len(valid)), replace=False)
            take.sort()
            Xs.append(feats[j, take])
            ys.append(lab[j, take])
            gs.append(np.full(len(take), int(r)))
        if progress:
            progress(min(s + step, len(rows)), len(rows))
    if not Xs:
        raise HeadError("no training image has a labelled cell (every mask is 'ignore').")
    return np.concatenate(Xs), np.concatenate(ys), np.concatenate(gs)


def confusion(y_true, y_pred, n_classes: int, ignore: int = 255) -> np.ndarray:
    """``(K, K)`` int64 counts (rows: truth), pixels of ``ignore`` left out."""
    t = np.asarray(y_true).ravel().astype(np.int64)
    p = np.asarray(y_pred).ravel().astype(np.int64)
    keep = (t != ignore) & (t >= 0)
    return np.bincount(t[keep] * n_classes + p[keep], minlength=n_classes * n_classes).reshape(
        n_classes, n_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU of every class (NaN for a class neither in the truth nor the prediction)."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def miou(cm: np.ndarray) -> float:
    """Mean IoU over the classes present in the truth or the prediction (background
    included): the mmseg definition."""
    iou = iou_per_class(cm)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(cm: np.ndarray) -> float:
    return float(np.trace(cm) / max(1, cm.sum()))


def bootstrap_confusions(per_image: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """``(n_boot, K, K)``: the summed confusion of test images resampled with replacement
    (``per_image``: ``(n_images, K, K)``); one draw serves every metric."""
    rng = np.random.default_rng(seed)
    n = len(per_image)
    flat = per_image.reshape(n, -1).astype(np.float64)
    out = np.empty((n_boot, flat.shape[1]))
    for b in range(n_boot):
        out[b] = np.bincount(rng.integers(0, n, n), minlength=n) @ flat
    return out.reshape(n_boot, *per_image.shape[1:])
