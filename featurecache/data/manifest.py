"""A CSV manifest: a header ``path,label[,split]`` and one row per image; relative paths are
relative to the CSV file's folder. Every file is checked up front.

A path may be a URL (``s3://bucket/cat/1.jpg``, read through :mod:`.remote`): its stamp is
the store's (size and ETag), and a missing object is a skipped input naming its URL (said
in a warning when listed). The manifest itself may be at a URL
(:class:`~.urls.UrlManifestSource`), its relative paths then relative to its folder URL."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..errors import DataError
from .base import Listing, Source
from .folders import IMAGE_EXTENSIONS, SPLIT_NAMES, stamp

__all__ = ["ManifestSource"]

MISSING_SHOWN = 5  # missing files named in the error


class ManifestSource(Source):
    """``manifest.csv``; a record's id is the image's absolute path (or its URL)."""

    spec_help = "a CSV manifest (path,label[,split])"
    example = "manifest.csv"
    remote = True  # its rows may be URLs: storage options reach them
    takes = Path.is_file

    @classmethod
    def read_id(cls, record_id: str, exif: bool = True):
        from .urls import read_image

        return read_image(record_id, exif)

    def reader(self):
        from .urls import ImageReader

        return ImageReader(self.storage_options) if self.storage_options else type(self).read_id

    @classmethod
    def list_items(cls, spec: str, storage_options: dict | None = None) -> Listing:
        path = Path(spec)
        not_an_image(spec)
        with open(path, "rb") as f:
            data = f.read()
        return Listing(str(path.resolve()), "manifest",
                       manifest_items(str(path), data, os.path.abspath(path.parent),
                                      storage_options))


def not_an_image(spec: str) -> None:
    if os.path.splitext(spec.rstrip("/"))[1].lower() in IMAGE_EXTENSIONS:
        raise DataError(f"{spec} is an image; the data are a folder of class folders, a CSV "
                        f"manifest (path,label[,split]) or builtin:digits (to classify one "
                        f"image with a head, use `featurecache predict`).")


def manifest_items(path: str, data: bytes, base: str, storage_options=None):
    """The items of manifest ``path`` (its bytes ``data``): a relative path is taken relative
    to ``base`` (a folder, or a folder URL for a manifest at a URL); URL rows stay URLs."""
    from . import remote

    try:
        text = data.decode("utf-8-sig")  # -sig: Excel's byte-order mark
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except UnicodeDecodeError as exc:
        raise DataError(f"manifest {path} is not UTF-8 text (byte {exc.object[exc.start]:#x} at "
                        f"offset {exc.start}); save it as UTF-8 (in Excel: CSV UTF-8).") from None
    except csv.Error as exc:
        raise DataError(f"manifest {path} is not a readable CSV file ({exc}).") from None
    if len(rows) < 2:
        raise DataError(f"manifest {path} has no rows; it needs a header path,label[,split] and "
                        f"one row per image.")
    header = [h.strip().lower() for h in rows[0]]
    if not {"path", "label"} <= set(header):
        raise DataError(f"manifest {path} has columns {rows[0]}; it needs a header with "
                        f"path,label and optionally split.")
    col = {name: header.index(name) for name in ("path", "label", "split") if name in header}
    items, first_line = [], {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(v.strip() for v in row):
            continue  # a blank line
        get = (lambda name: row[col[name]].strip() if name in col and col[name] < len(row) else "")
        if not get("path"):
            raise DataError(f"manifest {path} line {line}: the path is empty.")
        label = get("label")
        if not label:
            raise DataError(f"manifest {path} line {line}: the label of {get('path')} is empty; "
                            f"give every row a label (or remove the row).")
        split = get("split").lower() or None
        if split is not None and split not in SPLIT_NAMES:
            raise DataError(f"manifest {path} line {line}: split {get('split')!r} is not one of "
                            f"train, test, val.")
        p = get("path")
        if remote.is_url(p):
            pass
        elif remote.is_url(base) and not os.path.isabs(p):  # beside a manifest at a URL
            p = remote.join(base, p)
        else:
            p = Path(p).expanduser()
            p = os.path.abspath(p if p.is_absolute() else Path(base) / p)
        if p in first_line:
            raise DataError(f"manifest {path} line {line}: {p} is listed again (first on line "
                            f"{first_line[p]}); each image may appear once, or it could land in "
                            f"both train and test. Remove the duplicate rows.")
        first_line[p] = line
        items.append((p, label, SPLIT_NAMES.get(split)))
    urls = {p for p, _, _ in items if remote.is_url(p)}
    local = _stamps([p for p, _, _ in items if p not in urls])
    stamped = dict(zip((p for p, _, _ in items if p in urls),
                       remote.stats([p for p, _, _ in items if p in urls], storage_options)))
    local_it = iter(local)
    stamps = [stamped[p] if p in urls else next(local_it) for p, _, _ in items]
    gone = [p for p, st in zip((p for p, _, _ in items), stamps) if not st and p in urls]
    if gone:  # kept: the embed skips each, naming its URL
        from .folders import warn

        warn(f"manifest {path}: {len(gone)} of {len(items)} objects do not exist: "
             f"{', '.join(gone[:MISSING_SHOWN])}{' ...' if len(gone) > MISSING_SHOWN else ''}; "
             f"the embed skips them (naming each).")
    missing = [p for p, st in zip((p for p, _, _ in items), stamps) if not st and p not in urls]
    if missing:
        shown = ", ".join(missing[:MISSING_SHOWN]) + (" ..." if len(missing) > MISSING_SHOWN else "")
        raise DataError(f"manifest {path}: {len(missing)} of {len(items)} files do not exist or "
                        f"cannot be read: {shown}. Fix the paths (relative paths are relative to "
                        f"the manifest's folder) or remove those rows.")
    return [(p, c, s, st) for (p, c, s), st in zip(items, stamps)]


def _stamps(paths: list) -> list:
    """:func:`~.folders.stamp` of many files, in threads (stat releases the GIL; network disks are slow)."""
    if len(paths) < 256:
        return [stamp(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(stamp, paths, chunksize=256))
