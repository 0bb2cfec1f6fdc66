"""Where the images are: a folder tree, a CSV manifest, or a built-in data set -> records.

Accepted sources (see :func:`open_source`):

* ``DATA/<class>/<image>``: an ImageFolder tree; a seeded, stratified train/test split is
  drawn (``test_size``, ``seed``) and recorded.
* ``DATA/<split>/<class>/<image>`` with splits ``train``, ``test`` and optionally ``val``.
* ``manifest.csv`` with a header ``path,label[,split]``; relative paths are relative to the
  CSV file's folder.
* ``builtin:digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images), no files.

Records are sorted by (split, class, path), so a source always yields the same order:
the row order of the feature file, which resume relies on.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .folders import IMAGE_EXTENSIONS, SPLIT_NAMES, folder_items, stamp

__all__ = ["BUILTINS", "IMAGE_EXTENSIONS", "Record", "Source", "open_source", "shard_range"]

MISSING_SHOWN = 5  # missing files named in the error
BUILTINS = ("digits",)


@dataclass(frozen=True)
class Record:
    """One input image: where it is, its class index and its split."""

    path: str
    label: int
    split: str
    stamp: str = ""  # "size:mtime_ns" of the file when listed ("" when it has none)


@dataclass
class Source:
    """A resolved data set: its classes and its records, in a fixed order."""

    root: str
    kind: str             # folder | split-folders | manifest | builtin
    classes: list
    records: list
    split_origin: str     # given | seeded(test_size=..., seed=...)
    ignored: dict = field(default_factory=dict)  # what the listing left out: {why: count}
    part: tuple | None = None  # (index, count, first row) when this holds one shard's records
    whole_fingerprint: str = ""  # the fingerprint of the whole data set, for a part

    def part_of(self, index: int, count: int) -> "Source":
        """Shard ``index`` of ``count``: its records only (what a cluster task receives),
        remembering where it starts and the whole data set's fingerprint."""
        start, stop = shard_range(len(self.records), index, count)
        return dataclasses.replace(self, records=self.records[start:stop],
                                   part=(index, count, start),
                                   whole_fingerprint=self.fingerprint())

    def fingerprint(self) -> str:
        """sha256 over classes and every (path, label, split, size, mtime): changes when the
        data set does, including an image rewritten under the same name."""
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


def open_source(spec, test_size: float = 0.3, seed: int = 0,
                max_per_class: int | None = None) -> Source:
    """Resolve ``spec`` (a folder, a ``.csv`` manifest, or ``builtin:NAME``) into records.

    Folders: hidden entries (``.DS_Store``, AppleDouble ``._x.jpg``, ``.ipynb_checkpoints``)
    and ``__MACOSX`` are ignored and counted; a broken symbolic link stays a record, which the
    embed skips with its reason. Manifests: every file is checked up front.

    Args:
        test_size: share of each class put in ``test`` when the source gives no split.
        seed: seed of that split.
        max_per_class: keep at most this many images per class and split (first in path
            order): a quick subset for demos and tests.

    Raises:
        DataError: the source is missing or empty, has fewer than two classes, a class without
            images, a folder mixing split and class folders, or a bad manifest (undecodable,
            duplicate rows, empty labels, missing files: all named).
    """
    spec = str(spec)
    ignored: dict = {}
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTINS:
            raise DataError(f"unknown built-in data set {name!r}; available: "
                            f"{', '.join('builtin:' + b for b in BUILTINS)}.")
        root, kind = spec, "builtin"
        items = _builtin_items(name)
    else:
        path = Path(spec)
        if not path.exists():
            raise DataError(f"data source {spec} does not exist; give an image folder, a CSV "
                            f"manifest (path,label[,split]) or builtin:digits.")
        root = str(path.resolve())
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            raise DataError(f"{spec} is an image; the data are a folder of class folders, a CSV "
                            f"manifest (path,label[,split]) or builtin:digits (to classify one "
                            f"image with a head, use `featurecache predict`).")
        if path.is_file():
            kind, items = "manifest", _manifest_items(path)
        else:
            kind, items = folder_items(path, ignored)
    if not items:
        raise DataError(f"data source {spec} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    classes = sorted({c for _, c, _, _ in items})
    if len(classes) < 2:
        raise DataError(f"data source {spec} holds a single class ({classes[0]!r}); a classifier "
                        f"needs at least two. Put each class's images in its own folder (or "
                        f"label column).")
    given = all(s is not None for _, _, s, _ in items)
    if not given:
        if any(s is not None for _, _, s, _ in items):
            raise DataError(f"data source {spec}: some rows have a split and some do not; "
                            f"give a split for every row or for none.")
        items = _seeded_split(items, test_size, seed, spec)
    index = {c: i for i, c in enumerate(classes)}
    records = sorted((Record(p, index[c], s, st) for p, c, s, st in items),
                     key=lambda r: (r.split, r.label, r.path))
    if max_per_class is not None:
        records = _limit(records, max_per_class)
    origin = "given" if given else f"seeded(test_size={test_size}, seed={seed})"
    return Source(root, kind, classes, records, origin, ignored)


def _limit(records: list, k: int) -> list:
    kept, seen = [], {}
    for r in records:
        key = (r.split, r.label)
        if seen.get(key, 0) < k:
            seen[key] = seen.get(key, 0) + 1
            kept.append(r)
    return kept


def _manifest_items(path: Path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
            rows = list(csv.reader(f))
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
        p = Path(get("path"))
        p = os.path.abspath(p if p.is_absolute() else path.parent / p)
        if p in first_line:
            raise DataError(f"manifest {path} line {line}: {p} is listed again (first on line "
                            f"{first_line[p]}); each image may appear once, or it could land in "
                            f"both train and test. Remove the duplicate rows.")
        first_line[p] = line
        items.append((p, label, SPLIT_NAMES.get(split)))
    stamps = _stamps([p for p, _, _ in items])
    missing = [p for p, st in zip((p for p, _, _ in items), stamps) if not st]
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


def _seeded_split(items, test_size: float, seed: int, spec: str):
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


def _builtin_items(name: str):
    from sklearn.datasets import load_digits

    target = load_digits().target
    return [(f"builtin:{name}/{i:04d}", str(int(t)), None, "") for i, t in enumerate(target)]
