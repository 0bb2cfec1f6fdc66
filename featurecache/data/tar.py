"""Webdataset tar shards: ``train-{0000..0003}.tar`` (local) or ``s3://bucket/shards/{train,test}-{0000..0001}.tar``.

A spec is a brace pattern of ``.tar`` files, or several joined by ``::`` (a list in Python);
local paths or URLs (read through :mod:`.remote`). A sample is the members of a shard that
share a key, webdataset's way: the member name up to the first dot of its base name, folders
included (``photos/cat_0.jpg`` and ``photos/cat_0.cls`` are sample ``photos/cat_0``). Its image
is the member ``KEY.jpg`` (``jpeg``, ``png``, ``webp``, or another image extension); its
label the text of ``KEY.cls`` (a class name: an integer is a name too) or of ``KEY.txt``, or,
with ``label_field`` (``--label-field``), that field of the JSON object in ``KEY.json`` (a
string or an integer) when the sample has neither. A record's id is ``SHARD#KEY`` (a local
shard's absolute path, or its URL).

A shard whose name holds ``train``, ``val`` or ``test`` as a word (``train-0000.tar``,
``shards_test_01.tar``) gives its samples that split, as split folders do; otherwise the
seeded, stratified split is drawn.

Rows keep the shards' order (the pattern's) and, in each, the members' order
(:attr:`~.base.Source.keeps_order`), so the embed streams each tar once, from start to end,
and a clustered embed runs one task per tar shard (:meth:`TarSource.natural_shards`).
Listing reads each tar's headers in one pass (and its small label members); a record's stamp
is the shard's own (``size:mtime_ns`` of a local file, ``size:ETag`` of an object), the image
member's name and its size: a shard rewritten changes the fingerprint, nothing is hashed. A sample without a label, or whose
image member is cut short by a truncated tar, is a record that the embed skips with its
reason, named ``SHARD#KEY``, as an unreadable image file.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass, field

from ..errors import DataError
from .base import Listing, Source
from .folders import IMAGE_EXTENSIONS, SPLIT_NAMES, is_hidden, warn

__all__ = ["TarSource", "shard_urls", "split_of", "LABEL_EXTENSIONS", "json_label"]

SEPARATOR = "::"  # between shards or patterns in one spec (webdataset's)
IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
LABEL_EXTENSIONS = ("cls", "txt")  # the label member, first found
JSON = "json"  # a sample's metadata, whose field ``label_field`` is the label
LABEL_BYTES = 1 << 16  # a label member longer than this is not a label
_SPLIT_WORD = re.compile(r"(?<![a-z0-9])(" + "|".join(sorted(SPLIT_NAMES, key=len, reverse=True))
                         + r")(?![a-z0-9])", re.IGNORECASE)


def _remote():
    from . import remote

    return remote


def _is_url(text: str) -> bool:
    return _remote().is_url(text)


def _parts(spec: str) -> list:
    return [p.strip() for p in str(spec).split(SEPARATOR) if p.strip()]


def _absolute(part: str) -> str:
    """A local part made absolute (a brace pattern stays a pattern); a URL as it is."""
    return part if _is_url(part) else os.path.abspath(os.path.expanduser(part))


def shard_urls(spec: str) -> list:
    """The shards a spec names, in order: each part's braces expanded; local paths absolute."""
    urls = []
    for part in _parts(spec):
        urls += [_absolute(u) for u in _remote().expand_braces(part)]
    return urls


def split_of(shard: str) -> str | None:
    """The split a shard's name gives (``train``, ``val`` or ``test`` as a word of its base
    name), or None."""
    name = shard.rstrip("/").rsplit("/", 1)[-1]
    name = os.path.basename(name)
    m = _SPLIT_WORD.search(name[:-4] if name.lower().endswith(".tar") else name)
    return SPLIT_NAMES[m.group(1).lower()] if m else None


def _key_ext(name: str) -> tuple[str, str] | None:
    """webdataset's ``(key, extension)`` of a member name: the key runs to the first dot of
    the base name; None for a name without one."""
    name = name[2:] if name.startswith("./") else name
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _hidden(name: str) -> bool:
    return any(is_hidden(p) for p in name.split("/") if p not in ("", "."))


@dataclass
class _Member:
    name: str
    size: int
    data: bytes | None = None
    error: str = ""  # why its content cannot be read (a truncated tar)
    info: object = None  # its TarInfo, to read it later from a seekable shard
    tar: object = None

    def read(self) -> bytes:
        """The member's bytes (read now from a seekable shard if not read yet)."""
        if self.error:
            raise DataError(self.error)
        if self.data is None:
            try:
                self.data = self.tar.extractfile(self.info).read()
            except (tarfile.ReadError, EOFError, OSError):
                self.error = _cut(self.name)
                raise DataError(self.error) from None
        return self.data


def _cut(name: str) -> str:
    return f"member {name} is cut short (the tar shard is truncated)"


@dataclass
class _Sample:
    key: str
    members: dict = field(default_factory=dict)  # extension -> _Member

    def image(self) -> _Member | None:
        return next((m for e, m in self.members.items() if e in IMAGE_EXTS), None)

    def label(self, label_field: str | None = None) -> str | None:
        """The label's text (``KEY.cls``, else ``KEY.txt``, else with ``label_field`` that
        field of ``KEY.json``), or None when there is none."""
        for ext in LABEL_EXTENSIONS:
            m = self.members.get(ext)
            if m is not None and m.data is not None and not m.error:
                try:
                    text = m.data.decode("utf-8-sig").strip()
                except UnicodeDecodeError:
                    continue
                if text and "\n" not in text:
                    return text
        m = self.members.get(JSON) if label_field else None
        if m is not None and m.data is not None and not m.error:
            return json_label(m.data, label_field)
        return None


def json_label(data: bytes, field: str) -> str | None:
    """The label ``field`` of a ``KEY.json`` member's object gives: a string (stripped, one
    line) or an integer, as a class name; None when the member is not a JSON object, lacks the
    field, or holds another type there (a list, a float, null, a boolean)."""
    import json

    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        return None
    value = obj.get(field) if isinstance(obj, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip() and "\n" not in value.strip():
        return value.strip()
    return None


class _Scan:
    """One pass over a shard, sample by sample (members of a key are adjacent, as webdataset
    writes them). Label members are read; with ``images``, image members too (from a stream
    as they pass; from a local file, which seeks, when :meth:`_Member.read` asks). After the
    pass, :attr:`truncated` says where the shard was cut short ("" when whole)."""

    def __init__(self, url: str, storage_options=None, images: bool = False,
                 label_field: str | None = None):
        self.url, self.storage_options, self.images = url, storage_options, images
        self.label_field = label_field  # KEY.json members are read too
        self.size, self.stamp = None, ""
        self.truncated = ""
        self.hidden = 0

    def __iter__(self):
        remote = _remote()
        try:
            self.stamp = remote.stat(self.url, self.storage_options)  # size:mtime_ns, size:ETag
            self.size = _size(self.stamp)
            f = remote.open_binary(self.url, self.storage_options)
        except FileNotFoundError:
            raise DataError(f"tar shard {self.url} does not exist") from None
        with f:
            self.stream = _is_url(self.url)  # a local file seeks over what it does not read
            try:
                tf = tarfile.open(fileobj=f, mode="r|" if self.stream else "r:")
            except tarfile.ReadError as exc:
                raise DataError(f"{self.url} is not a tar file ({exc})") from None
            yield from self._samples(tf)

    def _samples(self, tf):
        current, last = None, None
        members = iter(tf)
        while True:
            try:
                m = next(members)
            except StopIteration:
                if self.size is not None and tf.offset + 2 * tarfile.BLOCKSIZE > self.size:
                    self.truncated = (f"ends after {last.name}" if last is not None
                                      else "holds no member")
                break
            except (tarfile.ReadError, EOFError, OSError) as exc:
                if last is not None and current is not None:
                    # the member before the cut: its content is not all there
                    got = next((x for x in current.members.values() if x.name == last.name), None)
                    if got is not None:
                        got.error, got.data = _cut(last.name), None
                self.truncated = f"is cut short after {last.name}" if last is not None else \
                    f"cannot be read ({exc})"
                break
            last = m
            if not m.isfile():
                continue
            if _hidden(m.name):
                self.hidden += 1
                continue
            ke = _key_ext(m.name)
            if ke is None:
                continue
            key, ext = ke
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = _Sample(key)
            if ext in current.members:
                continue  # the same member twice: the first counts
            member = _Member(m.name, m.size, info=m, tar=tf)
            if (ext in LABEL_EXTENSIONS or ext == JSON and self.label_field) and \
                    m.size <= LABEL_BYTES or \
                    (ext in IMAGE_EXTS and self.images and self.stream):
                try:
                    member.read()
                except DataError:
                    pass  # (its error is kept)
            current.members[ext] = member
        if current is not None:
            yield current


def _size(stamp: str) -> int | None:
    head = str(stamp).split(":", 1)[0]
    return int(head) if head.isdigit() else None


class TarSource(Source):
    """Webdataset tar shards (kind ``tar``); a record's id is ``SHARD#KEY``."""

    spec_help = "webdataset tar shards (train-{0000..0003}.tar)"
    example = "train-{0000..0003}.tar"
    keeps_order = True
    remote = True  # list_items takes storage options; shards may be URLs
    json_labels = True  # list_items takes label_field: the label from a field of KEY.json

    # -- specs ----------------------------------------------------------------------------

    @classmethod
    def owns(cls, text: str) -> bool:
        """A tar spec (every part ends in ``.tar``) or a record id ``SHARD.tar#KEY``."""
        text = str(text)
        if "#" in text and not text.endswith("#"):
            shard, _, key = text.rpartition("#")
            return shard.lower().endswith(".tar") and SEPARATOR not in text
        parts = _parts(text)
        return bool(parts) and all(p.lower().endswith(".tar") for p in parts)

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return "#" not in str(spec) and cls.owns(spec)

    @classmethod
    def resolve(cls, spec: str, base) -> str:
        """Each local part relative to ``base`` (unless absolute); a URL as it is."""
        def one(p):
            if _is_url(p):
                return p
            p = os.path.expanduser(p)
            return p if os.path.isabs(p) else os.path.normpath(os.path.join(str(base), p))

        return SEPARATOR.join(one(p) for p in _parts(spec))

    @classmethod
    def same_id(cls, record_id: str) -> str:
        shard, _, key = record_id.rpartition("#")
        return record_id if _is_url(shard) else f"{os.path.realpath(shard)}#{key}"

    def describe(self) -> str:
        """The spec with its local parts made absolute (patterns kept); URLs as they are."""
        return SEPARATOR.join(_absolute(p) for p in _parts(self.spec))

    # -- listing --------------------------------------------------------------------------

    @classmethod
    def list_items(cls, spec: str, storage_options=None, label_field: str | None = None) \
            -> Listing:
        urls = shard_urls(spec)
        if not urls:
            raise DataError(f"data source {spec} names no tar shard.")
        seen, items, ignored, truncated = {}, [], {}, []
        json_only = 0  # samples without a label member but with a KEY.json (no label_field)
        for url in urls:
            if url in seen:
                raise DataError(f"data source {spec} names tar shard {url} twice; each shard "
                                f"may appear once, or its images would count twice.")
            seen[url] = True
            split = split_of(url)
            scan = _Scan(url, storage_options, label_field=label_field)
            for sample in scan:
                image = sample.image()
                if image is None:
                    _count(ignored, "tar samples without an image")
                    continue
                rid = f"{url}#{sample.key}"
                label = sample.label(label_field)
                json_only += label is None and not label_field and JSON in sample.members
                stamp = f"{scan.stamp}:{image.name}:{image.size}"
                items.append((rid, label, split, stamp))
            if scan.hidden:
                _count(ignored, "hidden or system entries", scan.hidden)
            if scan.truncated:
                truncated.append(f"{url} {scan.truncated}")
        if truncated:
            _count(ignored, "truncated tar shards", len(truncated))
            warn(f"{len(truncated)} tar shard{'s' * (len(truncated) > 1)} truncated: "
                 f"{'; '.join(truncated[:3])}{' ...' if len(truncated) > 3 else ''}; the samples "
                 f"after the cut are missing, and one cut short is skipped.")
        if json_only:
            warn(f"{json_only} tar sample{'s have' if json_only > 1 else ' has'} no label member "
                 f"(KEY.cls, KEY.txt) but a KEY.json: to take the label from a field of it, "
                 f"name the field (--label-field FIELD; label_field in Python and pipelines).")
        ids = [i for i, *_ in items]
        if len(set(ids)) < len(ids):
            dup = next(i for n, i in enumerate(ids) if i in ids[:n])
            raise DataError(f"{dup}: the members of this sample are not adjacent in the shard "
                            f"(or its key is repeated); webdataset tars keep a sample's members "
                            f"together. Rewrite the shard in sorted order (tar --sort=name).")
        root = SEPARATOR.join(_absolute(p) for p in _parts(spec))
        return Listing(root, "tar", items, ignored)

    # -- records --------------------------------------------------------------------------

    def natural_shards(self) -> list:
        """One range of records per tar shard (the records of a shard are contiguous)."""
        ranges, start = [], 0
        for i in range(1, len(self.records) + 1):
            if i == len(self.records) or _shard(self.records[i].path) != \
                    _shard(self.records[start].path):
                ranges.append((start, i))
                start = i
        return ranges

    @classmethod
    def read_id(cls, record_id: str, exif: bool = True, storage_options=None,
                label_field: str | None = None):
        """One sample's image, by scanning its shard up to it."""
        return _Reader(storage_options, label_field)(record_id, exif)

    def reader(self):
        return _Reader(getattr(self, "storage_options", None) or None,
                       getattr(self, "label_field", None) or None)


def _shard(record_id: str) -> str:
    return record_id.rpartition("#")[0]


def _count(ignored: dict, why: str, n: int = 1) -> None:
    ignored[why] = ignored.get(why, 0) + n


class _Reader:
    """``(record id, exif) -> PIL.Image``, reading forward through one shard at a time: asked
    for the samples of a shard in their order (the row order), it reads the shard once; a
    sample behind it reopens the shard. Picklable (the open shard is not carried)."""

    def __init__(self, storage_options=None, label_field: str | None = None):
        self.storage_options, self.label_field = storage_options, label_field
        self._url, self._it, self._passed = None, None, set()

    def __getstate__(self):
        return {"storage_options": self.storage_options, "label_field": self.label_field}

    def __setstate__(self, state):
        self.__init__(state["storage_options"], state.get("label_field"))

    def _restart(self, url: str):
        self.close()
        self._url, self._passed = url, set()
        self._it = iter(_Scan(url, self.storage_options, images=True,
                              label_field=self.label_field))

    def close(self):
        it, self._it = self._it, None
        if it is not None:
            it.close()

    def __call__(self, record_id: str, exif: bool = True):
        from .decode import read_file

        url, _, key = record_id.rpartition("#")
        if not url or not key:
            raise DataError(f"{record_id}: not a tar sample id (SHARD.tar#KEY)")
        if url != self._url or self._it is None or key in self._passed:
            self._restart(url)
        sample = None
        try:
            for s in self._it:
                self._passed.add(s.key)
                if s.key == key:
                    sample = s
                    break
        except DataError as exc:
            self.close()
            raise DataError(f"{record_id}: {exc}") from None
        except OSError as exc:  # a read the store's retries did not absorb
            self.close()
            raise DataError(f"{record_id}: cannot read {url} ({type(exc).__name__}: {exc})") \
                from None
        if sample is None:
            self.close()
            raise DataError(f"{record_id}: no such sample in {url}")
        image = sample.image()
        if image is None:
            raise DataError(f"{record_id}: the sample has no image member "
                            f"({', '.join('KEY.' + e for e in IMAGE_EXTS[:4])} ...)")
        if image.error:
            raise DataError(f"{record_id}: {image.error}")
        if sample.label(self.label_field) is None:
            json_ = f", or a {key}.json object whose field {self.label_field!r} is a string " \
                f"or an integer" if self.label_field else ""
            raise DataError(f"{record_id}: the sample has no label (a {key}.cls or {key}.txt "
                            f"member with the class name{json_})")
        try:
            data = image.read()
        except DataError as exc:
            raise DataError(f"{record_id}: {exc}") from None
        return read_file(io.BytesIO(data), exif, name=record_id)
