"""The source contract, checked on every registered source (as scikit-learn's common checks
do for estimators): list, open, fingerprint, describe, path rule, embed."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from featurecache.data import sources
from featurecache.data import SOURCES, Source, open_source, resolve_spec, source_class
from featurecache.data.builtin import BuiltinSource
from featurecache.data.dense import DenseSource
from featurecache.data.folders import FolderSource
from featurecache.data.manifest import ManifestSource
from featurecache.data.tar import TarSource
from featurecache.data.urls import UrlFolderSource, UrlManifestSource
from featurecache.errors import DataError


@dataclass
class Example:
    """Data of one source kind: its spec, what each record should be, and how to alter one
    image's bytes (None where the data cannot change)."""

    spec: str
    expected: dict  # id -> (class name, split or None when the source draws it)
    pixels: Callable  # id -> the image as decoded independently, (H, W, 3) uint8
    change: Callable | None = None


def _png(path: Path, seed: int, size=(5, 4)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _by_pil(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _grow(path: str) -> None:
    """Rewrite the image with other (and more) bytes under the same name."""
    _png(Path(path), seed=999, size=(7, 6))


def class_folders(tmp_path: Path) -> Example:
    root, expected = tmp_path / "photos", {}
    for ci, c in enumerate(("cat", "dog")):
        for i in range(4):
            p = root / c / f"{i}.png"
            _png(p, ci * 10 + i)
            expected[str(p)] = (c, None)
    return Example(str(root), expected, _by_pil, _grow)


def split_folders(tmp_path: Path) -> Example:
    root, expected = tmp_path / "split", {}
    for si, s in enumerate(("train", "test")):
        for ci, c in enumerate(("cat", "dog")):
            for i in range(2):
                p = root / s / c / "deep" / f"{i}.png" if i else root / s / c / f"{i}.png"
                _png(p, 100 * si + 10 * ci + i)
                expected[str(p)] = (c, s)
    return Example(str(root), expected, _by_pil, _grow)


def manifest(tmp_path: Path) -> Example:
    folder, expected, lines = tmp_path / "m", {}, ["path,label,split"]
    for i in range(6):
        p = folder / "img" / f"{i}.png"
        _png(p, i)
        label, split = ("ab"[i % 2], ("train", "test", "val")[i // 2])
        written = str(p) if i == 0 else f"img/{i}.png"  # absolute, and relative to the CSV
        lines.append(f"{written},{label},{split}")
        expected[str(p)] = (label, split)
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    return Example(str(folder / "m.csv"), expected, _by_pil, _grow)


def digits(tmp_path: Path) -> Example:
    from sklearn.datasets import load_digits

    d = load_digits()

    def pixels(record_id):  # sklearn's 0..16 values on 0..255, grey as RGB
        grey = np.round(d.images[int(record_id.rsplit("/", 1)[1])] * 255 / 16).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)

    expected = {f"builtin:digits/{i:04d}": (str(t), None) for i, t in enumerate(d.target)}
    return Example("builtin:digits", expected, pixels)


def _tar(path: Path, samples) -> None:
    """A webdataset tar: ``samples`` are ``(key, class name, seed)``, each a KEY.cls and a
    KEY.png member."""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, label, seed in samples:
            png = io.BytesIO()
            size = (5, 4) if seed < 900 else (7, 6)
            Image.fromarray(np.random.default_rng(seed).integers(
                0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(png, format="PNG")
            for name, data in ((f"{key}.cls", label.encode()), (f"{key}.png", png.getvalue())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _tar_pixels(record_id: str) -> np.ndarray:
    import io
    import tarfile

    shard, _, key = record_id.rpartition("#")
    with tarfile.open(shard) as tf:
        return _by_pil(io.BytesIO(tf.extractfile(f"{key}.png").read()))


def _tar_examples(root: Path, names, splits) -> tuple[dict, dict]:
    """Shards ``names`` (with ``splits``) of 2 cats and 2 dogs each, interleaved; the
    expected records in their stream order; and each shard's samples."""
    expected, samples = {}, {}
    for si, (name, split) in enumerate(zip(names, splits)):
        shard = root / name
        samples[shard] = [(f"img/{si}_{i}", ("cat", "dog")[i % 2], 10 * si + i) for i in range(4)]
        _tar(shard, samples[shard])
        expected.update({f"{shard}#{k}": (c, split) for k, c, _ in samples[shard]})
    return expected, samples


def _tar_changer(samples: dict):
    def change(record_id):  # the shard rewritten with other (and more) bytes for one image
        shard, _, key = record_id.rpartition("#")
        _tar(Path(shard), [(k, c, 999 if k == key else seed)
                           for k, c, seed in samples[Path(shard)]])
    return change


def tar_shards(tmp_path: Path) -> Example:
    names = ["train-0000.tar", "train-0001.tar", "test-0000.tar", "test-0001.tar"]
    expected, samples = _tar_examples(tmp_path / "shards", names, ["train"] * 2 + ["test"] * 2)
    return Example(str(tmp_path / "shards" / "{train,test}-{0000..0001}.tar"), expected,
                   _tar_pixels, _tar_changer(samples))


def tar_list(tmp_path: Path) -> Example:
    """Two shards without a split in their names, joined by '::' (a list in Python)."""
    names = ["a/part-0.tar", "b/part-1.tar"]
    expected, samples = _tar_examples(tmp_path, names, [None, None])
    return Example("::".join(str(tmp_path / n) for n in names), expected, _tar_pixels,
                   _tar_changer(samples))


def _local(url: str) -> str:
    return url[len("file://"):]


def folder_url(tmp_path: Path) -> Example:
    """Class folders at a URL (``file://``: the fsspec path of every store, without a
    server; tests/test_remote.py runs the same kinds against an S3 server)."""
    ex = class_folders(tmp_path)
    return Example("file://" + ex.spec, {"file://" + k: v for k, v in ex.expected.items()},
                   lambda i: _by_pil(_local(i)), lambda i: _grow(_local(i)))


def manifest_url(tmp_path: Path) -> Example:
    """A manifest at a URL: a row's URL, and paths relative to the manifest's folder URL."""
    folder, expected, lines = tmp_path / "mu", {}, ["path,label,split"]
    for i in range(6):
        p = folder / "img" / f"{i}.png"
        _png(p, 50 + i)
        label, split = ("ab"[i % 2], ("train", "test", "val")[i // 2])
        lines.append(f"{'file://' + str(p) if i == 0 else f'img/{i}.png'},{label},{split}")
        expected["file://" + str(p)] = (label, split)
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    return Example("file://" + str(folder / "m.csv"), expected, lambda i: _by_pil(_local(i)),
                   lambda i: _grow(_local(i)))


def dense_scenes(tmp_path: Path) -> Example:
    """Images with masks per split and classes.txt (the layout of clipart_scenes); every
    record's label is 0 (dense data have no image class): ``background``."""
    root, expected = tmp_path / "scenes", {}
    root.mkdir()
    (root / "classes.txt").write_text("background\nsun\n")
    for split in ("train", "test"):
        for i in range(3):
            p = root / split / "images" / f"s{i}.png"
            _png(p, 70 + i + 10 * (split == "test"))
            (root / split / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.eye(4, 5, dtype=np.uint8)).save(root / split / "masks" / f"s{i}.png")
            expected[str(p)] = ("background", split)
    return Example(str(root), expected, _by_pil, None)  # (a new size: its mask would not fit)


EXAMPLES = {DenseSource: [dense_scenes], FolderSource: [class_folders, split_folders], ManifestSource: [manifest],
            BuiltinSource: [digits], TarSource: [tar_shards, tar_list],
            UrlFolderSource: [folder_url], UrlManifestSource: [manifest_url]}
CASES = [pytest.param(cls, make, id=make.__name__) for cls in SOURCES
         for make in EXAMPLES.get(cls, ())]  # (a kind without one fails the test below)


def test_every_registered_source_is_checked_here():
    assert set(SOURCES) == set(EXAMPLES), "add an example for each registered source kind"
    assert all(issubclass(cls, Source) for cls in SOURCES)


@pytest.mark.parametrize("cls, make", CASES)
def test_source_contract(cls, make, tmp_path, monkeypatch):
    ex = make(tmp_path)
    assert source_class(ex.spec) is cls
    src = open_source(ex.spec)
    assert type(src) is cls

    # records: ids unique and stable, labels and splits as the data say, in the fixed order
    ids = [r.id for r in src.records]
    assert len(set(ids)) == len(ids) and set(ids) == set(ex.expected)
    assert all(r.id == r.path for r in src.records)
    assert len(set(sources.same_ids(ids))) == len(ids)
    again = open_source(ex.spec)
    assert again.records == src.records and again.classes == src.classes
    if cls.dense:  # classes.txt's names, in id order; every record's label 0
        assert src.classes == ["background", "sun"]
    else:
        assert src.classes == sorted({c for c, _ in ex.expected.values()})
    for r in src.records:
        name, split = ex.expected[r.id]
        assert src.classes[r.label] == name
        assert r.split == split if split is not None else r.split in ("train", "test")
    if any(s is None for _, s in ex.expected.values()):
        assert src.split_origin.startswith("seeded(")
        for label in range(len(src.classes)):  # stratified: every class in both splits
            assert {r.split for r in src.records if r.label == label} == {"train", "test"}
    else:
        assert src.split_origin == "given"
    if cls.keeps_order:  # the listing's order (a tar's samples as streamed)
        assert ids == list(ex.expected)
    else:
        assert [(r.split, r.label, r.id) for r in src.records] == \
            sorted((r.split, r.label, r.id) for r in src.records)

    # open: each record as RGB, equal to an independent decode; the dataset gives the same
    for r in src.records:
        img = src.open_record(r)
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), ex.pixels(r.id))
    dense = {"size": 4} if cls.dense else {}  # the input size targets are resized to
    data = src.dataset(src.records[:3], transform=lambda im: np.asarray(im), **dense)
    assert len(data) == 3
    for i in range(3):
        arr, index, reason, *targets = data[i]
        assert index == i and reason is None
        np.testing.assert_array_equal(arr, ex.pixels(src.records[i].id))
        if cls.dense:  # the mask resized (nearest) to the input size, beside the image
            assert targets[0]["mask"].shape == (4, 4) and targets[0]["mask"].dtype == np.uint8

    # fingerprint: stable across listings; changed by one image's bytes
    assert again.fingerprint() == src.fingerprint()
    if ex.change is not None:
        changed = src.records[1].id
        ex.change(changed)
        assert open_source(ex.spec).fingerprint() != src.fingerprint()
        np.testing.assert_array_equal(np.asarray(open_source(ex.spec).open_record(changed)),
                                      ex.pixels(changed))

    # describe: the recorded spec opens the same source from anywhere
    described = src.describe()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    back = open_source(described)
    assert type(back) is cls and back.records == open_source(ex.spec).records
    assert (back.root, back.kind, back.classes) == (src.root, src.kind, src.classes)
    assert back.describe() == described

    # path rule: a spec written in a file in folder BASE, and a relative spec described
    if cls.prefix:
        assert resolve_spec(ex.spec, elsewhere) == ex.spec
    else:
        relative = "::".join(os.path.relpath(p, tmp_path) for p in ex.spec.split("::"))
        assert resolve_spec(relative, tmp_path) == os.path.normpath(ex.spec)
        monkeypatch.chdir(tmp_path)
        rel_src = open_source(relative)
        assert rel_src.describe() == os.path.abspath(ex.spec)
        assert rel_src.fingerprint() == back.fingerprint()


def test_a_part_keeps_its_class_and_reads_its_records(tmp_path):
    src = open_source(split_folders(tmp_path).spec)
    part = src.part_of(1, 2)
    assert type(part) is FolderSource and part.fingerprint() == src.fingerprint()
    assert part.records == src.records[4:] and part.describe() == src.describe()
    assert np.asarray(part.open_record(part.records[0])).shape == (4, 5, 3)


def test_the_same_images_through_a_linked_folder_have_the_same_ids(tmp_path):
    ex = class_folders(tmp_path)
    (tmp_path / "link").symlink_to(ex.spec)
    direct, linked = open_source(ex.spec), open_source(tmp_path / "link")
    assert [r.id for r in direct.records] != [r.id for r in linked.records]
    assert sources.same_ids(r.id for r in direct.records) == \
        sources.same_ids(r.id for r in linked.records)
    assert sources.same_ids(["builtin:digits/0001"]) == ["builtin:digits/0001"]


def test_stored_fingerprints_are_what_they_were(tmp_path):
    """Existing feature files resume: the fingerprint is the one docs/schema.md describes
    (sha256 over the classes and every path, label, split, size and mtime), and
    builtin:digits has the value files made before the source classes hold."""
    assert open_source("builtin:digits").fingerprint() == \
        "d45c7d0446880188f1dab5a9e4698ee3537b9554cdbdbca67bcf3a57868eea1f"
    assert open_source("builtin:digits", max_per_class=2).fingerprint() == \
        "28d2d08b32a2f943a29210f8c92f32a0d33ddfe4eefe42ce4c449ae940137b1c"
    src = open_source(class_folders(tmp_path).spec, seed=3)
    h = hashlib.sha256(json.dumps(["cat", "dog"]).encode())
    for r in src.records:
        st = os.stat(r.path)
        h.update(f"{r.path}\t{r.label}\t{r.split}\t{st.st_size}:{st.st_mtime_ns}\n".encode())
    assert src.fingerprint() == h.hexdigest()


def test_a_spec_no_source_takes_names_every_kind(tmp_path):
    with pytest.raises(DataError, match=r"does not exist; give an image folder, webdataset tar "
                                        r"shards \(train-\{0000\.\.0003\}\.tar\), a CSV manifest "
                                        r"\(path,label\[,split\]\), builtin:digits or a "
                                        r"folder or manifest at a URL \(s3://bucket/photos/\)\.$"):
        open_source(tmp_path / "nothing")
    assert sources.spec_help() == "an image folder, webdataset tar shards " \
                                  "(train-{0000..0003}.tar), a CSV manifest (path,label[,split]), " \
                                  "builtin:digits or a folder or manifest at a URL " \
                                  "(s3://bucket/photos/)"


# -- a kind registered only here, whose records are not files -------------------------------

_IMAGES = {f"mem:colours/{c}{i}": (c, 40 * i + (80 if c == "r" else 0)) for c in "rg"
           for i in range(4)}


class MemorySource(Source):
    """``mem:colours``: images held in memory; ids that no file system knows."""

    prefix = "mem:"
    spec_help = "mem:colours"

    @classmethod
    def list_items(cls, spec):
        from featurecache.data import Listing

        items = [(k, c, None, f"v{v}") for k, (c, v) in _IMAGES.items()]
        items.append(("mem:colours/r-broken", "r", None, "v0"))
        return Listing(spec, "memory", items)

    @classmethod
    def read_id(cls, record_id, exif=True):
        if record_id not in _IMAGES:
            raise DataError(f"{record_id}: not in memory")
        c, v = _IMAGES[record_id]
        return Image.new("RGB", (8, 8), (v, 255 - v, 7) if c == "r" else (7, v, 255 - v))


def test_the_embed_reads_records_through_their_source(tmp_path, monkeypatch, tiny_backbone):
    """A kind registered in one line embeds without any module knowing it: rows, labels,
    a record that cannot be read skipped with its id, and the rebuild command's spec."""
    from featurecache import embed
    from featurecache.store import open_features

    monkeypatch.setattr(sources, "SOURCES", sources.SOURCES + (MemorySource,))
    assert sources.spec_help().endswith(", builtin:digits, a folder or manifest at a URL "
                                        "(s3://bucket/photos/) or mem:colours")
    out = tmp_path / "f.h5"
    r = embed("mem:colours", out, backbone=tiny_backbone, layers=["avgpool"], num_workers=0,
              test_size=0.5, progress=False)
    assert (r.n_rows, r.n_skipped) == (8, 1)
    ff = open_features(out)
    assert sorted(ff.paths()) == sorted(_IMAGES)
    assert ff.provenance["data_kind"] == "memory"
    assert ff.skipped() == [("mem:colours/r-broken", "not in memory")]
    command = shlex.split(ff.provenance["rebuild"])
    src = open_source(command[2], test_size=float(command[command.index("--test-size") + 1]))
    assert src.fingerprint() == ff.provenance["data_fingerprint"]


@pytest.mark.slow
@pytest.mark.parametrize("cls, make", CASES)
def test_the_rebuild_command_opens_the_embedded_data(cls, make, tmp_path, tiny_backbone,
                                                     monkeypatch):
    from featurecache import embed
    from featurecache.store import open_features

    ex = make(tmp_path)
    monkeypatch.chdir(tmp_path)
    spec = ex.spec if cls.prefix else os.path.relpath(ex.spec)
    embed(spec, "f.h5", backbone=tiny_backbone, layers=["avgpool"], num_workers=0,
          max_per_class=2, progress=False)
    prov = open_features("f.h5").provenance
    command = shlex.split(prov["rebuild"])
    assert command[:2] == ["featurecache", "embed"]
    monkeypatch.chdir(tmp_path.parent)
    src = open_source(command[2], max_per_class=int(command[command.index("--max-per-class") + 1]),
                      seed=int(command[command.index("--seed") + 1]),
                      test_size=float(command[command.index("--test-size") + 1]))
    assert type(src) is cls and src.fingerprint() == prov["data_fingerprint"]
    assert (src.root, src.kind) == (prov["data_root"], prov["data_kind"])
