"""``builtin:NAME``: a data set that ships with a library, no files (``builtin:digits``:
scikit-learn's bundled 8x8 handwritten digits, 1,797 images)."""

from __future__ import annotations

from functools import lru_cache

from ..errors import DataError
from .base import Listing, Source

__all__ = ["BuiltinSource", "BUILTINS"]

PREFIX = "builtin:"
BUILTINS = ("digits",)


class BuiltinSource(Source):
    """``builtin:digits``; a record's id is ``builtin:digits/NNNN`` (its index)."""

    prefix = PREFIX
    spec_help = PREFIX + BUILTINS[0]
    example = PREFIX + BUILTINS[0]

    @classmethod
    def list_items(cls, spec: str) -> Listing:
        name = spec[len(PREFIX):]
        if name not in BUILTINS:
            raise DataError(f"unknown built-in data set {name!r}; available: "
                            f"{', '.join(PREFIX + b for b in BUILTINS)}.")
        from sklearn.datasets import load_digits

        target = load_digits().target
        items = [(f"{spec}/{i:04d}", str(int(t)), None, "") for i, t in enumerate(target)]
        return Listing(spec, "builtin", items)

    @classmethod
    def read_id(cls, record_id: str, exif: bool = True):
        """Digit NNNN of ``builtin:digits/NNNN``, its 0..16 values scaled to 0..255, as RGB."""
        import numpy as np
        from PIL import Image

        name, _, index = record_id[len(PREFIX):].partition("/")
        try:
            pixels = _images(name)[int(index)]
        except (KeyError, ValueError, IndexError):
            raise DataError(f"{record_id}: no such image in {PREFIX}{name}") from None
        pixels = np.round(pixels * 255 / 16).astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB")


@lru_cache(maxsize=2)
def _images(name: str):
    if name not in BUILTINS:
        raise KeyError(name)
    from sklearn.datasets import load_digits

    return load_digits().images  # (1797, 8, 8), values 0..16
