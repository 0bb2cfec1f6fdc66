"""Data sources (folders, manifests, built-ins) -> records; records -> decoded image batches.

The source classes and their registry (:mod:`.sources`) import no torch or PIL; the decoding
names (:mod:`.decode`) are imported on first use (PEP 562).
"""

from .base import Listing, Record, Source, shard_range
from .sources import (BUILTINS, SOURCES, load_image, open_source, read_record, resolve_spec,
                      same_ids, source_class, spec_help)

_LAZY = {"read_file": "decode", "ImageDataset": "decode", "Batch": "decode", "collate": "decode"}

__all__ = ["Record", "Source", "Listing", "SOURCES", "open_source", "source_class", "resolve_spec",
           "read_record", "load_image", "same_ids", "spec_help", "shard_range", "BUILTINS", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
