"""The source contract: what every kind of input (folder, manifest, built-in, later tar shards
and URLs) provides, and the listing rules they share.

A source class says, from the spec alone, whether it takes a spec (:meth:`Source.accepts`),
lists its records (:meth:`Source.list_items`), and opens one record as an image
(:meth:`Source.reader`). Everything else is shared: the classes, the split (given, or seeded
and stratified), the fixed order, the ``max_per_class`` subset, the fingerprint, the shards.

A record's id (:attr:`Record.path`, the string stored under ``/paths`` in the feature file)
is any string its source can open: a file path, ``builtin:digits/0007``, later
``shard-url#key``. Nothing outside the source opens it as a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from ..errors import DataError, OptionError, option

__all__ = ["Record", "Source", "Listing", "shard_range", "IMAGE_EXTENSIONS"]

# the file endings read as images (a folder's other files are counted as ignored)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass(frozen=True)
class Record:
    """One input image: its id, its class index and its split.

    ``path`` is the record's id, unique within its source and stable across listings: a file's
    absolute path, or a string that only the source can open (``builtin:digits/0007``). It is
    what the feature file stores under ``/paths``.
    """

    path: str
    label: int
    split: str
    stamp: str = ""  # what the content looked like when listed ("size:mtime_ns" of a file; "" when none)

    @property
    def id(self) -> str:
        """The record's id (the same string as :attr:`path`)."""
        return self.path


@dataclass
class Listing:
    """What a source class lists, before the shared rules: ``items`` are ``(id, class name,
    split or None, stamp)``; ``ignored`` counts what was left out, ``{why: n}``."""

    root: str
    kind: str
    items: list
    ignored: dict = field(default_factory=dict)


@dataclass
class Source:
    """A listed data set: its classes and its records, in a fixed order (the row order of the
    feature file, which resume relies on).

    Subclasses are the kinds of input; :data:`featurecache.data.sources.SOURCES` registers
    them. Open one with :func:`featurecache.data.open_source` (which picks the class) or
    ``Class.open(spec, ...)``.

    The contract, for a new kind of input:

    * ``accepts(spec)`` (class): True when the spec is this kind's (default: it starts with
      ``prefix``; for a local-path kind, ``takes(Path(spec))`` such as ``Path.is_file``);
    * ``list_items(spec)`` (class): a :class:`Listing`; refuse bad data with :class:`DataError`;
    * ``read_id(record_id, exif)`` (class): one record as an 8-bit RGB ``PIL.Image``, raising
      :class:`DataError` that names the record (default: the id is a file path); override
      ``reader()`` when reading needs the instance, or ``dataset()`` (e.g. to stream a tar
      once, in order);
    * ``prefix`` (a scheme such as ``builtin:``, or "" for a local path), ``spec_help`` (how
      the user names it, for messages and help text), ``example`` and, if the default does
      not fit, ``resolve(spec, base)``, ``describe()`` and ``same_id(record_id)``.
    """

    root: str
    kind: str             # folder | split-folders | manifest | builtin (stored as data_kind)
    classes: list
    records: list
    split_origin: str     # given | seeded(test_size=..., seed=...)
    ignored: dict = field(default_factory=dict)  # what the listing left out: {why: count}
    part: tuple | None = None  # (index, count, first row) when this holds one shard's records
    whole_fingerprint: str = ""  # the fingerprint of the whole data set, for a part
    spec: str = ""        # the spec it was opened from
    # how a remote kind reaches its store (fsspec storage options: may hold keys, so never
    # recorded; see data.remote.public_options); {} for local kinds
    storage_options: dict = field(default_factory=dict, repr=False, compare=False)
    label_field: str | None = None  # a json_labels kind: the KEY.json field of the label

    prefix: ClassVar[str | tuple] = ""  # scheme(s) of its specs and record ids; "": local paths
    takes: ClassVar[Callable | None] = None  # a local-path kind: which paths, e.g. Path.is_dir
    spec_help: ClassVar[str] = ""  # how a user names this kind, e.g. "an image folder"
    example: ClassVar[str] = ""  # a spec to show in help text
    remote: ClassVar[bool] = False  # list_items(spec, storage_options) reads a store (URLs)
    json_labels: ClassVar[bool] = False  # list_items(..., label_field=F): labels from field F
    # of a record's JSON metadata (a tar sample's KEY.json); other kinds refuse label_field
    dense: ClassVar[bool] = False  # images with masks/boxes (data.dense): the embed resizes
    # them whole and stores the targets; records have no class (label 0)
    keeps_order: ClassVar[bool] = False  # rows in the listing's order (a tar's samples as
    # streamed, so that each tar is read once, in order), not sorted by (split, class, id)

    # -- the class's side: specs ----------------------------------------------------------

    @classmethod
    def accepts(cls, spec: str) -> bool:
        """Whether ``spec`` names data of this kind: it starts with the kind's :attr:`prefix`,
        or, for a local-path kind, the path passes :attr:`takes` (as it is now on disk)."""
        if cls.prefix:
            return spec.startswith(cls.prefix)
        return cls.takes is not None and cls.takes(Path(spec))

    @classmethod
    def owns(cls, text: str) -> bool:
        """Whether ``text`` (a spec or a record id) is this kind's from its form alone (for
        :func:`~featurecache.data.sources.read_record`, ``same_ids`` and ``resolve_spec``);
        default: it starts with the kind's scheme."""
        return bool(cls.prefix) and text.startswith(cls.prefix)

    @classmethod
    def list_items(cls, spec: str) -> Listing:
        raise NotImplementedError

    @classmethod
    def resolve(cls, spec: str, base) -> str:
        """``spec`` as written in a file in folder ``base`` (a pipeline TOML): a relative
        local path is relative to ``base``; a spec with a scheme is left as it is."""
        if cls.prefix:
            return spec
        p = Path(spec).expanduser()
        return spec if p.is_absolute() else os.path.normpath(Path(base) / p)

    @classmethod
    def same_id(cls, record_id: str) -> str:
        """The form of a record id under which two ids name the same image (to match the rows
        of two files): a local path resolved (symlinks, ``..``); an id with a scheme as it is."""
        return record_id if cls.prefix else os.path.realpath(record_id)

    @classmethod
    def open(cls, spec, test_size: float = 0.3, seed: int = 0,
             max_per_class: int | None = None, storage_options: dict | None = None,
             label_field: str | None = None) -> "Source":
        """List ``spec`` and apply the shared rules (see :func:`~featurecache.data.open_source`);
        ``storage_options`` reach a :attr:`remote` kind's ``list_items`` and its reader,
        ``label_field`` a :attr:`json_labels` kind's (any other kind refuses it)."""
        spec = str(spec)
        so = dict(storage_options or {}) if cls.remote else {}
        if label_field and not cls.json_labels:
            raise OptionError(f"{option('label_field', label_field)} names the field of a tar "
                              f"sample's KEY.json that holds its label; {spec} is not tar "
                              f"shards ({cls.spec_help or cls.__name__}): drop it.")
        extra = {"label_field": label_field or None} if cls.json_labels else {}
        listing = cls.list_items(spec, so, **extra) if cls.remote else \
            cls.list_items(spec, **extra)
        items = [it for it in listing.items if it[1] is not None]
        # an item without a class (a tar sample without a label) stays a record, label -1: the
        # embed skips it with its reason, as an unreadable image
        unlabelled = [it for it in listing.items if it[1] is None]
        if not items:
            raise DataError(f"data source {spec} holds no images (looked for "
                            f"{', '.join(IMAGE_EXTENSIONS)}).")
        classes = sorted({c for _, c, _, _ in items})
        if len(classes) < 2:
            raise DataError(f"data source {spec} holds a single class ({classes[0]!r}); a "
                            f"classifier needs at least two. Put each class's images in its own "
                            f"folder (or label column).")
        given = all(s is not None for _, _, s, _ in items)
        if not given:
            if any(s is not None for _, _, s, _ in items):
                raise DataError(f"data source {spec}: some rows have a split and some do not; "
                                f"give a split for every row or for none.")
            items = seeded_split(items, test_size, seed, spec)
        index = {c: i for i, c in enumerate(classes)}
        records = [Record(p, index[c], s, st) for p, c, s, st in items]
        if unlabelled:
            at = {p: n for n, (p, *_) in enumerate(listing.items)}
            records = sorted(records + [Record(p, -1, s or "train", st)
                                        for p, _, s, st in unlabelled], key=lambda r: at[r.path])
        if not cls.keeps_order:
            records.sort(key=lambda r: (r.split, r.label, r.path))
        if max_per_class is not None:
            records = _limit(records, max_per_class)
        origin = "given" if given else f"seeded(test_size={test_size}, seed={seed})"
        return cls(listing.root, listing.kind, classes, records, origin, listing.ignored,
                   spec=spec, storage_options=so,
                   label_field=(label_field or None) if cls.json_labels else None)

    # -- the instance's side: records -----------------------------------------------------

    @classmethod
    def read_id(cls, record_id: str, exif: bool = True):
        """One record, from its id alone, as an 8-bit RGB ``PIL.Image`` (``exif``: apply the
        EXIF orientation); raises :class:`DataError` naming the record. Default: the id is a
        file path (:func:`~featurecache.data.decode.read_file`)."""
        from .decode import read_file

        return read_file(record_id, exif)

    def reader(self) -> Callable:
        """A picklable ``(record id, exif) -> PIL.Image`` for decode workers (default
        :meth:`read_id`; a source whose reading needs its own state returns a small object
        holding it, never one holding all the records)."""
        return type(self).read_id

    def open_record(self, record, exif: bool = True):
        """One record (a :class:`Record` or its id) as an 8-bit RGB ``PIL.Image``."""
        return self.reader()(record.path if isinstance(record, Record) else str(record), exif)

    def dataset(self, records, transform, exif: bool = True):
        """A torch dataset over ``records`` (these, in this order: a slice of
        :attr:`records` when resuming): item ``i`` is ``(tensor or None, i, reason or
        None)``, batched by :func:`featurecache.data.collate`; a bad image gives its reason
        and never raises."""
        from .decode import ImageDataset

        return ImageDataset(records, transform, exif, read=self.reader())

    def describe(self) -> str:
        """The spec that opens this data set again from anywhere (the rebuild command's
        DATA): a local path made absolute; a spec with a scheme as it is."""
        return self.spec if self.prefix else os.path.abspath(self.spec or self.root)

    def natural_shards(self) -> list | None:
        """The record ranges ``[(start, stop), ...]`` a clustered embed runs as its shards,
        one task each (a tar source: one per tar shard, so that a worker streams whole
        tars), or None: the records are cut into equal shards."""
        return None

    def shard_ranges(self, count: int) -> list:
        """``(start, stop)`` of each of ``count`` shards: the natural shards when there are
        ``count`` of them, else contiguous near-equal cuts."""
        natural = self.natural_shards()
        if natural is not None and len(natural) == count:
            return list(natural)
        return [shard_range(len(self.records), i, count) for i in range(count)]

    def part_of(self, index: int, count: int) -> "Source":
        """Shard ``index`` of ``count`` (see :meth:`shard_ranges`): its records only (what a
        cluster task receives), remembering where it starts and the whole data set's
        fingerprint."""
        shard_range(len(self.records), index, count)  # a valid shard, or DataError
        start, stop = self.shard_ranges(count)[index]
        return dataclasses.replace(self, records=self.records[start:stop],
                                   part=(index, count, start),
                                   whole_fingerprint=self.fingerprint())

    def fingerprint(self) -> str:
        """sha256 over classes and every (id, label, split, stamp): changes when the data
        set does, including an image rewritten under the same name."""
        if self.whole_fingerprint:
            return self.whole_fingerprint
        h = hashlib.sha256(json.dumps(self.classes).encode())
        for r in self.records:
            h.update(f"{r.path}\t{r.label}\t{r.split}\t{r.stamp}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def summary(self) -> str:
        """One line: images, classes, split sizes, and what was ignored."""
        n = Counter(r.split for r in self.records)
        splits = " / ".join(f"{s} {n[s]:,}" for s in ("train", "val", "test") if n[s])
        ignored = "; ignored " + ", ".join(f"{v:,} {k}" for k, v in self.ignored.items()) \
            if self.ignored else ""
        return (f"{len(self.records):,} images in {len(self.classes)} classes ({splits}) from "
                f"{self.root}{ignored}")


def shard_range(n: int, index: int, count: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of shard ``index`` of ``count`` (contiguous, near-equal sizes)."""
    if count < 1 or not 0 <= index < count:
        raise DataError(f"shard {index} of {count} is not valid; need 0 <= index < count.")
    return n * index // count, n * (index + 1) // count


def _limit(records: list, k: int) -> list:
    kept, seen = [], {}
    for r in records:
        key = (r.split, r.label)
        if seen.get(key, 0) < k:
            seen[key] = seen.get(key, 0) + 1
            kept.append(r)
    return kept


def seeded_split(items, test_size: float, seed: int, spec: str):
    """``items`` with a stratified train/test split drawn with ``seed``."""
    from sklearn.model_selection import train_test_split

    if not 0 < test_size < 1:
        raise DataError(f"test_size == {test_size}, must be between 0 and 1.")
    labels = [c for _, c, _, _ in items]
    small = sorted(c for c, n in Counter(labels).items() if n < 2)
    if small:
        raise DataError(f"data source {spec}: classes {small} have fewer than 2 images; a "
                        f"stratified train/test split needs at least 2 per class.")
    try:
        _, test = train_test_split(range(len(items)), test_size=test_size, random_state=seed,
                                   stratify=labels)
    except ValueError as exc:
        raise DataError(f"cannot split {spec} with test_size={test_size}: {exc}") from None
    is_test = bytearray(len(items))
    for i in test:
        is_test[i] = 1
    return [(p, c, "test" if is_test[i] else "train", st) for i, (p, c, _, st) in enumerate(items)]
