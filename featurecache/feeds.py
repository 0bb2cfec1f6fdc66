"""Where fine-tuning reads the map of ``--from``: stored in a feature file, or computed from
images by the frozen bottom of the backbone (optionally on augmented images).

Both feeds number their rows 0..n-1, know each row's label, split and path, and yield
``(positions, maps)`` batches: ``maps`` is ``(b, C, S, S)`` float32, rounded through the
stored dtype as the cache holds it, so a model sees the same numbers from either feed.
Memory holds one batch: the cache is read one batch of chunks at a time.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .extract import raw_extractor, stored_map, to_layout

__all__ = ["CachedMaps", "ImageMaps", "augmenting"]


class CachedMaps:
    """The stored map ``spec`` of the rows of a feature file."""

    source = "cache"

    def __init__(self, ff, spec):
        self.ff, self.spec, self.classes = ff, spec, list(ff.classes)
        self.labels = ff.y()
        self.splits = np.array(ff.splits(), dtype=object)
        self.paths = ff.paths()
        self.dtype = str(ff.provenance.get("dtype") or "float32")

    def batches(self, rows, batch_size: int, train: bool = False):
        rows = np.asarray(rows, dtype=np.int64)
        for s in range(0, len(rows), batch_size):
            part = np.arange(s, min(s + batch_size, len(rows)))
            maps = self.ff.map_rows(self.spec.name, rows[part])
            yield part, torch.from_numpy(maps).float()


def augmenting(preprocess):
    """The training-time transform: a random resized crop (scale 0.5-1) and a horizontal flip,
    then the backbone's own normalisation."""
    from torchvision import transforms as T

    mode = T.InterpolationMode(preprocess.interpolation)
    return T.Compose([T.RandomResizedCrop(preprocess.crop, scale=(0.5, 1.0), interpolation=mode,
                                          antialias=True),
                      T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(list(preprocess.mean), list(preprocess.std))])


class ImageMaps:
    """The map of ``spec`` computed from the images of ``records`` by the frozen bottom of
    ``bb`` (in inference mode); ``augment``: training batches are augmented images."""

    source = "images"

    def __init__(self, records, classes, bb, spec, dev, *, augment: bool = False,
                 num_workers: int | None = None, dtype: str = "float32"):
        self.records, self.bb, self.spec, self.dev = records, bb, spec, dev
        self.classes = list(classes)
        self.labels = np.array([r.label for r in records], dtype=np.int64)
        self.splits = np.array([r.split for r in records], dtype=object)
        self.paths = [r.path for r in records]
        self.augment, self.dtype = augment, dtype
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        self.bottom, _ = raw_extractor(bb.model, [spec.node])
        self.failed: dict = {}  # position -> why the image could not be read

    def batches(self, rows, batch_size: int, train: bool = False):
        from .data import ImageDataset, collate

        rows = np.asarray(rows, dtype=np.int64)
        tf = augmenting(self.bb.preprocess) if train and self.augment else \
            self.bb.preprocess.transform()
        data = ImageDataset([self.records[i] for i in rows], tf, self.bb.preprocess.exif)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate,
                                             num_workers=self.num_workers)
        for batch in loader:
            for i, reason in batch.failed:
                self.failed[int(rows[i])] = reason
            if batch.images is None:
                continue
            with torch.inference_mode():
                raw = self.bottom(to_layout(batch.images.to(self.dev)))[self.spec.node]
                maps = stored_map(raw, self.spec.kind, self.spec.shape[1:])
                maps = maps.to(getattr(torch, self.dtype)).float().contiguous()
            yield np.asarray(batch.index), maps.clone()
