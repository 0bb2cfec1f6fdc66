"""Where fine-tuning reads the map of ``--from``: stored in a feature file, or computed from
images by the frozen bottom of the backbone (optionally on augmented images).

Both feeds number their rows 0..n-1, know each row's label, split and path, and yield
``(positions, maps)`` batches: ``maps`` is ``(b, C, S, S)`` float32, rounded through the
stored dtype as the cache holds it, so a model sees the same numbers from either feed.
Memory holds one batch: the cache is read one batch of chunks at a time.

:func:`open_feed` picks the feed for a source and checks the ``--from`` layer
(:func:`check_from`); :func:`holdout` carves the validation fold out of the train split.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import FeaturecacheError, OptionError, option
from .extract import raw_extractor, stored_map, to_layout

__all__ = ["CachedMaps", "ImageMaps", "bottom_maps", "augmenting", "open_feed", "check_from", "holdout",
           "warn_small_fold"]

# what decides which rows are in the test split (recorded, so compare can name a difference)
SPLIT_KEYS = ("split_origin", "seed", "test_size", "max_per_class")


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


def bottom_maps(bottom, images, node: str, kind: str, size, dtype: str) -> torch.Tensor:
    """The map of ``node`` that the frozen ``bottom`` computes for a batch of images, as the
    cache stores it: NCHW, average-pooled to ``size``, rounded through ``dtype``."""
    with torch.inference_mode():
        raw = bottom(images)[node]
        return stored_map(raw, kind, tuple(size)).to(getattr(torch, dtype)).float().contiguous()


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
    ``bb`` (in inference mode); ``augment``: training batches are augmented images; ``data``:
    the :class:`~featurecache.data.Source` the records come from, which reads them (default:
    records whose ids are files)."""

    source = "images"

    def __init__(self, records, classes, bb, spec, dev, *, augment: bool = False,
                 num_workers: int | None = None, dtype: str = "float32", data=None):
        self.records, self.bb, self.spec, self.dev = records, bb, spec, dev
        self.data = data
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
        make = self.data.dataset if self.data is not None else ImageDataset
        data = make([self.records[i] for i in rows], tf, self.bb.preprocess.exif)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate,
                                             num_workers=self.num_workers)
        for batch in loader:
            for i, reason in batch.failed:
                self.failed[int(rows[i])] = reason
            if batch.images is None:
                continue
            maps = bottom_maps(self.bottom, to_layout(batch.images.to(self.dev)),
                               self.spec.node, self.spec.kind, self.spec.shape[1:], self.dtype)
            yield np.asarray(batch.index), maps.clone()  # out of inference mode: trainable


def open_feed(source, from_layer, augment, dev, *, backbone, weights, weights_file, test_size,
          seed, max_per_class, num_workers):
    """``(feed, backbone, provenance)``: the maps of ``from_layer`` from a feature file or
    from images, the backbone they come from, and the provenance of the model trained on
    them (``classes`` included). Everything is checked before any map is read.

    Raises:
        FeaturecacheError: see :func:`check_from`; a map not kept; options for images given
            with a feature file; ``augment`` with a feature file.
    """
    from .backbones import Backbone, backbone_for, load_backbone
    from .layers import list_layers
    from .store import FeatureFile, open_features
    from .store.reader import is_hdf5

    cached = isinstance(source, FeatureFile) or is_hdf5(source) or \
        (str(source).endswith(".h5") and not Path(source).is_dir())
    if cached:
        if augment:
            raise OptionError(f"{option('augment')} needs images: the cached maps are fixed. "
                              f"Fine-tune from the image folder to augment, or leave it out.")
        _no_image_options(source, backbone=backbone, weights=weights,
                          weights_file=weights_file, test_size=test_size,
                          max_per_class=max_per_class)
        ff = source if isinstance(source, FeatureFile) else open_features(source)
        ff.check_complete()
        bb = backbone_for(ff.provenance)
        listing = list_layers(bb)
        wanted, final = check_from(bb, from_layer, listing)  # the name first, then the file
        spec = ff.maps.get(from_layer) or next(
            (s for s in ff.maps.values() if s.node == wanted.node), None)
        if spec is None:
            ff.check_map(from_layer)  # raises: says to re-embed with --keep-map
        full = wanted.shape
        if tuple(spec.shape) != tuple(full):
            raise OptionError(
                f"the map of {from_layer!r} in {ff.path} is stored at {spec.shape[1]}x"
                f"{spec.shape[2]} (embed --map-size), but the blocks above it take its full "
                f"{full[1]}x{full[2]}: fine-tuning on a pooled map trains them on inputs they "
                f"never see. Re-embed with {option('keep_map', [from_layer])} and no map_size.")
        pools = {s.node: s.pool for s in ff.layers.values()}
        feed, classes, data = CachedMaps(ff, spec), ff.classes, str(ff.path)
        split = {k: ff.provenance.get(k) for k in SPLIT_KEYS if k in ff.provenance}
    else:
        from .data import open_source

        src = open_source(source, test_size=test_size, seed=seed, max_per_class=max_per_class)
        bb = backbone if isinstance(backbone, Backbone) else \
            load_backbone(backbone, weights, weights_file)
        spec, final = check_from(bb, from_layer, list_layers(bb))
        pools, classes, data = {}, src.classes, src.root
        split = {"split_origin": src.split_origin, "seed": seed, "test_size": test_size,
                 "max_per_class": -1 if max_per_class is None else max_per_class}
        feed = ImageMaps(src.records, src.classes, bb, spec, dev, augment=augment,
                         num_workers=num_workers, data=src)
    pool = pools.get(final.node, "avg")
    prov = {**bb.provenance(), "from_layer": from_layer, "from_node": spec.node,
            "from_kind": spec.kind, "map_shape": list(spec.shape), "map_dtype": feed.dtype,
            "final_layer": final.name, "final_node": final.node, "final_kind": final.kind, "final_pool": pool,
            "final_dim": final.width(pool), "source": feed.source, "data": data,
            "augment": augment, "split": split, "classes": list(classes)}
    return feed, bb, prov


def check_from(bb, from_layer: str, listing=None) -> tuple:
    """``(LayerSpec of the full map of from_layer, LayerInfo of the final pooled layer)``,
    after checking that ``from_layer`` is a feature map of ``bb`` below its final pooled layer.

    Raises:
        UnknownLayerError: not a layer of ``bb`` (close matches named).
        OptionError: not a feature map, or not below the final pooled layer.
    """
    from .layers import list_layers, resolve_maps

    listing = listing or list_layers(bb)
    spec = resolve_maps(bb, [from_layer], listing=listing)[0]  # a feature map; close matches
    if listing.get(from_layer) is None:  # a finer graph node: depths from the full listing
        listing = list_layers(bb, all_nodes=True)
    info, final = listing.get(from_layer), listing.get("avgpool")
    if spec.kind == "map-nhwc":
        raise OptionError(f"{option('from_layer', from_layer)}: {from_layer!r} is a channels-last "
                          f"(NHWC) map, as in Swin; fine-tuning from such maps is not supported "
                          f"yet. Use a convolutional backbone, or frozen heads.")
    if final is None or info.depth >= final.depth:
        raise OptionError(
            f"{option('from_layer', from_layer)}: {from_layer!r} is not below the final pooled "
            f"layer ({final.name if final else 'none'}) of {bb.name}, so no block above it "
            f"can be fine-tuned; choose a lower layer, e.g. stage4.")
    return spec, final


def _no_image_options(source, **given) -> None:
    """Refuse options that only apply to images when the source is a feature file."""
    from .options import DATA, EMBED

    defaults = {o.name: o.default for o in (*EMBED, *DATA) if o.name in given}
    set_ = [k for k, v in given.items() if v != defaults[k] and not hasattr(v, "model")]
    if set_:
        raise OptionError(f"{', '.join(option(k, given[k]) for k in set_)}: only for images; "
                          f"{source} is a feature file, which brings its own backbone, weights "
                          f"and split. Leave them out, or fine-tune from the image folder.")


def holdout(labels, splits, fraction: float, seed: int) -> tuple:
    """``(train rows, validation rows)``: the ``val`` split when there is one, else a seeded
    share ``fraction`` of each class's train rows (at least one, never all).

    Raises:
        FeaturecacheError: no training rows, or too few to hold any out.
    """
    labels, splits = np.asarray(labels), np.asarray(splits, dtype=object)
    train = np.flatnonzero(splits == "train")
    if "val" in set(splits.tolist()):
        return train, np.flatnonzero(splits == "val")
    rng = np.random.default_rng([seed, 7])
    held = []
    for c in np.unique(labels[train]):
        rows = train[labels[train] == c]
        if len(rows) >= 3:  # two stay to train (and to cross-validate the probe)
            k = min(len(rows) - 2, max(1, round(fraction * len(rows))))
            held.append(rng.choice(rows, k, replace=False))
    if not held:
        raise FeaturecacheError(f"the train split ({len(train)} rows) is too small to hold out "
                                f"a validation fold; fine-tuning needs at least 3 images of a "
                                f"class.")
    val = np.sort(np.concatenate(held))
    return np.setdiff1d(train, val), val


def warn_small_fold(feed, train, val) -> None:
    """A validation fold too small to pick an epoch is announced (the run goes on)."""
    import warnings

    from .errors import DataWarning

    seen, held = set(feed.labels[train].tolist()), set(feed.labels[val].tolist())
    if len(val) < 10 or len(held) < len(seen):
        warnings.warn(DataWarning(
            f"the validation fold holds {len(val)} image(s) of {len(held)} of the {len(seen)} "
            f"trained classes: the epoch it picks is close to chance. Add training images (a "
            f"class needs 3 to lend one), give a val split, or raise "
            f"{option('val_fraction', 0.3)}."))
