"""The images of a folder tree: class folders (or split/class folders) -> items.

Hidden and system entries (``.DS_Store``, AppleDouble ``._x.jpg``, ``.ipynb_checkpoints``,
``__MACOSX``), files that are not images and names that are not UTF-8 are left out and
counted; folders are followed through links, each image once; each image gets a
``size:mtime_ns`` stamp for the source's fingerprint.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from .base import IMAGE_EXTENSIONS, Listing, Source

__all__ = ["FolderSource", "IMAGE_EXTENSIONS", "SPLIT_NAMES", "folder_items", "is_hidden", "stamp",
           "warn"]

NOT_UTF8 = "files whose names are not UTF-8"
IGNORED_NAMES = ("__MACOSX",)  # folders that archive tools add beside the data
SPLIT_NAMES = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}


class FolderSource(Source):
    """``DATA/<class>/<image>`` (kind ``folder``: a seeded, stratified split is drawn) or
    ``DATA/<split>/<class>/<image>`` (kind ``split-folders``); a record's id is the image's
    absolute path."""

    spec_help = "an image folder"
    example = "photos/"
    takes = Path.is_dir

    @classmethod
    def list_items(cls, spec: str) -> Listing:
        path, ignored = Path(spec), {}
        kind, items = folder_items(path, ignored)
        return Listing(str(path.resolve()), kind, items, ignored)


def stamp(path: str, st=None) -> str:
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
    """The class (or split) folders of ``folder``; files beside them are counted as ignored."""
    out = []
    for d in sorted(folder.iterdir()):
        if is_hidden(d.name):
            _count(ignored, "hidden or system entries")
        elif not d.is_dir():
            _count(ignored, "images outside a class folder" if _is_image(d.name)
                   else "files that are not images")
        elif not _utf8(d.name):
            raise DataError(f"folder name {_shown(str(d))} is not valid UTF-8, and class "
                            f"names are stored as UTF-8; rename the folder.")
        else:
            out.append(d)
    return out


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


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
                    warn(f"{_shown(os.path.join(top, name))}: the file name is not valid UTF-8, "
                          f"and names are stored as UTF-8; such files are left out (rename them).")
                _count(ignored, NOT_UTF8)
            elif not _is_image(name):
                _count(ignored, "files that are not images")
            else:
                p = os.path.abspath(os.path.join(top, name))
                st = _stat(p)
                found.append((p, stamp(p, st), (st.st_dev, st.st_ino) if st else p))
    return sorted(found)


def folder_items(root: Path, ignored: dict):
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
            items += _class_items(_visible_dirs(sd, ignored), SPLIT_NAMES[sd.name.lower()], ignored)
        _warn_if_splits_disagree(root, items)
        return "split-folders", _once(root, items)
    return "folder", _once(root, _class_items(dirs, None, ignored))


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


def warn(message: str) -> None:
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
        warn(f"the split folders of {root} hold different classes: {'; '.join(gaps)}. Heads "
              f"cannot learn a class without training images, and a class without test images "
              f"is never scored; add the missing class folders or remove the extra ones.")


def _class_items(class_dirs: list, split, ignored: dict):
    items = []
    for cd in class_dirs:
        images = _images_in(cd, ignored)
        if not images:
            raise DataError(f"class folder {cd} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            f"add images or remove the folder.")
        items += [(p, cd.name, split, stamp, ident) for p, stamp, ident in images]
    return items
