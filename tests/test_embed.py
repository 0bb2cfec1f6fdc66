"""Stage 1 end to end: sources, the HDF5 contract, resume after a crash, bad inputs."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from PIL import Image

from featurecache import embed, open_features
from featurecache.data import open_source, shard_range
from featurecache.errors import DataError, FeaturecacheError, StoreMismatchError
from featurecache.extract import FeatureExtractor
from featurecache.store import partial_path

from .conftest import COLORS, make_image

LAYERS = ["blocks.5", "avgpool"]


def run(src, out, bb, **kw):
    kw = {"layers": LAYERS, "num_workers": 0, "batch_size": 4, "progress": False, **kw}
    return embed(src, out, backbone=bb, **kw)


def assert_same_file(a, b):
    fa, fb = open_features(a), open_features(b)
    assert fa.n_rows == fb.n_rows
    assert fa.paths() == fb.paths() and fa.splits() == fb.splits()
    np.testing.assert_array_equal(fa.y(), fb.y())
    for layer in fa.layers:
        np.testing.assert_allclose(fa.X(layer).astype(np.float32), fb.X(layer).astype(np.float32),
                                   atol=2e-3, rtol=2e-3)
    assert len(set(fa.paths())) == fa.n_rows  # no duplicates


def test_round_trip_and_provenance(image_folder, tiny_backbone, tmp_path):
    out = tmp_path / "f.h5"
    r = run(image_folder, out, tiny_backbone)
    assert (r.n_rows, r.n_skipped, r.already_complete) == (18, 0, False)
    assert not partial_path(out).exists()
    ff = open_features(out)
    assert ff.complete and ff.classes == sorted(COLORS)
    assert list(ff.layers) == ["blocks.5", "avgpool"]  # depth order
    assert ff.X("avgpool").shape == (18, 1280) and ff.X("avgpool").dtype == np.float16
    assert ff.X("blocks.5+avgpool", "test").shape == (ff.splits().count("test"), 80 + 1280)
    # seeded stratified split: 30% of 6 per class -> 2 test images per class
    assert ff.splits().count("test") == 6 and sorted(ff.y("test").tolist()) == [0, 0, 1, 1, 2, 2]
    # labels follow the class folder of each path
    for path, label in zip(ff.paths(), ff.y()):
        assert f"/{ff.classes[label]}/" in path
    # stored values equal a direct forward pass on the same images
    x = np.stack([tiny_backbone.preprocess.transform()(Image.open(p).convert("RGB")).numpy()
                  for p in ff.paths()[:3]])
    import torch

    direct = FeatureExtractor(tiny_backbone.model, r.layers)(torch.from_numpy(x))
    stored = ff.X("avgpool")[:3].astype(np.float32)
    assert np.abs(stored).mean() > 0.05  # real activations, not float16 zeros
    np.testing.assert_allclose(stored, direct["avgpool"].numpy(), rtol=2e-3, atol=1e-3)
    p = ff.provenance
    for key in ("backbone", "weights", "preprocess", "pool", "torch_version", "torchvision_version",
                "featurecache_version", "data_root", "data_fingerprint", "seed", "created",
                "n_committed", "rebuild"):
        assert key in p, key
    assert p["preprocess"]["crop"] == 64 and p["split_origin"].startswith("seeded")


def test_plain_h5py_can_read_the_file(image_folder, tiny_backbone, tmp_path):
    out = tmp_path / "f.h5"
    run(image_folder, out, tiny_backbone, dtype="float32")
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "featurecache" and f.attrs["schema_version"] == 1
        assert f["layers/avgpool"].dtype == np.float32 and f["layers/avgpool"].chunks is not None
        assert f["layers/blocks.5"].attrs["dim"] == 80 and f["layers/blocks.5"].attrs["kind"] == "map"
        assert f["labels"].shape == (18,) and len(f["paths"]) == 18
        assert [c.decode() for c in f["classes"][()]] == ["blue", "green", "red"]
        assert json.loads(f.attrs["layers"]) == LAYERS


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_file(image_folder, tiny_backbone, tmp_path, monkeypatch):
    ref = tmp_path / "ref.h5"
    run(image_folder, ref, tiny_backbone)
    out = tmp_path / "f.h5"
    calls = {"n": 0}
    original = FeatureExtractor.forward

    def crash_after_two(self, images):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("simulated crash")
        return original(self, images)

    monkeypatch.setattr(FeatureExtractor, "forward", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(image_folder, out, tiny_backbone, commit_rows=4)
    assert not out.exists() and partial_path(out).exists()
    part = open_features(out)
    assert not part.complete and part.n_rows == 8
    monkeypatch.setattr(FeatureExtractor, "forward", original)
    r = run(image_folder, out, tiny_backbone, commit_rows=4)
    assert r.resumed_from == 8 and r.n_rows == 18
    assert_same_file(ref, out)


SCRIPT = textwrap.dedent("""
    import dataclasses, sys
    from featurecache import embed, store
    from featurecache.backbones import Preprocess, load_backbone
    commit = store.Writer._commit
    def loud_commit(self):
        commit(self)
        print("committed", self.n_committed, flush=True)
    store.Writer._commit = loud_commit
    bb = load_backbone("efficientnet_lite0")
    bb = dataclasses.replace(bb, preprocess=Preprocess(resize=64, crop=64))
    embed(sys.argv[1], sys.argv[2], backbone=bb, layers=["blocks.5", "avgpool"], num_workers=0,
          batch_size=4, progress=False, commit_rows=4)
""")


@pytest.mark.slow
def test_kill_9_then_rerun_gives_identical_file(tmp_path, tiny_backbone):
    root = tmp_path / "imgs"
    for ci, (name, color) in enumerate(COLORS.items()):
        (root / name).mkdir(parents=True)
        for i in range(20):
            make_image(root / name / f"{i}.png", color, seed=ci * 100 + i)
    ref = tmp_path / "ref.h5"
    run(root, ref, tiny_backbone)
    out = tmp_path / "f.h5"
    (tmp_path / "job.py").write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "job.py"), str(root), str(out)],
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("committed") and int(line.split()[1]) >= 16:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    done = open_features(out).n_rows
    assert 16 <= done < 60
    r = run(root, out, tiny_backbone)
    assert r.resumed_from >= 16 and r.n_rows == 60
    assert_same_file(ref, out)


@pytest.mark.slow
def test_complete_file_is_not_recomputed_and_mismatch_is_refused(image_folder, tiny_backbone, tmp_path):
    out = tmp_path / "f.h5"
    run(image_folder, out, tiny_backbone)
    again = run(image_folder, out, tiny_backbone)
    assert again.already_complete and again.n_rows == 18
    with pytest.raises(StoreMismatchError, match=r"layers: file has \['blocks.5', 'avgpool'\].*overwrite=True"):
        run(image_folder, out, tiny_backbone, layers=["avgpool"])
    with pytest.raises(StoreMismatchError, match="pool"):
        run(image_folder, out, tiny_backbone, pool="max")
    r = run(image_folder, out, tiny_backbone, layers=["avgpool"], overwrite=True)
    assert list(open_features(out).layers) == ["avgpool"] and r.n_rows == 18


@pytest.mark.slow
def test_unreadable_images_are_skipped_and_logged(image_folder, tiny_backbone, tmp_path):
    (image_folder / "red" / "empty.png").write_bytes(b"")
    (image_folder / "red" / "notes.jpg").write_text("this is text, not a jpeg")
    good = image_folder / "green" / "big.jpg"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(good, quality=95)
    data = good.read_bytes()
    (image_folder / "green" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "f.h5"
    r = run(image_folder, out, tiny_backbone)
    assert r.n_skipped == 3 and r.n_rows == 19
    ff = open_features(out)
    skipped = dict(ff.skipped())
    assert {os.path.basename(p) for p in skipped} == {"empty.png", "notes.jpg", "truncated.jpg"}
    assert all(reason.startswith("cannot decode image") for reason in skipped.values())
    assert ff.provenance["n_skipped"] == 3
    # batches holding only unreadable images, committed together with good ones
    one = run(image_folder, tmp_path / "one.h5", tiny_backbone, batch_size=1, commit_rows=64)
    assert (one.n_rows, one.n_skipped) == (19, 3)
    assert open_features(tmp_path / "one.h5").paths() == ff.paths()
    with pytest.raises(DataError, match=r"/(empty\.png|notes\.jpg|truncated\.jpg): cannot "
                                        r"decode image .*on_error='skip'"):
        run(image_folder, tmp_path / "g.h5", tiny_backbone, on_error="fail")


def test_odd_image_modes_are_converted(tmp_path, tiny_backbone):
    root = tmp_path / "modes"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(root / "a" / "cmyk.jpg")
    Image.fromarray(rgb).convert("L").save(root / "a" / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(root / "b" / "rgba.png")
    Image.fromarray((np.arange(400).reshape(20, 20) * 150).astype(np.uint16)).save(root / "b" / "deep.png")
    from featurecache.data import load_image

    deep = np.asarray(load_image(str(root / "b" / "deep.png")))
    assert deep.shape == (20, 20, 3) and 0 < deep.mean() < 255 and deep.max() > 200
    r = run(root, tmp_path / "f.h5", tiny_backbone, test_size=0.5)
    assert (r.n_rows, r.n_skipped) == (4, 0)
    assert np.isfinite(open_features(tmp_path / "f.h5").X("avgpool").astype(np.float32)).all()


def test_split_folders_and_manifest(tmp_path, tiny_backbone):
    root = tmp_path / "split"
    for split, n in (("train", 3), ("test", 2)):
        for ci, (name, color) in enumerate(COLORS.items()):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                make_image(root / split / name / f"{i}.png", color, seed=ci * 10 + i)
    src = open_source(root)
    assert src.kind == "split-folders" and src.split_origin == "given"
    assert [r.split for r in src.records].count("test") == 6
    rows = ["path,label,split"] + [f"{os.path.relpath(r.path, tmp_path)},{src.classes[r.label]},{r.split}"
                                   for r in src.records]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    msrc = open_source(tmp_path / "m.csv")
    assert msrc.kind == "manifest" and msrc.fingerprint() == src.fingerprint()
    r = run(tmp_path / "m.csv", tmp_path / "f.h5", tiny_backbone, layers=["avgpool"])
    assert r.n_rows == 15 and open_features(tmp_path / "f.h5").splits().count("train") == 9


@pytest.mark.slow
def test_shards_are_disjoint_and_cover_everything(image_folder, tiny_backbone, tmp_path):
    paths = []
    for i in range(3):
        out = tmp_path / f"s{i}.h5"
        r = run(image_folder, out, tiny_backbone, shard=(i, 3), layers=["avgpool"])
        ff = open_features(out)
        assert ff.provenance["shard_index"] == i and r.n_rows == 6
        paths += ff.paths()
    assert sorted(paths) == sorted(open_source(image_folder).records and
                                   [r.path for r in open_source(image_folder).records])
    assert shard_range(10, 2, 3) == (6, 10)
    with pytest.raises(DataError, match="shard 3 of 3"):
        shard_range(10, 3, 3)


@pytest.mark.parametrize("setup,match", [
    ("empty", "has no class subfolders"),
    ("empty_csv", "has no rows"),
    ("empty_class", r"class folder .*ghost has no images"),
    ("missing", "does not exist"),
    ("bad_csv", "needs a header with path,label"),
])
def test_bad_sources_fail_before_any_file_is_written(tmp_path, tiny_backbone, image_folder, setup, match):
    src = {"missing": tmp_path / "nowhere"}.get(setup, tmp_path / "src")
    if setup == "empty":
        src.mkdir()
    elif setup == "empty_csv":
        src = tmp_path / "m.csv"
        src.write_text("path,label\n")
    elif setup == "empty_class":
        src = image_folder
        (src / "ghost").mkdir()
    elif setup == "bad_csv":
        src = tmp_path / "m.csv"
        src.write_text("file,class\nx.png,a\n")
    out = tmp_path / "f.h5"
    with pytest.raises(DataError, match=match):
        run(src, out, tiny_backbone)
    assert not out.exists() and not partial_path(out).exists()


def test_output_in_missing_folder(image_folder, tiny_backbone, tmp_path):
    with pytest.raises(FeaturecacheError, match=r"output folder .*nodir does not exist"):
        run(image_folder, tmp_path / "nodir" / "f.h5", tiny_backbone)


def test_builtin_digits_source():
    src = open_source("builtin:digits", max_per_class=5)
    assert src.classes == [str(i) for i in range(10)] and len(src.records) == 100
    from featurecache.data import load_image

    img = load_image(src.records[0].path)
    assert img.mode == "RGB" and img.size == (8, 8)
    with pytest.raises(DataError, match="builtin:digits"):
        open_source("builtin:mnist")


def test_float16_underflow_is_warned(tmp_path, image_folder):
    from featurecache.backbones import Preprocess, load_backbone
    import dataclasses

    bb = load_backbone("efficientnet_b0", weights="none")  # untrained: activations ~1e-14
    bb = dataclasses.replace(bb, preprocess=Preprocess(resize=64, crop=64))
    with pytest.warns(UserWarning, match=r"layer 'avgpool'.*dtype='float32'"):
        run(image_folder, tmp_path / "f.h5", bb, layers=["avgpool"], max_per_class=1)


@pytest.mark.slow
def test_shards_join_into_one_virtual_file(image_folder, tiny_backbone, tmp_path, monkeypatch):
    from featurecache.errors import StoreError
    from featurecache.store import join_shards

    ref = tmp_path / "all.h5"
    run(image_folder, ref, tiny_backbone)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for i in range(3):
        run(image_folder, shard_dir / f"s{i}.h5", tiny_backbone, shard=(i, 3))
    joined = join_shards([shard_dir / f"s{i}.h5" for i in (2, 0, 1)], shard_dir / "joined.h5")
    monkeypatch.chdir(tmp_path)  # the virtual layers find their shards relative to the file
    assert_same_file(ref, joined)
    with h5py.File(joined) as f:
        assert f["layers/avgpool"].is_virtual and f.attrs["joined_from"] == 3
    with pytest.raises(StoreError, match=r"need shards 0..2 exactly once"):
        join_shards([shard_dir / "s0.h5", shard_dir / "s1.h5"], tmp_path / "x.h5")
    run(image_folder, tmp_path / "half.h5", tiny_backbone, shard=(1, 2))
    with pytest.raises(StoreError, match=r"different numbers of shards \(.*s0.h5 is 0/3, "
                                         r".*half.h5 is 1/2\)"):
        join_shards([shard_dir / "s0.h5", tmp_path / "half.h5"], tmp_path / "x.h5")


@pytest.mark.slow
def test_a_rerun_that_assembles_the_final_file_says_so(image_folder, tiny_backbone, tmp_path,
                                                       monkeypatch):
    """Issue 22, item 15: a run killed after its last commit, before the final file was
    assembled: the re-run assembles it and said "already complete; nothing to do"."""
    from featurecache.store.writer import Writer

    out = tmp_path / "f.h5"
    kw = dict(backbone=tiny_backbone, layers=["avgpool"], num_workers=0, progress=False)
    close = Writer.close

    def killed_before_assembly(self, complete=False):
        close(self, complete=False)
        if complete:
            raise RuntimeError("killed before the assembly")

    monkeypatch.setattr(Writer, "close", killed_before_assembly)
    with pytest.raises(RuntimeError, match="before the assembly"):
        embed(image_folder, out, **kw)
    monkeypatch.setattr(Writer, "close", close)
    assert not out.exists()
    r = embed(image_folder, out, **kw)
    assert out.is_file() and not r.already_complete and r.resumed_from == r.n_rows + r.n_skipped
    assert embed(image_folder, out, **kw).already_complete


@pytest.mark.slow  # compiles Lite0 (about a minute on 2 cores)
def test_compiled_embed_stores_the_eager_features_up_to_float16_rounding(image_folder,
                                                                         tiny_backbone, tmp_path):
    """embed --compile: 18 images in batches of 8 (the last one padded, never recompiled),
    every stored value within one float16 step of a plain eager embed's."""
    from featurecache import embed, open_features

    kw = dict(backbone=tiny_backbone, layers=["stem", "blocks.5", "avgpool"], batch_size=8,
              num_workers=0, progress=False)
    embed(image_folder, tmp_path / "eager.h5", **kw)
    embed(image_folder, tmp_path / "compiled.h5", compile=True, **kw)
    a, b = open_features(tmp_path / "eager.h5"), open_features(tmp_path / "compiled.h5")
    assert a.paths() == b.paths() and len(a.paths()) == 18
    for layer in ("stem", "blocks.5", "avgpool"):
        x, y = a.X(layer).astype(np.float32), b.X(layer).astype(np.float32)
        np.testing.assert_allclose(y, x, rtol=2 ** -10, atol=1e-3)
        assert np.abs(x).max() > 0.1  # real activations, not zeros


def test_a_model_that_cannot_be_compiled_is_refused_before_any_file(image_folder,
                                                                    tiny_backbone, tmp_path,
                                                                    monkeypatch):
    import torch

    from featurecache import embed
    from featurecache.errors import OptionError

    def fails(*a, **k):
        raise RuntimeError("Unsupported: an operator inductor has no lowering for\nmore")

    monkeypatch.setattr(torch, "compile", lambda m, **k: fails)
    with pytest.raises(OptionError, match="cannot compile this model .*Unsupported.*without "
                                          "--compile"):
        embed(image_folder, tmp_path / "f.h5", backbone=tiny_backbone, compile=True,
              num_workers=0, progress=False)
    assert list(tmp_path.iterdir()) == [image_folder]
