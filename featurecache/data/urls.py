"""Data at URLs (``s3://``, ``gs://``, ``az://``, ``https://`` ..., through fsspec): a folder
URL laid out as a local image folder, and a CSV manifest at a URL.

* ``s3://bucket/photos/`` with ``<class>/<image>`` (or ``<split>/<class>/<image>``) below
  (:class:`UrlFolderSource`): listed from the store's listing (one request per page of keys,
  none per object); a record's id is the image's URL and its stamp ``size:ETag``.
* ``s3://bucket/manifest.csv`` (:class:`UrlManifestSource`): as a local manifest; relative
  paths are relative to its folder URL.

A missing object or an undecodable image is a skipped input naming its URL; the store
refusing the credentials or not answering is one line (:class:`~.remote.RemoteError`).
How the store is reached (endpoint, profile, anonymous access) is the source's
``storage_options`` (``--storage-options``); credentials come from the environment as
boto/s3fs/gcsfs/adlfs read them.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

from ..errors import DataError
from .base import Listing, Source
from .folders import IMAGE_EXTENSIONS, SPLIT_NAMES, _warn_if_splits_disagree, is_hidden

__all__ = ["UrlFolderSource", "UrlManifestSource", "ImageReader", "read_image", "SCHEMES"]

# the schemes of fsspec's object stores and web servers (gcsfs, adlfs and s3fs are extras)
SCHEMES = ("s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://", "abfss://", "http://",
           "https://", "file://")
NOT_FOLDERS = (".csv", ".tar", ".tgz", ".tar.gz")  # other kinds' URLs (manifests, tar shards)


class _Named(io.BytesIO):
    """An image's bytes that messages name by its URL (``f"{file}"`` is the URL)."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.url = name

    def __str__(self) -> str:
        return self.url

    __format__ = lambda self, spec: format(self.url, spec)  # noqa: E731


def read_image(record_id: str, exif: bool = True, storage_options=None):
    """One image, a local path or a URL, as 8-bit RGB; :class:`DataError` naming it when the
    object is missing, the store fails, or it cannot be decoded."""
    from . import remote
    from .decode import read_file

    if not remote.is_url(record_id):
        return read_file(record_id, exif)
    try:
        data = remote.read_bytes(record_id, storage_options)
    except FileNotFoundError:
        raise DataError(f"{record_id}: object not found") from None
    except OSError as exc:
        raise remote.remote_error(exc, record_id, storage_options) from None
    return read_file(_Named(data, record_id), exif)


@dataclass(frozen=True)
class ImageReader:
    """A picklable ``(record id, exif) -> PIL.Image`` holding the storage options (for the
    decode workers)."""

    storage_options: dict = field(default_factory=dict)

    def __call__(self, record_id: str, exif: bool = True):
        return read_image(record_id, exif, self.storage_options)


class _UrlSource(Source):
    prefix = SCHEMES
    remote = True

    @classmethod
    def read_id(cls, record_id: str, exif: bool = True):
        return read_image(record_id, exif)

    def reader(self):
        return ImageReader(dict(self.storage_options))


def _ext(spec: str) -> str:
    name = spec.rstrip("/").rsplit("/", 1)[-1].lower()
    for e in (".tar.gz",):
        if name.endswith(e):
            return e
    return os.path.splitext(name)[1]


class UrlFolderSource(_UrlSource):
    """``s3://bucket/photos/`` holding ``<class>/<image>`` (kind ``folder``) or
    ``<split>/<class>/<image>`` (``split-folders``); a record's id is the image's URL."""

    spec_help = "a folder or manifest at a URL (s3://bucket/photos/)"
    example = "s3://bucket/photos/"

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return spec.startswith(SCHEMES) and "{" not in spec and \
            _ext(spec) not in NOT_FOLDERS + IMAGE_EXTENSIONS

    @classmethod
    def list_items(cls, spec: str, storage_options: dict | None = None) -> Listing:
        from . import remote

        root = spec.rstrip("/")
        try:
            files = [(u, st) for u, st in remote.walk(root + "/", storage_options)
                     if u.startswith(root + "/")]
        except FileNotFoundError:
            files = []
        if not files:
            raise DataError(f"data source {spec} holds nothing (no objects below it); check "
                            f"the URL (and the endpoint_url of --storage-options).")
        ignored: dict = {}
        kind, items = _folder_items(root, files, ignored)
        return Listing(root, kind, items, ignored)


def _count(ignored: dict, why: str) -> None:
    ignored[why] = ignored.get(why, 0) + 1


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _folder_items(root: str, files: list, ignored: dict):
    """The rules of a local image folder (:mod:`.folders`) over a store's keys below
    ``root``: hidden entries and non-images counted, class (or split/class) folders."""
    entries = []
    for url, stamp in files:
        parts = url[len(root) + 1:].split("/")
        if any(is_hidden(p) for p in parts):
            _count(ignored, "hidden or system entries")
        elif len(parts) == 1:
            _count(ignored, "images outside a class folder" if _is_image(parts[0])
                   else "files that are not images")
        else:
            entries.append((parts, url, stamp))
    tops = sorted({parts[0] for parts, _, _ in entries})
    if not tops:
        raise DataError(f"folder {root} has no class subfolders; lay it out as "
                        f"{root}/<class>/<image> or {root}/<split>/<class>/<image>.")
    splits = [t for t in tops if t.lower() in SPLIT_NAMES]
    if splits and len(splits) < len(tops):
        others = [t for t in tops if t not in splits]
        raise DataError(
            f"folder {root} mixes split folders ({', '.join(splits)}) with other folders "
            f"({', '.join(others[:5])}); use {root}/<split>/<class>/<image> throughout, or, if "
            f"{splits[0]!r} is a class, a CSV manifest (path,label).")
    depth = 2 if splits else 1  # the class folder is parts[depth - 1]
    items, folders = [], {}
    # in a local folder's order (class folders, then paths): the seeded split draws the same
    for parts, url, stamp in sorted(entries, key=lambda e: (e[0][:depth], e[1])):
        if len(parts) <= depth:
            _count(ignored, "images outside a class folder" if _is_image(parts[-1])
                   else "files that are not images")
            continue
        folder = "/".join(parts[:depth])
        folders.setdefault(folder, 0)
        if not _is_image(parts[-1]):
            _count(ignored, "files that are not images")
            continue
        folders[folder] += 1
        items.append((url, parts[depth - 1], SPLIT_NAMES[parts[0].lower()] if splits else None,
                      stamp))
    empty = [f for f, n in sorted(folders.items()) if not n]
    if empty:
        raise DataError(f"class folder {root}/{empty[0]} has no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder.")
    if splits:
        _warn_if_splits_disagree(root, items)
        return "split-folders", items
    return "folder", items


class UrlManifestSource(_UrlSource):
    """``s3://bucket/manifest.csv`` (a CSV manifest at a URL); relative paths are relative
    to its folder URL; a record's id is the image's URL (or absolute path)."""

    spec_help = ""  # said by the folder URL's: "a folder or manifest at a URL"
    example = "s3://bucket/manifest.csv"

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return spec.startswith(SCHEMES) and "{" not in spec and \
            _ext(spec) in (".csv",) + IMAGE_EXTENSIONS

    @classmethod
    def list_items(cls, spec: str, storage_options: dict | None = None) -> Listing:
        from . import remote
        from .manifest import manifest_items, not_an_image

        not_an_image(spec)
        try:
            data = remote.read_bytes(spec, storage_options)
        except FileNotFoundError:
            raise DataError(f"manifest {spec} does not exist; check the URL (and the "
                            f"endpoint_url of --storage-options).") from None
        base = spec.rsplit("/", 1)[0]
        return Listing(spec, "manifest", manifest_items(spec, data, base, storage_options))
