"""Data intake (issue 13): real-world folders and manifests, bounded work per image, checks
before any work, and what the embed tells the user."""

import os
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from featurecache import embed, open_features
from featurecache.data import load_image, open_source
from featurecache.data.sources import _seeded_split
from featurecache.errors import DataError, PipelineError, StoreMismatchError

from .conftest import forward_fails_at, make_image


def _halves(width=40, height=20):
    """Left half red, right half blue: its orientation is visible in the pixels."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (230, 20, 20)
    arr[:, width // 2:] = (20, 20, 230)
    return arr


def test_exif_orientation_is_applied_and_part_of_the_preprocessing(tmp_path, tiny_backbone):
    import dataclasses

    arr = _halves()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(arr).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    upright = np.asarray(load_image(str(tmp_path / "phone.jpg")), dtype=float)
    expected = np.rot90(arr, k=-1).astype(float)  # numpy's own clockwise rotation
    assert upright.shape == expected.shape == (40, 20, 3)
    assert np.abs(upright - expected).mean() < 6  # JPEG noise only
    raw = np.asarray(load_image(str(tmp_path / "phone.jpg"), exif=False), dtype=float)
    assert raw.shape == (20, 40, 3)
    # a file embedded without EXIF orientation is not resumed with upright rows mixed in
    root = tmp_path / "data"
    for ci, c in enumerate(["a", "b"]):
        (root / c).mkdir(parents=True)
        for i in range(3):
            make_image(root / c / f"{i}.png", (200 * ci, 50, 50), ci * 10 + i)
    old = dataclasses.replace(tiny_backbone, preprocess=dataclasses.replace(
        tiny_backbone.preprocess, exif=False))
    out = tmp_path / "f.h5"
    embed(root, out, backbone=old, layers=["avgpool"], num_workers=0, progress=False)
    assert open_features(out).provenance["preprocess"]["exif"] is False
    with pytest.raises(StoreMismatchError, match="preprocess"):
        embed(root, out, backbone=tiny_backbone, layers=["avgpool"], num_workers=0,
              progress=False)
    from featurecache.backbones import Preprocess

    legacy = {k: v for k, v in tiny_backbone.preprocess.to_dict().items() if k != "exif"}
    assert Preprocess.from_dict(legacy).exif is False  # files and heads made before it


def test_stray_entries_are_ignored_and_counted_and_broken_links_are_skipped(tmp_path, tiny_backbone):
    root = tmp_path / "unzipped"
    for split in ("train", "test"):
        for ci, c in enumerate(["cat", "dog"]):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                make_image(root / split / c / f"{c}{i}.png", (200 * ci, 80, 80), ci * 10 + i)
            (root / split / c / f"._{c}0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / "__MACOSX" / "train" / "cat").mkdir(parents=True)
    (root / "__MACOSX" / "train" / "cat" / "._cat0.png").write_bytes(b"\x00\x05\x16\x07")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "dog" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "dog" / ".ipynb_checkpoints" / "dog0-checkpoint.png").write_bytes(b"x")
    (root / "train" / "dog" / "notes.txt").write_text("labels checked")
    os.symlink(tmp_path / "gone.png", root / "train" / "dog" / "dog9.png")
    src = open_source(root)
    assert src.kind == "split-folders" and src.classes == ["cat", "dog"]
    assert len(src.records) == 13  # 12 images + the broken link
    assert not any("._" in r.path or "MACOSX" in r.path or "checkpoint" in r.path
                   for r in src.records)
    assert src.ignored == {"hidden or system entries": 7, "files that are not images": 1}
    out = tmp_path / "f.h5"
    r = embed(root, out, backbone=tiny_backbone, layers=["avgpool"], num_workers=0,
              progress=False)
    assert r.n_rows == 12 and r.n_skipped == 1 and sum(r.ignored.values()) == 8
    (path, reason), = open_features(out).skipped()
    assert path.endswith("dog9.png") and "broken symbolic link" in reason and "gone.png" in reason


def test_files_beside_the_class_folders_are_counted_once(tmp_path):
    """An image left in DATA itself is not an input (it has no class): say so in the count.
    Hidden entries at the top of a class-folder tree were counted twice before."""
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(2):
            make_image(tmp_path / c / f"{i}.png", (10, 20, 30), i)
    make_image(tmp_path / "stray.jpg", (1, 2, 3), 0)
    (tmp_path / "README.txt").write_text("two classes")
    (tmp_path / ".git").mkdir()
    src = open_source(tmp_path, test_size=0.5)
    assert len(src.records) == 4
    assert src.ignored == {"hidden or system entries": 1, "files that are not images": 1,
                           "images outside a class folder": 1}
    assert "1 images outside a class folder" in src.summary()


def test_split_folders_beside_class_folders_are_refused(tmp_path):
    for d in ("train/a", "test/a", "extra/a"):
        (tmp_path / d).mkdir(parents=True)
        make_image(tmp_path / d / "0.png", (10, 10, 10), 0)
    with pytest.raises(DataError, match=r"mixes split folders \(test, train\) with other "
                                         r"folders \(extra\)"):
        open_source(tmp_path)


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height (no pixel data needed to be refused)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_work_per_image_is_bounded(tmp_path):
    import resource

    line = np.zeros((1, 4000, 3), np.uint8)
    line[0, 1998:2002] = 255  # the centre is white
    Image.fromarray(line).save(tmp_path / "line.png")
    img = load_image(str(tmp_path / "line.png"))
    assert img.size == (4, 1) and np.asarray(img).min() == 255  # the centre, 4:1
    tall = np.zeros((90, 10, 3), np.uint8)
    Image.fromarray(tall).save(tmp_path / "tall.png")
    assert load_image(str(tmp_path / "tall.png")).size == (10, 40)
    ok = np.zeros((40, 10, 3), np.uint8)
    Image.fromarray(ok).save(tmp_path / "ok.png")
    assert load_image(str(tmp_path / "ok.png")).size == (10, 40)  # 4:1 is kept whole
    _png_header_only(tmp_path / "big.png", 12000, 12000)
    _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match=r"big.png: 12000x12000 is 144 megapixels, over the limit "
                                        r"of 100"):
        load_image(str(tmp_path / "big.png"))
    with pytest.raises(DataError, match=r"bomb.png: over the limit of 100 megapixels \(Image "
                                        r"size \(900000000 pixels\)"):
        load_image(str(tmp_path / "bomb.png"))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_the_seeded_split_is_sklearns_and_linear(tmp_path):
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(0)
    labels = [f"c{v}" for v in rng.integers(0, 7, 3000)]
    items = [(f"/x/{i}.png", c, None, "") for i, c in enumerate(labels)]
    got = _seeded_split(items, 0.3, 5, "x")
    _, test = train_test_split(np.arange(3000), test_size=0.3, random_state=5, stratify=labels)
    assert {i for i, it in enumerate(got) if it[2] == "test"} == set(test.tolist())
    big = [(f"/x/{i}.png", f"c{i % 50}", None, "") for i in range(200_000)]
    t = time.perf_counter()
    split = _seeded_split(big, 0.3, 0, "x")
    assert sum(s == "test" for _, _, s, _ in split) == 60_000
    assert time.perf_counter() - t < 30  # the quadratic count took hours at this size


def test_a_rewritten_image_is_noticed_on_resume(image_folder, tiny_backbone, tmp_path):
    out = tmp_path / "f.h5"
    embed(image_folder, out, backbone=tiny_backbone, layers=["avgpool"], num_workers=0,
          progress=False)
    target = image_folder / "red" / "red_0.png"
    make_image(target, (0, 0, 0), seed=99)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(StoreMismatchError, match=r"the images differ \(files added, removed, "
                                                 r"relabelled or rewritten"):
        embed(image_folder, out, backbone=tiny_backbone, layers=["avgpool"], num_workers=0,
              progress=False)


def test_manifests_from_spreadsheets(image_folder, tmp_path):
    red = sorted((image_folder / "red").glob("*.png"))
    blue = sorted((image_folder / "blue").glob("*.png"))
    rows = "".join(f"{p},{c},{s}\r\n" for p, c, s in
                   [(red[0], "red", "train"), (red[1], "red", "test"),
                    (blue[0].relative_to(tmp_path), "blue", "train"), (blue[1], "blue", "Test")])
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbf" + f"Path,Label,Split\r\n{rows}".encode())
    src = open_source(tmp_path / "excel.csv")
    assert src.classes == ["blue", "red"] and len(src.records) == 4
    assert {r.split for r in src.records} == {"train", "test"}
    assert str(blue[0]) in {r.path for r in src.records}  # relative to the manifest's folder
    gone = [tmp_path / f"gone{i}.png" for i in range(7)]
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"{p},red\n" for p in gone)
                                    + f"{red[0]},red\n{blue[0]},blue\n")
    with pytest.raises(DataError, match=r"7 of 9 files do not exist or cannot be read: "
                                        r".*gone0.png, .*gone4.png \.\.\."):
        open_source(tmp_path / "m.csv")


def test_data_that_compare_cannot_use_is_refused_before_any_image_is_decoded(
        image_folder, tmp_path, monkeypatch):
    from featurecache.data import decode
    from featurecache.pipeline import check_pipeline, load_pipeline, run_pipeline

    def never(*a, **k):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(decode, "read_file", never)  # what a file source's records are read with
    for split in ("train",):
        for c in ("a", "b"):
            (tmp_path / "given" / split / c).mkdir(parents=True)
            for i in range(6):
                make_image(tmp_path / "given" / split / c / f"{i}.png", (9, 9, 9), i)
    text = f'output = "{tmp_path / "out"}"\n[data]\nroot = "{tmp_path / "given"}"\n'
    with pytest.raises(PipelineError, match=r"has no test images"):
        run_pipeline(load_pipeline(text=text), progress=False)
    text = f'output = "{tmp_path / "out"}"\n[data]\nroot = "{image_folder}"\n[compare]\ncv = 5\n'
    with pytest.raises(PipelineError, match=r"compare.cv = 5 needs at least 5 training images "
                                            r"per class, but 'blue' has 4"):
        check_pipeline(load_pipeline(text=text))
    with pytest.raises(PipelineError, match=r"compare.cv = 5 needs"):
        run_pipeline(load_pipeline(text=text), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cv_cut_and_no_signal_are_said(tmp_path, tiny_backbone):
    from featurecache.heads import fit_head

    root = tmp_path / "same"
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (32, 32), (120, 120, 120)).save(root / c / f"{i}.png")
    out = tmp_path / "f.h5"
    embed(root, out, backbone=tiny_backbone, layers=["avgpool"], num_workers=0, progress=False)
    with pytest.warns(Warning) as caught:
        head = fit_head(out, "avgpool", "logreg", cv=50, n_jobs=1)
    text = " | ".join(str(w.message) for w in caught)
    assert "cv=50 asked, but the smallest class has 5 training rows: using 5-fold CV" in text
    assert "every hyperparameter tried scored the same CV balanced_accuracy" in text
    assert head.meta["no_signal"] is True
    # the console script shows both, in its own words
    res = subprocess.run([sys.executable, "-m", "featurecache.cli", "fit-head", "logreg", str(out),
                          "--layer", "avgpool", "--cv", "50", "-o", str(tmp_path / "h.joblib"),
                          "-q"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "warning: --cv 50 asked" in res.stderr and "chance level" in res.stderr


def test_the_embed_tells_what_it_does_and_commits_by_time(image_folder, tmp_path, tiny_backbone,
                                                          monkeypatch, capsys):
    from featurecache.store import partial_path

    monkeypatch.chdir(tmp_path)
    with forward_fails_at(4), pytest.raises(RuntimeError):
        embed(os.path.relpath(image_folder), "f.h5", backbone=tiny_backbone, layers=["avgpool"],
              num_workers=0, batch_size=4, commit_rows=10**6, commit_every=1e-9, progress=True)
    err = capsys.readouterr().err
    assert "18 images in 3 classes (train 12 / test 6)" in err and "1 layer: avgpool[1280]" in err
    # one commit per batch (by time), not one for the whole run: three segments of 4 rows
    assert len(list(partial_path(tmp_path / "f.h5").glob("seg-*.h5"))) == 3
    r = embed(os.path.relpath(image_folder), "f.h5", backbone=tiny_backbone, layers=["avgpool"],
              num_workers=0, batch_size=4, commit_every=1e-9, progress=True)
    assert r.resumed_from == 12 and "resuming after 12 of 18 inputs" in capsys.readouterr().err
    rebuild = open_features(tmp_path / "f.h5").provenance["rebuild"]
    assert f"embed {image_folder} -o {tmp_path / 'f.h5'}" in rebuild  # absolute paths


def test_small_files_stay_small(image_folder, tiny_backbone, tmp_path):
    out = tmp_path / "f.h5"
    embed(image_folder, out, backbone=tiny_backbone, layers=["stem", "blocks.5", "head", "avgpool"],
          num_workers=0, progress=False)
    ff = open_features(out)
    payload = ff.n_rows * sum(s.dim for s in ff.layers.values()) * 2
    assert out.stat().st_size < payload + 64 * 1024


def test_pipeline_paths_are_relative_to_the_pipeline_file(image_folder, tmp_path, monkeypatch):
    from featurecache.pipeline import load_pipeline

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "p.toml").write_text(f'output = "runs/x"\n[data]\nroot = "../{image_folder.name}"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    plan = load_pipeline(conf / "p.toml")
    assert plan.output == conf / "runs" / "x"
    assert plan.config["data"]["root"] == str(image_folder)
    plan = load_pipeline(conf / "p.toml", ["data.root=../imgs2", "output=here"])  # --set: from cwd
    assert plan.config["data"]["root"] == "../imgs2" and str(plan.output) == "here"


def test_a_linked_folder_cannot_count_an_image_twice(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(3):
            make_image(tmp_path / "d" / c / f"{i}.png", (90 * i, 20, 20), i)
    os.symlink("../a", tmp_path / "d" / "b" / "alias")
    with pytest.raises(DataError, match=r"b/alias/0.png is the same file as .*a/0.png"):
        open_source(tmp_path / "d")


@pytest.mark.slow
def test_few_shot_sizes_beyond_the_data_are_said(feats_path, tmp_path):
    from featurecache.report import compare

    with pytest.warns(Warning) as caught:
        res = compare(feats_path, tmp_path / "r", heads=["logreg"], shots=[1, 100], repeats=1,
                      n_boot=20, n_jobs=1, progress=False)
    text = " | ".join(str(w.message) for w in caught)
    assert "shots [100]: no class has more than 4 training images" in text
    assert list(res.rows[0]["few_shot"]) == ["1"]


def test_compare_names_an_unfinished_file_as_such(image_folder, tiny_backbone, tmp_path):
    from featurecache.errors import StoreError
    from featurecache.report import compare

    with forward_fails_at(2), pytest.raises(RuntimeError):
        embed(image_folder, tmp_path / "f.h5", backbone=tiny_backbone, layers=["avgpool"],
              num_workers=0, batch_size=4, progress=False)
    with pytest.raises(StoreError, match=r"is unfinished: 4 of 18 inputs embedded"):
        compare(tmp_path / "f.h5", tmp_path / "r", heads=["logreg"], progress=False)
