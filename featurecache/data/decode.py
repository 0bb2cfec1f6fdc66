"""Records -> decoded, preprocessed image tensors, in DataLoader workers.

A bad image never stops the run here: the dataset returns its reason instead of a tensor,
and :func:`collate` separates the good from the failed, so the runner can skip-and-log or fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from ..errors import DataError

__all__ = ["load_image", "ImageDataset", "Batch", "collate"]


@lru_cache(maxsize=2)
def _builtin_images(name: str) -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images  # (1797, 8, 8), values 0..16


def load_image(path: str) -> Image.Image:
    """Decode one image to 8-bit RGB.

    Grayscale, palette, CMYK and 16-bit images are converted; transparency is flattened
    onto white. ``builtin:digits/NNNN`` reads scikit-learn's bundled digit NNNN.

    Raises:
        DataError: the file is missing, empty, truncated or not an image.
    """
    if path.startswith("builtin:"):
        name, _, index = path[len("builtin:"):].partition("/")
        pixels = np.round(_builtin_images(name)[int(index)] * 255 / 16).astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB")
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255)
        return Image.fromarray(np.round(arr).astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


class ImageDataset(torch.utils.data.Dataset):
    """``records[i] -> (tensor or None, i, reason or None)``; never raises for a bad image."""

    def __init__(self, records, transform):
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        try:
            return self.transform(load_image(self.records[i].path)), i, None
        except DataError as exc:
            return None, i, str(exc)


@dataclass
class Batch:
    """Decoded images with their row indices, and the inputs that failed with their reasons."""

    images: torch.Tensor | None
    index: list
    failed: list  # [(index, reason)]

    @property
    def n_inputs(self) -> int:
        return len(self.index) + len(self.failed)


def collate(items) -> Batch:
    good = [(t, i) for t, i, _ in items if t is not None]
    failed = [(i, reason) for t, i, reason in items if t is None]
    images = torch.stack([t for t, _ in good]) if good else None
    return Batch(images, [i for _, i in good], failed)
