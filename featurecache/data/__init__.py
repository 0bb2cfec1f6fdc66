"""Data sources (folders, manifests, built-ins) -> records; records -> decoded image batches."""

from .decode import Batch, ImageDataset, collate, load_image
from .sources import BUILTINS, Record, Source, open_source, shard_range

__all__ = ["Record", "Source", "open_source", "shard_range", "BUILTINS",
           "load_image", "ImageDataset", "Batch", "collate"]
