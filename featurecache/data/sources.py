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
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

__all__ = ["Record", "Source", "open_source", "shard_range", "BUILTINS", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLIT_NAMES = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}
BUILTINS = ("digits",)


@dataclass(frozen=True)
class Record:
    """One input image: where it is, its class index and its split."""

    path: str
    label: int
    split: str


@dataclass
class Source:
    """A resolved data set: its classes and its records, in a fixed order."""

    root: str
    kind: str             # folder | split-folders | manifest | builtin
    classes: list
    records: list
    split_origin: str     # given | seeded(test_size=..., seed=...)

    def fingerprint(self) -> str:
        """sha256 over classes and every (path, label, split): changes when the data set does."""
        h = hashlib.sha256(json.dumps(self.classes).encode())
        for r in self.records:
            h.update(f"{r.path}\t{r.label}\t{r.split}\n".encode())
        return h.hexdigest()


def shard_range(n: int, index: int, count: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of shard ``index`` of ``count`` (contiguous, near-equal sizes)."""
    if count < 1 or not 0 <= index < count:
        raise DataError(f"shard {index} of {count} is not valid; need 0 <= index < count.")
    return n * index // count, n * (index + 1) // count


def open_source(spec, test_size: float = 0.3, seed: int = 0,
                max_per_class: int | None = None) -> Source:
    """Resolve ``spec`` (a folder, a ``.csv`` manifest, or ``builtin:NAME``) into records.

    Args:
        test_size: share of each class put in ``test`` when the source gives no split.
        seed: seed of that split.
        max_per_class: keep at most this many images per class and split (first in path
            order): a quick subset for demos and tests.

    Raises:
        DataError: the source is missing, empty, has a class without images, or a bad manifest.
    """
    spec = str(spec)
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
        if path.is_file():
            kind, items = "manifest", _manifest_items(path)
        else:
            kind, items = _folder_items(path)
    if not items:
        raise DataError(f"data source {spec} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    classes = sorted({c for _, c, _ in items})
    given = all(s is not None for _, _, s in items)
    if not given:
        if any(s is not None for _, _, s in items):
            raise DataError(f"data source {spec}: some rows have a split and some do not; "
                            f"give a split for every row or for none.")
        items = _seeded_split(items, test_size, seed, spec)
    index = {c: i for i, c in enumerate(classes)}
    records = sorted((Record(p, index[c], s) for p, c, s in items),
                     key=lambda r: (r.split, r.label, r.path))
    if max_per_class is not None:
        records = _limit(records, max_per_class)
    origin = "given" if given else f"seeded(test_size={test_size}, seed={seed})"
    return Source(root, kind, classes, records, origin)


def _limit(records: list, k: int) -> list:
    kept, seen = [], {}
    for r in records:
        key = (r.split, r.label)
        if seen.get(key, 0) < k:
            seen[key] = seen.get(key, 0) + 1
            kept.append(r)
    return kept


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _folder_items(root: Path):
    dirs = _class_dirs(root)
    if not dirs:
        raise DataError(f"folder {root} has no class subfolders; lay it out as "
                        f"{root}/<class>/<image> or {root}/<split>/<class>/<image>.")
    splits = [d for d in dirs if d.name.lower() in SPLIT_NAMES]
    if splits and len(splits) == len(dirs):
        items = []
        for sd in splits:
            items += _class_items(sd, SPLIT_NAMES[sd.name.lower()])
        _warn_if_splits_disagree(root, items)
        return "split-folders", items
    return "folder", _class_items(root, None)


def _warn_if_splits_disagree(root: Path, items) -> None:
    """Say when the split folders do not hold the same classes (a head cannot learn a class
    that has no training images, and a class missing from test is never scored)."""
    import warnings

    from ..errors import DataWarning

    by_split: dict = {}
    for _, c, s in items:
        by_split.setdefault(s, set()).add(c)
    every = set().union(*by_split.values())
    gaps = [f"{sorted(every - have)} not in {s}/" for s, have in sorted(by_split.items())
            if every - have]
    if gaps:
        warnings.warn(DataWarning(
            f"the split folders of {root} hold different classes: {'; '.join(gaps)}. Heads "
            f"cannot learn a class without training images; add the missing class folders or "
            f"remove the extra ones."), stacklevel=3)


def _class_items(folder: Path, split):
    items = []
    for cd in _class_dirs(folder):
        images = _images_in(cd)
        if not images:
            raise DataError(f"class folder {cd} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            f"add images or remove the folder.")
        items += [(str(p.resolve()), cd.name, split) for p in images]
    return items


def _manifest_items(path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"manifest {path} has no rows.")
    cols = set(rows[0])
    if not {"path", "label"} <= cols:
        raise DataError(f"manifest {path} has columns {sorted(cols)}; it needs a header with "
                        f"path,label and optionally split.")
    items = []
    for i, row in enumerate(rows, start=2):
        p = Path(row["path"])
        p = p if p.is_absolute() else (path.parent / p)
        split = (row.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLIT_NAMES:
            raise DataError(f"manifest {path} line {i}: split {row['split']!r} is not one of "
                            f"train, test, val.")
        items.append((str(p.resolve()), str(row["label"]).strip(), SPLIT_NAMES.get(split)))
    return items


def _seeded_split(items, test_size: float, seed: int, spec: str):
    from sklearn.model_selection import train_test_split

    if not 0 < test_size < 1:
        raise DataError(f"test_size == {test_size}, must be between 0 and 1.")
    labels = [c for _, c, _ in items]
    small = sorted({c for c in labels if labels.count(c) < 2})
    if small:
        raise DataError(f"data source {spec}: classes {small} have fewer than 2 images; a "
                        f"stratified train/test split needs at least 2 per class.")
    idx = list(range(len(items)))
    try:
        _, test = train_test_split(idx, test_size=test_size, random_state=seed, stratify=labels)
    except ValueError as exc:
        raise DataError(f"cannot split {spec} with test_size={test_size}: {exc}") from None
    test = set(test)
    return [(p, c, "test" if i in test else "train") for i, (p, c, _) in enumerate(items)]


def _builtin_items(name: str):
    from sklearn.datasets import load_digits

    target = load_digits().target
    return [(f"builtin:{name}/{i:04d}", str(int(t)), None) for i, t in enumerate(target)]
