"""Where the images are -> records: the registry of source classes, and :func:`open_source`.

Registered sources (:data:`SOURCES`, in the order help text names them):

* ``SCENES/<split>/images/`` with ``masks/`` and/or ``annotations.json`` and a
  ``SCENES/classes.txt``: dense data (segmentation masks, COCO boxes;
  :class:`~.dense.DenseSource`), checked before a plain folder.
* ``DATA/<class>/<image>``: an ImageFolder tree; a seeded, stratified train/test split is
  drawn (``test_size``, ``seed``) and recorded. ``DATA/<split>/<class>/<image>`` with splits
  ``train``, ``test`` and optionally ``val`` (:class:`~.folders.FolderSource`).
* ``manifest.csv`` with a header ``path,label[,split]``; relative paths are relative to the
  CSV file's folder (:class:`~.manifest.ManifestSource`).
* ``builtin:digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images), no files
  (:class:`~.builtin.BuiltinSource`).
* ``train-{0000..0003}.tar``: webdataset tar shards, local or at URLs, a brace pattern or
  several joined by ``::`` (:class:`~.tar.TarSource`).
* ``s3://bucket/photos/`` (any fsspec URL: ``gs://``, ``az://``, ``https://``), laid out
  as a local folder (:class:`~.urls.UrlFolderSource`), and ``s3://bucket/manifest.csv``
  (:class:`~.urls.UrlManifestSource`); ``storage_options`` say how to reach the store
  (:mod:`.remote`).

The first class that accepts a spec takes it: those with a scheme (``builtin:``) first, then
those of local paths, in registry order. Records are sorted by (split, class,
id), so a source always yields the same order: the row order of the feature file, which
resume relies on. Adding a kind of input is one module with a :class:`~.base.Source`
subclass and one line in :data:`SOURCES`.
"""

from __future__ import annotations

from ..errors import DataError
from .base import IMAGE_EXTENSIONS, Record, Source, seeded_split, shard_range
from .builtin import BUILTINS, BuiltinSource
from .dense import DenseSource
from .folders import FolderSource
from .manifest import ManifestSource
from .urls import UrlFolderSource, UrlManifestSource
from .tar import TarSource

__all__ = ["SOURCES", "BUILTINS", "IMAGE_EXTENSIONS", "Record", "Source", "open_source",
           "source_class", "resolve_spec", "read_record", "load_image", "same_ids", "spec_help",
           "shard_range"]

# the one registry of source kinds; prefixed kinds are matched first, then local paths in order
SOURCES: tuple = (DenseSource, FolderSource, TarSource, ManifestSource, BuiltinSource, UrlManifestSource,
                  UrlFolderSource)

_seeded_split = seeded_split  # the name tests and benchmarks import


def spec_help() -> str:
    """How a user names the data: ``an image folder, a CSV manifest (path,label[,split]) or
    builtin:digits`` (for messages and help text)."""
    names = [cls.spec_help for cls in SOURCES if cls.spec_help]  # "": said by another kind
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _prefixed(spec: str):
    """The class that owns ``spec`` (or a record id) by its form (its scheme; a tar shard's
    ``.tar`` and ``#key``: :meth:`Source.owns`), or None (a local path)."""
    return next((cls for cls in SOURCES if cls.owns(spec)), None)


def source_class(spec) -> type[Source]:
    """The source class that takes ``spec``.

    Raises:
        DataError: no registered kind takes it (a local path that does not exist).
    """
    spec = str(spec)
    ordered = [c for c in SOURCES if c.prefix] + [c for c in SOURCES if not c.prefix]
    cls = next((c for c in ordered if c.accepts(spec)), None)
    if cls is None:
        raise DataError(f"data source {spec} does not exist; give {spec_help()}.")
    return cls


def resolve_spec(spec: str, base) -> str:
    """``spec`` as written in a file in folder ``base`` (a pipeline TOML): a relative local
    path is taken relative to ``base``; a spec with a scheme stays as it is."""
    return (_prefixed(spec) or Source).resolve(spec, base)


def same_ids(record_ids) -> list:
    """Each record id in the form under which two ids name the same image (local paths
    resolved: the same images reached through a symlinked folder compare equal; ids with a
    scheme as they are)."""
    return [(_prefixed(i) or Source).same_id(i) for i in record_ids]


def read_record(record_id: str, exif: bool = True):
    """One record, by its id alone, as an 8-bit RGB ``PIL.Image``: a file path, or an id of a
    prefixed kind (``builtin:digits/0007``)."""
    return (_prefixed(record_id) or Source).read_id(record_id, exif)


load_image = read_record  # its older name (featurecache.data.load_image)


def open_source(spec, test_size: float = 0.3, seed: int = 0,
                max_per_class: int | None = None, storage_options: dict | None = None,
                label_field: str | None = None) -> Source:
    """Resolve ``spec`` (a folder, a ``.csv`` manifest, or ``builtin:NAME``) into records.

    Folders: hidden entries (``.DS_Store``, AppleDouble ``._x.jpg``, ``.ipynb_checkpoints``)
    and ``__MACOSX`` are ignored and counted; a broken symbolic link stays a record, which the
    embed skips with its reason. Manifests: every file is checked up front.

    Args:
        spec: the data (see :data:`SOURCES`); a :class:`Source` is returned as it is.
        test_size: share of each class put in ``test`` when the source gives no split.
        seed: seed of that split.
        max_per_class: keep at most this many images per class and split (first in path
            order): a quick subset for demos and tests.
        storage_options: how a URL's store is reached (fsspec options: ``endpoint_url``,
            ``profile``, ``anon``...; see :mod:`.remote`); local kinds ignore them.
        label_field: tar shards: the field of a sample's ``KEY.json`` whose value (a string
            or an integer) is its label when it has no ``KEY.cls`` or ``KEY.txt``; other
            kinds refuse it.

    Raises:
        DataError: the source is missing or empty, has fewer than two classes, a class without
            images, a folder mixing split and class folders, or a bad manifest (undecodable,
            duplicate rows, empty labels, missing files: all named).
    """
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, (list, tuple)):  # several tar shards (or patterns): one spec
        spec = "::".join(map(str, spec))
    return source_class(spec).open(str(spec), test_size=test_size, seed=seed,
                                   max_per_class=max_per_class, storage_options=storage_options,
                                   label_field=label_field)
