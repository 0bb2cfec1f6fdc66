"""Dense data: images with segmentation masks and/or COCO boxes -> records and targets.

The layout (the one of ``clipart_scenes`` and of most segmentation sets)::

    SCENES/classes.txt                    line i = the name of class id i (0: background)
    SCENES/<split>/images/<stem>.jpg      any image format
    SCENES/<split>/masks/<stem>.png       optional: one channel, pixel = class id, 255 = ignore
    SCENES/<split>/annotations.json       optional: COCO detection boxes of the split's images

(or ``SCENES/images/`` + ``SCENES/masks/`` without split folders: a seeded train/test split is
drawn). A folder with ``classes.txt`` and ``images/`` folders is recognised as dense data
without a flag. Every image needs its mask (and every mask its image) when a split has
``masks/``; every image named by ``annotations.json`` must exist and its boxes must lie inside
it. Masks are checked when decoded (their size, their class ids), and a bad one stops the
embed with one line naming it: a dense set with one mask wrong is not a set to skip over.

The backbone sees the whole image resized to its input size (no center crop: the mask
describes every pixel); the mask is resized with nearest-neighbour to the same size, and the
boxes are scaled likewise. Both are stored beside the maps (``/targets/mask``,
``/targets/boxes``). A record's label is 0 (dense files have no image class).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import DataError, OptionError, option
from .base import IMAGE_EXTENSIONS, Listing, Record, Source
from .folders import SPLIT_NAMES, is_hidden, stamp

__all__ = ["DenseSource", "DenseDataset", "IGNORE_INDEX", "is_dense_folder", "read_mask",
           "MASK_EXTENSIONS"]

IGNORE_INDEX = 255  # a mask pixel of this value is not scored (the mmseg/torchvision default)
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".gif")
FATAL = "fatal"  # a dataset item's fourth field for a bad target: the embed stops


def _split_dirs(root: Path) -> list:
    """``(split, folder)`` of the split folders with an ``images/`` folder, or the root itself
    (split None) when it has ``images/``."""
    if (root / "images").is_dir():
        return [(None, root)]
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not is_hidden(d.name) and d.name.lower() in SPLIT_NAMES \
                and (d / "images").is_dir():
            out.append((SPLIT_NAMES[d.name.lower()], d))
    return out


def is_dense_folder(path: Path) -> bool:
    """A folder laid out as dense data: ``classes.txt`` and ``images/`` (per split or at the
    top)."""
    try:
        return path.is_dir() and (path / "classes.txt").is_file() and bool(_split_dirs(path))
    except OSError:
        return False


@dataclass
class DenseSource(Source):
    """Images with masks and/or boxes (kind ``dense``); see the module's docstring."""

    masks: dict = field(default_factory=dict, repr=False, compare=False)  # image id -> mask path
    boxes: dict = field(default_factory=dict, repr=False, compare=False)  # image id -> JSON
    # boxes as COCO gives them, with the image's size: [[W, H], [[class, x, y, w, h], ...]]
    ignore_index: int = IGNORE_INDEX

    spec_help = ""  # said by the folder kind's help ("an image folder")
    example = "scenes/"
    takes = staticmethod(is_dense_folder)
    dense: ClassVar[bool] = True

    @property
    def target_kinds(self) -> list:
        """The targets this data set gives: ``mask`` and/or ``boxes``."""
        return [k for k, have in (("mask", self.masks), ("boxes", self.boxes)) if have]

    @classmethod
    def list_items(cls, spec: str) -> Listing:
        root = Path(spec)
        classes = _read_classes(root / "classes.txt")
        items, masks, boxes, ignored = [], {}, {}, {}
        splits = _split_dirs(root)
        kinds = {}
        for split, folder in splits:
            images = _files(folder / "images", IMAGE_EXTENSIONS, ignored)
            if not images:
                raise DataError(f"{folder / 'images'} holds no images "
                                f"({', '.join(IMAGE_EXTENSIONS)}).")
            have = []
            if (folder / "masks").is_dir():
                have.append("masks")
                masks.update(_pair_masks(folder, images, ignored))
            if (folder / "annotations.json").is_file():
                have.append("annotations.json")
                boxes.update(_coco_boxes(folder, images, classes))
            kinds[folder] = have
            for p in images.values():
                items.append((p, split))
        named = {tuple(v) for v in kinds.values()}
        if named == {()}:
            raise DataError(f"{root} has images but no masks/ folder and no annotations.json "
                            f"in {', '.join(str(f) for f in kinds)}; a dense data set needs "
                            f"masks (segmentation) or COCO boxes (detection).")
        if len(named) > 1:
            raise DataError(f"the splits of {root} give different targets ("
                            + "; ".join(f"{f.name}/: {', '.join(v) or 'none'}"
                                        for f, v in kinds.items())
                            + "); give every split the same (masks/ and/or annotations.json).")
        out = []
        for p, split in items:
            st = stamp(p)
            if p in masks:
                st += "|" + stamp(masks[p])
            if p in boxes:
                st += "|" + hashlib.sha256(boxes[p].encode()).hexdigest()[:16]
            out.append((p, split, st))
        listing = Listing(str(root.resolve()), "dense", out, ignored)
        listing.classes, listing.masks, listing.boxes = classes, masks, boxes
        return listing

    @classmethod
    def open(cls, spec, test_size: float = 0.3, seed: int = 0,
             max_per_class: int | None = None, storage_options: dict | None = None,
             label_field: str | None = None) -> "DenseSource":
        """List a dense folder. ``max_per_class`` keeps at most that many images per split
        (dense images have no class); without split folders a seeded, unstratified split
        with ``test_size`` is drawn."""
        spec = str(spec)
        if label_field:
            raise OptionError(f"{option('label_field', label_field)} is for tar shards; {spec} "
                              f"is a dense folder (its targets are masks and boxes): drop it.")
        listing = cls.list_items(spec)
        items = listing.items
        given = all(s is not None for _, s, _ in items)
        if not given:
            if not 0 < test_size < 1:
                raise DataError(f"test_size == {test_size}, must be between 0 and 1.")
            order = np.random.RandomState(seed).permutation(len(items))
            n_test = max(1, int(round(test_size * len(items))))
            test = set(order[:n_test].tolist())
            items = [(p, "test" if i in test else "train", st) for i, (p, _, st) in enumerate(items)]
        records = sorted((Record(p, 0, s, st) for p, s, st in items),
                         key=lambda r: (r.split, r.path))
        if max_per_class is not None:  # the first images of each split (in name order)
            by_split: dict = {}
            for r in records:
                by_split.setdefault(r.split, []).append(r)
            records = [r for rs in by_split.values() for r in rs[:max_per_class]]
        origin = "given" if given else f"seeded(test_size={test_size}, seed={seed})"
        keep = {r.path for r in records}
        return cls(listing.root, "dense", listing.classes, records, origin, listing.ignored,
                   spec=spec, masks={k: v for k, v in listing.masks.items() if k in keep},
                   boxes={k: v for k, v in listing.boxes.items() if k in keep})

    def target_specs(self, size: int) -> list:
        """The stored targets' :class:`~featurecache.store.LayerSpec`: ``mask`` (uint8
        ``size x size``) and/or ``boxes`` (a JSON string per row)."""
        from ..store.layout import LayerSpec

        out = []
        if self.masks:
            out.append(LayerSpec("mask", "", "mask", "target", size * size, -1, (size, size), 1))
        if self.boxes:
            out.append(LayerSpec("boxes", "", "boxes", "target", 1, -1, (), 0))
        return out

    def dataset(self, records, transform, exif: bool = True, size: int | None = None):
        """Items ``(image tensor, i, None, {"mask": (S, S) uint8, "boxes": JSON})``; an
        unreadable image gives ``(None, i, reason, None)``, a bad mask or box
        ``(None, i, reason, "fatal")`` (the embed stops, naming it)."""
        size = size or _size_of(transform)
        return DenseDataset(records, transform, exif, self.reader(), size, len(self.classes),
                            self.ignore_index,
                            {r.path: self.masks[r.path] for r in records if r.path in self.masks},
                            {r.path: self.boxes[r.path] for r in records if r.path in self.boxes})

    def summary(self) -> str:
        n = {s: sum(r.split == s for r in self.records) for s in ("train", "val", "test")}
        splits = " / ".join(f"{s} {v:,}" for s, v in n.items() if v)
        what = " and ".join({"mask": "masks", "boxes": "boxes"}[k] for k in self.target_kinds)
        return (f"{len(self.records):,} dense images with {what} ({splits}), "
                f"{len(self.classes)} classes from {self.root}")


def _size_of(transform) -> int:
    """The input size a whole-image transform resizes to."""
    for t in getattr(transform, "transforms", []):
        size = getattr(t, "size", None)
        if size is not None:
            return int(size[0] if isinstance(size, (tuple, list)) else size)
    raise ValueError("the transform has no Resize")


def _read_classes(path: Path) -> list:
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} ({exc}); it lists the class names, one per "
                        f"line (line i = class id i).") from None
    while names and not names[-1]:
        names.pop()
    empty = [i for i, n in enumerate(names) if not n]
    if empty or len(names) < 2 or len(set(names)) < len(names):
        why = (f"line {empty[0] + 1} is empty" if empty else
               "it names fewer than two classes" if len(names) < 2 else
               "a name appears twice")
        raise DataError(f"{path}: {why}; write one class name per line, line i = class id i "
                        f"(0 = background), each once.")
    if len(names) > IGNORE_INDEX:
        raise DataError(f"{path} names {len(names)} classes; masks hold 8-bit ids with "
                        f"{IGNORE_INDEX} = ignore, so at most {IGNORE_INDEX} classes.")
    return names


def _files(folder: Path, extensions, ignored: dict) -> dict:
    """``{stem: absolute path}`` of the files with these endings in ``folder``."""
    out = {}
    for p in sorted(folder.iterdir()):
        if is_hidden(p.name):
            ignored["hidden or system entries"] = ignored.get("hidden or system entries", 0) + 1
        elif p.is_file() and p.suffix.lower() in extensions:
            if p.stem in out:
                raise DataError(f"{folder} holds two files named {p.stem} ({Path(out[p.stem]).name}"
                                f", {p.name}); a mask is matched to its image by the name "
                                f"without its ending, so each name may appear once.")
            out[p.stem] = os.path.abspath(p)
        elif p.is_file():
            ignored["files that are not images"] = ignored.get("files that are not images", 0) + 1
    return out


def _pair_masks(folder: Path, images: dict, ignored: dict) -> dict:
    masks = _files(folder / "masks", MASK_EXTENSIONS, ignored)
    lonely = sorted(set(images) - set(masks))
    extra = sorted(set(masks) - set(images))
    if lonely:
        raise DataError(f"{len(lonely)} image(s) in {folder / 'images'} have no mask in "
                        f"{folder / 'masks'} (e.g. {Path(images[lonely[0]]).name}: no "
                        f"{lonely[0]}.png); every image needs its mask, with the same name.")
    if extra:
        raise DataError(f"{len(extra)} mask(s) in {folder / 'masks'} have no image in "
                        f"{folder / 'images'} (e.g. {Path(masks[extra[0]]).name}); remove them "
                        f"or add the images.")
    return {images[s]: masks[s] for s in images}


def _coco_boxes(folder: Path, images: dict, classes: list) -> dict:
    """``{image path: JSON [[W, H], [[class, x, y, w, h], ...]]}`` from a COCO file; refuses
    images it names that do not exist, categories not in classes.txt, boxes outside."""
    path = folder / "annotations.json"
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
        entries, anns, cats = coco["images"], coco.get("annotations", []), coco["categories"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a COCO detection file ({type(exc).__name__}: {exc}); it "
                        f"needs 'images', 'annotations' and 'categories'.") from None
    index = {c: i for i, c in enumerate(classes)}
    cat = {}
    for c in cats:
        if c.get("name") not in index:
            raise DataError(f"{path}: category {c.get('name')!r} (id {c.get('id')}) is not in "
                            f"classes.txt ({', '.join(classes[:6])}...); name it there.")
        cat[c["id"]] = index[c["name"]]
    by_file = {}
    for e in entries:
        stem = Path(str(e.get("file_name", ""))).stem
        if stem not in images:
            raise DataError(f"{path} names image {e.get('file_name')!r} (id {e.get('id')}), which "
                            f"is not in {folder / 'images'}; remove its entry or add the image.")
        by_file[e["id"]] = (stem, int(e["width"]), int(e["height"]))
    boxes = {s: [] for s, _, _ in by_file.values()}
    for a in anns:
        if a.get("image_id") not in by_file:
            raise DataError(f"{path}: annotation {a.get('id')} points to image id "
                            f"{a.get('image_id')}, which the file does not list.")
        if a.get("category_id") not in cat:
            raise DataError(f"{path}: annotation {a.get('id')} has category "
                            f"{a.get('category_id')}, which 'categories' does not list.")
        stem, w, h = by_file[a["image_id"]]
        x, y, bw, bh = (float(v) for v in a["bbox"])
        if bw <= 0 or bh <= 0 or x < -0.5 or y < -0.5 or x + bw > w + 0.5 or y + bh > h + 0.5:
            raise DataError(f"{path}: box {a['bbox']} of annotation {a.get('id')} "
                            f"({Path(images[stem]).name}, {w}x{h}) lies outside the image or is "
                            f"empty; boxes are [x, y, width, height] inside the image.")
        boxes[stem].append([cat[a["category_id"]], x, y, bw, bh])
    sizes = {s: (w, h) for s, w, h in by_file.values()}
    missing = sorted(set(images) - set(boxes))
    if missing:
        raise DataError(f"{len(missing)} image(s) in {folder / 'images'} are not in {path} "
                        f"(e.g. {Path(images[missing[0]]).name}); list every image under "
                        f"'images' (with no annotations if it shows no object).")
    return {images[s]: json.dumps([list(sizes[s]), b]) for s, b in boxes.items()}


def read_mask(path: str):
    """A mask file as a one-channel PIL image of class ids (mode ``L``, or ``P``: palette
    indices are the ids), or a :class:`DataError` naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as m:
            m.load()
            if m.mode == "P":
                return m.copy()
            if m.mode in ("L", "I", "I;16", "I;16B", "I;16L"):
                arr = np.asarray(m)
                if arr.max(initial=0) > 255:
                    raise DataError(f"{path}: mask values reach {int(arr.max())}; class ids "
                                    f"are 0..254 with {IGNORE_INDEX} = ignore")
                return Image.fromarray(arr.astype(np.uint8), mode="L")
            raise DataError(f"{path}: a {m.mode} image, not a mask; a mask has one channel "
                            f"whose value is the class id (mode L or a palette image)")
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot decode the mask ({type(exc).__name__}: {exc})") from None


class DenseDataset:
    """The torch dataset of a dense source's records (see :meth:`DenseSource.dataset`)."""

    def __init__(self, records, transform, exif, read, size: int, n_classes: int, ignore: int,
                 masks: dict, boxes: dict):
        self.records, self.transform, self.exif, self.read = records, transform, exif, read
        self.size, self.n_classes, self.ignore = size, n_classes, ignore
        self.masks, self.boxes = masks, boxes

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        path = self.records[i].path
        try:
            img = self.read(path, self.exif)
        except DataError as exc:
            reason = str(exc)
            return None, i, reason[len(path) + 2:] if reason.startswith(path + ": ") else reason, None
        try:
            targets = {}
            if path in self.masks:
                targets["mask"] = self._mask(self.masks[path], img.size)
            if path in self.boxes:
                targets["boxes"] = self._boxes(self.boxes[path], img.size, path)
        except DataError as exc:
            return None, i, str(exc), FATAL
        return self.transform(img), i, None, targets

    def _mask(self, mpath: str, size: tuple) -> np.ndarray:
        from PIL import Image

        from .decode import _bound_aspect

        m = read_mask(mpath)
        if _bound_aspect(m).size != size:
            raise DataError(f"{mpath}: the mask is {m.size[0]}x{m.size[1]}, its image "
                            f"{size[0]}x{size[1]}; a mask has its image's size")
        arr = np.asarray(_bound_aspect(m).resize((self.size, self.size), Image.NEAREST))
        bad = np.unique(arr[(arr >= self.n_classes) & (arr != self.ignore)])
        if bad.size:
            raise DataError(f"{mpath}: class id{'s' * (bad.size > 1)} "
                            f"{', '.join(map(str, bad[:5].tolist()))} not in classes.txt "
                            f"(ids 0..{self.n_classes - 1}, {self.ignore} = ignore)")
        return np.ascontiguousarray(arr, dtype=np.uint8)

    def _boxes(self, text: str, size: tuple, path: str) -> str:
        (w, h), boxes = json.loads(text)
        if (w, h) != tuple(size):
            raise DataError(f"{path}: annotations.json gives it {w}x{h}, the image is "
                            f"{size[0]}x{size[1]}; fix the entry's width and height")
        sx, sy = self.size / w, self.size / h
        return json.dumps([[c, round(x * sx, 3), round(y * sy, 3), round(bw * sx, 3),
                            round(bh * sy, 3)] for c, x, y, bw, bh in boxes])
