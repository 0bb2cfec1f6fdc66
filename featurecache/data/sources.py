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
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

__all__ = ["Record", "Source", "open_source", "shard_range", "BUILTINS", "IMAGE_EXTENSIONS"]

MISSING_SHOWN = 5  # missing files named in the error
NOT_UTF8 = "files whose names are not UTF-8"
IGNORED_NAMES = ("__MACOSX",)  # folders that archive tools add beside the data
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLIT_NAMES = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}
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

    def fingerprint(self) -> str:
        """sha256 over classes and every (path, label, split, size, mtime): changes when the
        data set does, including an image rewritten under the same name."""
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
            kind, items = _folder_items(path, ignored)
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


def _stamp(path: str, st=None) -> str:
    """``size:mtime_ns`` of a file (``st``: its stat, when already made), or "" when it
    cannot be read (a broken link)."""
    st = st or _stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}" if st else ""


def _stat(path: str):
    try:
        return os.stat(path)
    except OSError:
        return None


def _utf8(name: str) -> bool:
    """False for a file name with bytes that are not UTF-8 (Python holds them as surrogates);
    the file stores names as UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(name: str) -> str:
    """A name with its undecodable bytes written as ``\\xff`` (printable in any terminal)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace") if not _utf8(name) else name


def is_hidden(name: str) -> bool:
    """A hidden or system entry (``.DS_Store``, ``._x.jpg``, ``__MACOSX``): never an input."""
    return name.startswith(".") or name in IGNORED_NAMES


def _visible_dirs(folder: Path, ignored: dict) -> list[Path]:
    out = []
    for d in sorted(folder.iterdir()):
        if d.is_dir():
            if is_hidden(d.name):
                _count(ignored, "hidden or system entries")
            elif not _utf8(d.name):
                raise DataError(f"folder name {_shown(str(d))} is not valid UTF-8, and class "
                                f"names are stored as UTF-8; rename the folder.")
            else:
                out.append(d)
    return out


def _count(ignored: dict, why: str, n: int = 1) -> None:
    ignored[why] = ignored.get(why, 0) + n


def _images_in(folder: Path, ignored: dict) -> list[tuple]:
    """``(path, stamp, identity)`` of the images under ``folder`` (any depth), sorted; hidden
    entries and other files are counted in ``ignored``; broken links are kept (the embed
    skips them)."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        keep = sorted(d for d in dirs if not is_hidden(d))
        if len(keep) < len(dirs):
            _count(ignored, "hidden or system entries", len(dirs) - len(keep))
        dirs[:] = keep
        for name in files:
            if is_hidden(name):
                _count(ignored, "hidden or system entries")
            elif not _utf8(name):
                if NOT_UTF8 not in ignored:  # one example named, once; the rest counted
                    _warn(f"{_shown(os.path.join(top, name))}: the file name is not valid UTF-8, "
                          f"and names are stored as UTF-8; such files are left out (rename them).")
                _count(ignored, NOT_UTF8)
            elif os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                _count(ignored, "files that are not images")
            else:
                p = os.path.abspath(os.path.join(top, name))
                st = _stat(p)
                found.append((p, _stamp(p, st), (st.st_dev, st.st_ino) if st else p))
    return sorted(found)


def _folder_items(root: Path, ignored: dict):
    dirs = _visible_dirs(root, ignored)
    if not dirs:
        raise DataError(f"folder {root} has no class subfolders; lay it out as "
                        f"{root}/<class>/<image> or {root}/<split>/<class>/<image>.")
    splits = [d for d in dirs if d.name.lower() in SPLIT_NAMES]
    if splits and len(splits) < len(dirs):
        others = [d.name for d in dirs if d not in splits]
        raise DataError(
            f"folder {root} mixes split folders ({', '.join(d.name for d in splits)}) with other "
            f"folders ({', '.join(others[:5])}); use {root}/<split>/<class>/<image> throughout, or, "
            f"if {splits[0].name!r} is a class, a CSV manifest (path,label).")
    if splits:
        items = []
        for sd in splits:
            items += _class_items(sd, SPLIT_NAMES[sd.name.lower()], ignored)
        _warn_if_splits_disagree(root, items)
        return "split-folders", _once(root, items)
    return "folder", _once(root, _class_items(root, None, ignored))


def _once(root: Path, items: list) -> list:
    """Refuse an image reached twice (a linked folder, a hard link): it would count twice,
    perhaps under two classes or in both train and test. Drops the file identity."""
    first: dict = {}
    for p, c, s, stamp, ident in items:
        if ident in first:
            raise DataError(f"{root}: {p} is the same file as {first[ident]} (a linked folder or "
                            f"file); each image may appear once, or it could count twice or under "
                            f"two classes. Remove the link.")
        first[ident] = p
    return [(p, c, s, stamp) for p, c, s, stamp, _ in items]


def _warn(message: str) -> None:
    import warnings

    from ..errors import DataWarning

    warnings.warn(DataWarning(message), stacklevel=4)


def _warn_if_splits_disagree(root: Path, items) -> None:
    """Say when the split folders do not hold the same classes (a head cannot learn a class
    that has no training images, and a class missing from test is never scored)."""
    by_split: dict = {}
    for _, c, s, *_ in items:
        by_split.setdefault(s, set()).add(c)
    every = set().union(*by_split.values())
    gaps = [f"{sorted(every - have)} not in {s}/" for s, have in sorted(by_split.items())
            if every - have]
    if gaps:
        _warn(f"the split folders of {root} hold different classes: {'; '.join(gaps)}. Heads "
              f"cannot learn a class without training images, and a class without test images "
              f"is never scored; add the missing class folders or remove the extra ones.")


def _class_items(folder: Path, split, ignored: dict):
    items = []
    for cd in _visible_dirs(folder, ignored):
        images = _images_in(cd, ignored)
        if not images:
            raise DataError(f"class folder {cd} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            f"add images or remove the folder.")
        items += [(p, cd.name, split, stamp, ident) for p, stamp, ident in images]
    return items


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
    """:func:`_stamp` of many files, in threads (stat releases the GIL; network disks are slow)."""
    if len(paths) < 256:
        return [_stamp(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(_stamp, paths, chunksize=256))


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
