"""Records -> decoded, preprocessed image tensors, in DataLoader workers.

A bad image never stops the run here: the dataset returns its reason instead of a tensor,
and :func:`collate` separates the good from the failed, so the runner can skip-and-log or fail.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import DataError

__all__ = ["read_file", "ImageDataset", "Batch", "collate", "MAX_PIXELS", "MAX_ASPECT"]

MAX_PIXELS = 100_000_000  # larger images are skipped: a decompression bomb, or not a photo
MAX_ASPECT = 4  # the long side is center-cropped to 4x the short one before any resizing


def read_file(path, exif: bool = True, name: str | None = None) -> Image.Image:
    """Decode one image file to 8-bit RGB (``path``: a file's path, or an open binary file
    such as a tar member's bytes, then named ``name`` in messages).

    With ``exif``, the EXIF orientation is applied (a phone photo taken upright comes out
    upright). Grayscale, palette, CMYK and 16-bit images are converted; transparency is
    flattened onto white. An image longer than :data:`MAX_ASPECT` times its short side is
    center-cropped to that ratio (the part a center crop keeps anyway), so the work per image
    is bounded.

    Raises:
        DataError: the file is missing (or a broken link), empty, truncated, not an image, or
            over :data:`MAX_PIXELS` pixels; the message names the file.
    """
    file, path = path, (path if name is None else name)  # messages name `path`
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            img = Image.open(file)
        with img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise DataError(f"{path}: {w}x{h} is {w * h / 1e6:.0f} megapixels, over the "
                                f"limit of {MAX_PIXELS / 1e6:.0f} (a decompression bomb?); "
                                f"downscale it first")
            if exif:
                img = ImageOps.exif_transpose(img)
            img.load()
            return _bound_aspect(_to_rgb(img))
    except FileNotFoundError:
        if os.path.islink(path):
            raise DataError(f"{path}: broken symbolic link (to {os.readlink(path)}, which does "
                            f"not exist)") from None
        raise DataError(f"{path}: file not found") from None
    except Image.DecompressionBombError as exc:  # PIL's own limit, checked on opening
        raise DataError(f"{path}: over the limit of {MAX_PIXELS / 1e6:.0f} megapixels ({exc}; a "
                        f"decompression bomb?); downscale it first") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None


def _bound_aspect(img: Image.Image) -> Image.Image:
    w, h = img.size
    short = max(1, min(w, h))
    if max(w, h) <= MAX_ASPECT * short:
        return img
    if w > h:
        left = (w - MAX_ASPECT * short) // 2
        return img.crop((left, 0, left + MAX_ASPECT * short, h))
    top = (h - MAX_ASPECT * short) // 2
    return img.crop((0, top, w, top + MAX_ASPECT * short))


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
    """``records[i] -> (tensor or None, i, reason or None)``; never raises for a bad image.
    ``exif``: apply EXIF orientation (part of the backbone's :class:`Preprocess`); ``read``:
    ``(record id, exif) -> PIL.Image``, the source's reader (:meth:`Source.reader
    <featurecache.data.Source.reader>`; default :func:`read_file`: the ids are file paths)."""

    def __init__(self, records, transform, exif: bool = True, read=None):
        self.records = records
        self.transform = transform
        self.exif = exif
        self.read = read

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        read = self.read or read_file  # looked up per call (tests patch read_file)
        try:
            return self.transform(read(self.records[i].path, self.exif)), i, None
        except DataError as exc:  # the reason, without the path it is stored beside
            reason, path = str(exc), self.records[i].path
            return None, i, reason[len(path) + 2:] if reason.startswith(path + ": ") else reason


@dataclass
class Batch:
    """Decoded images with their row indices, and the inputs that failed with their reasons."""

    images: torch.Tensor | None
    index: list
    failed: list  # [(index, reason)]
    targets: dict = None  # a dense source's: {"mask": (B, S, S) uint8, "boxes": (B,) JSON}
    fatal: list = ()  # [(index, reason)] of bad targets (a wrong mask): the embed stops

    @property
    def n_inputs(self) -> int:
        return len(self.index) + len(self.failed)


def collate(items) -> Batch:
    """Items ``(tensor or None, i, reason or None[, targets])`` -> a :class:`Batch`; a dense
    item's fourth field is its targets (a dict), or ``"fatal"`` for a bad one."""
    good = [(it[0], it[1]) for it in items if it[0] is not None]
    failed = [(it[1], it[2]) for it in items if it[0] is None and it[3:4] != ("fatal",)]
    fatal = [(it[1], it[2]) for it in items if it[0] is None and it[3:4] == ("fatal",)]
    images = torch.stack([t for t, _ in good]) if good else None
    targets = None
    kept = [it[3] for it in items if it[0] is not None and len(it) > 3]
    if kept:
        targets = {k: np.stack([t[k] for t in kept]) if k == "mask" else
                   np.array([t[k] for t in kept], dtype=object) for k in kept[0]}
    return Batch(images, [i for _, i in good], failed, targets, fatal)
