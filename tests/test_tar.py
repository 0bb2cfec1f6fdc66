"""Webdataset tar shards as a source: a brace pattern of local tars embeds to the rows of
the same images in a folder; splits from the shards' names; labels from KEY.cls; a sample
without a label and a truncated tar skipped with their ids; the fingerprint follows a
rewritten shard; a clustered embed runs one task per tar."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurecache import embed, open_features
from featurecache.data import open_source
from featurecache.data.tar import TarSource, split_of
from featurecache.errors import DataError, DataWarning, FeaturecacheError

from .conftest import COLORS

KW = {"layers": ["avgpool"], "num_workers": 0, "progress": False}


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_tar(path: Path, samples) -> Path:
    """``samples``: ``(key, {extension: bytes})``, written in that order (KEY.cls first, as
    webdataset's writers sort a sample's members)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                _member(tf, f"{key}.{ext}", data)
    return path


def image_bytes(color, seed: int, fmt: str = "png") -> bytes:
    """The bytes of a tiny image drawn as conftest.make_image draws it."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt.upper())
    return buf.getvalue()


def split_folder_and_tars(root, per_class: int = 6):
    """The same 3 x ``per_class`` colour images as a split folder ``root/folder``
    (<split>/<class>/<image>; the first 2 of each class in test) and as 4 tar shards
    ``root/shards/{test,train}-{0000..0001}.tar`` whose samples come in the folder's row order
    (split, class, name), each split halved; one image is a JPEG. Returns (folder, the tars)."""
    folder, shards = root / "folder", root / "shards"
    rows = {"test": [], "train": []}
    for ci, (name, color) in enumerate(sorted(COLORS.items())):
        for i in range(per_class):
            split = "test" if i < 2 else "train"
            fmt = "jpg" if (ci, i) == (1, 3) else "png"
            data = image_bytes(color, ci * 100 + i, "jpeg" if fmt == "jpg" else "png")
            path = folder / split / name / f"{name}_{i}.{fmt}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            rows[split].append((f"{name}/{name}_{i}", {"cls": name.encode(), fmt: data}))
    tars = []
    for split, samples in rows.items():
        half = len(samples) // 2
        tars.append(write_tar(shards / f"{split}-0000.tar", samples[:half]))
        tars.append(write_tar(shards / f"{split}-0001.tar", samples[half:]))
    return folder, tars


@pytest.fixture
def same_images(tmp_path):
    """:func:`split_folder_and_tars` of 3 x 6 images. Returns (folder, pattern)."""
    folder, _ = split_folder_and_tars(tmp_path)
    return folder, str(tmp_path / "shards" / "{test,train}-{0000..0001}.tar")


@pytest.mark.slow
def test_a_brace_pattern_of_tars_embeds_as_the_same_images_in_a_folder(same_images, tmp_path,
                                                                      tiny_backbone):
    folder, pattern = same_images
    src = open_source(pattern)
    assert type(src) is TarSource and src.kind == "tar" and src.split_origin == "given"
    assert len(src.records) == 18 and src.natural_shards() == [(0, 3), (3, 6), (6, 12), (12, 18)]
    a, b = tmp_path / "folder.h5", tmp_path / "tars.h5"
    embed(folder, a, backbone=tiny_backbone, **KW)
    r = embed(pattern, b, backbone=tiny_backbone, **KW)
    assert (r.n_rows, r.n_skipped) == (18, 0)
    one, two = open_features(a), open_features(b)
    # the same rows in the same order, paths aside: SHARD#KEY for FOLDER/SPLIT/KEY.EXT
    shards = os.path.dirname(pattern)
    assert [p.split("#")[1] for p in two.paths()] == \
        [os.path.splitext(os.path.relpath(p, folder))[0].split("/", 1)[1] for p in one.paths()]
    assert all(p.startswith(shards + "/") and ".tar#" in p for p in two.paths())
    assert two.classes == one.classes and two.splits() == one.splits()
    np.testing.assert_array_equal(two.y(), one.y())
    np.testing.assert_array_equal(two.X("avgpool"), one.X("avgpool"))
    assert two.provenance["data_kind"] == "tar" and two.provenance["data_root"] == pattern
    assert embed(pattern, b, backbone=tiny_backbone, **KW).already_complete


@pytest.mark.slow
def test_a_resume_mid_shard_reads_on_from_the_committed_rows(same_images, tmp_path,
                                                           tiny_backbone):
    from .conftest import forward_fails_at

    _, pattern = same_images
    out, ref = tmp_path / "f.h5", tmp_path / "ref.h5"
    embed(pattern, ref, backbone=tiny_backbone, batch_size=3, **KW)
    with forward_fails_at(3), pytest.raises(RuntimeError):  # after rows 0..5: mid shard 2
        embed(pattern, out, backbone=tiny_backbone, batch_size=3, commit_rows=1, **KW)
    r = embed(pattern, out, backbone=tiny_backbone, batch_size=3, commit_rows=1, **KW)
    assert r.resumed_from == 6 and r.n_rows == 18
    np.testing.assert_array_equal(open_features(out).X("avgpool"), open_features(ref).X("avgpool"))
    assert open_features(out).paths() == open_features(ref).paths()


def test_splits_from_the_shard_names():
    assert split_of("/d/train-0000.tar") == "train"
    assert split_of("s3://b/shards/test-0001.tar") == "test"
    assert split_of("shards_val_01.tar") == "val"
    assert split_of("/d/VALIDATION.tar") == "val"
    assert split_of("/d/pretrain-0000.tar") is None  # not a word of its own
    assert split_of("/train/part-0000.tar") is None  # the shard's name, not its folder
    assert split_of("data-0000.tar") is None


def test_shards_without_a_split_word_get_the_seeded_split(tmp_path):
    for n in range(2):
        write_tar(tmp_path / f"part-{n}.tar",
                  [(f"{c}{i}", {"cls": c.encode(), "png": image_bytes(COLORS["red"], n * 10 + i)})
                   for c in "ab" for i in range(4)])
    src = open_source([tmp_path / "part-0.tar", tmp_path / "part-1.tar"], seed=3)
    assert src.split_origin == "seeded(test_size=0.3, seed=3)"
    assert src.spec == f"{tmp_path}/part-0.tar::{tmp_path}/part-1.tar"
    assert {r.split for r in src.records} == {"train", "test"}
    assert [r.path for r in src.records] == \
        [f"{tmp_path}/part-{n}.tar#{c}{i}" for n in range(2) for c in "ab" for i in range(4)]
    mixed = write_tar(tmp_path / "train-0.tar", [("a9", {"cls": b"a", "png": b"x"})])
    with pytest.raises(DataError, match="some rows have a split and some do not"):
        open_source(f"{tmp_path}/part-{{0..1}}.tar::{mixed}")


def test_an_integer_cls_is_a_class_name(tmp_path):
    samples = [(f"s{i}", {"cls": f"{label}\n".encode(), "png": image_bytes(COLORS["blue"], i)})
               for i, label in enumerate([0, 1, 10, 2, 0, 1, 10, 2])]
    write_tar(tmp_path / "train-0.tar", samples[:4])
    write_tar(tmp_path / "test-0.tar", samples[4:])
    src = open_source(str(tmp_path / "{train,test}-0.tar"))
    assert src.classes == ["0", "1", "10", "2"]  # names, sorted as text
    assert [src.classes[r.label] for r in src.records] == ["0", "1", "10", "2"] * 2


@pytest.mark.slow
def test_a_sample_without_a_label_and_a_truncated_tar_are_skipped_by_id(tmp_path,
                                                                       tiny_backbone):
    def sample(key, c, seed, label=True):
        members = {"cls": c.encode()} if label else {}
        return key, {**members, "png": image_bytes(COLORS[c], seed)}

    good = write_tar(tmp_path / "train-0000.tar", [sample("x/r0", "red", 0), sample(
        "x/nolabel", "red", 1, label=False), sample("x/g0", "green", 2), sample("x/r1", "red", 3)])
    whole = write_tar(tmp_path / "whole.tar", [sample("y/g1", "green", 4), sample("y/r2", "red", 5),
                                               sample("y/g2", "green", 6)])
    raw = whole.read_bytes()
    with tarfile.open(whole) as tf:
        last = tf.getmember("y/g2.png")
    cut = tmp_path / "train-0001.tar"
    cut.write_bytes(raw[:last.offset_data + last.size // 2])  # cut inside the last image
    whole.unlink()
    pattern = str(tmp_path / "train-{0000..0001}.tar")
    with pytest.warns(DataWarning, match=r"1 tar shard truncated: .*train-0001.tar is cut short "
                                         r"after y/g2.png"):
        src = open_source(pattern)
    assert [r.path.split("#")[1] for r in src.records] == \
        ["x/r0", "x/nolabel", "x/g0", "x/r1", "y/g1", "y/r2", "y/g2"]
    assert src.records[1].label == -1 and src.ignored == {"truncated tar shards": 1}
    out = tmp_path / "f.h5"
    with pytest.warns(DataWarning):
        r = embed(pattern, out, backbone=tiny_backbone, **KW)
    assert (r.n_rows, r.n_skipped) == (5, 2)
    ff = open_features(out)
    assert ff.skipped() == [
        (f"{good}#x/nolabel", "the sample has no label (a x/nolabel.cls or x/nolabel.txt member "
                              "with the class name)"),
        (f"{cut}#y/g2", "member y/g2.png is cut short (the tar shard is truncated)")]
    assert f"{good}#x/nolabel" not in ff.paths() and len(ff.paths()) == 5
    with pytest.warns(DataWarning), pytest.raises(DataError, match=rf"^{good}#x/nolabel: the "
                                                  r"sample has no label .*on_error='skip'"):
        embed(pattern, tmp_path / "g.h5", backbone=tiny_backbone, on_error="fail", **KW)


def test_the_fingerprint_follows_a_rewritten_shard(tmp_path):
    def shard(seed):
        return [(f"{c}{i}", {"cls": c.encode(), "png": image_bytes(COLORS["red"], seed + i)})
                for c in "ab" for i in range(3)]

    write_tar(tmp_path / "train-0.tar", shard(0))
    write_tar(tmp_path / "test-0.tar", shard(10))
    pattern = str(tmp_path / "{train,test}-0.tar")
    before = open_source(pattern)
    assert open_source(pattern).fingerprint() == before.fingerprint()
    stamp = before.records[0].stamp
    size = (tmp_path / "train-0.tar").stat().st_size
    assert stamp.startswith(f"{size}:") and stamp.endswith(":a0.png:" + str(
        len(shard(0)[0][1]["png"])))
    write_tar(tmp_path / "test-0.tar", shard(20))  # the same names, other pixels
    after = open_source(pattern)
    assert [r.path for r in after.records] == [r.path for r in before.records]
    assert after.fingerprint() != before.fingerprint()


def test_a_missing_shard_and_a_spec_that_is_not_a_tar(tmp_path):
    write_tar(tmp_path / "train-0.tar", [("a", {"cls": b"a", "png": b"x"})])
    with pytest.raises(DataError, match=r"tar shard .*train-1.tar does not exist"):
        open_source(str(tmp_path / "train-{0..1}.tar"))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match=r"junk.tar is not a tar file"):
        open_source(str(tmp_path / "junk.tar"))


# -- one cluster task per tar shard ----------------------------------------------------------

CLUSTER_KW = {"backbone": "efficientnet_lite0", "layers": ["avgpool"], "batch_size": 2,
              "num_workers": 0, "progress": False}


@pytest.mark.slow
def test_a_clustered_embed_runs_one_task_per_tar(same_images, tmp_path, capfd):
    from featurecache.cluster import shard_paths

    from .test_cluster import assert_as_one_process

    _, pattern = same_images
    ref, out = tmp_path / "one.h5", tmp_path / "cluster.h5"
    embed(pattern, ref, **CLUSTER_KW)
    with pytest.raises(FeaturecacheError, match=r"one shard per tar shard \(4 of them\), not shards=3"):
        embed(pattern, out, cluster="local:2", shards=3, **CLUSTER_KW)
    r = embed(pattern, out, cluster="local:2", **{**CLUSTER_KW, "progress": True})
    assert r.n_rows == 18
    assert "4 shards on 2 workers (local:2): 0 complete, 4 to run" in capfd.readouterr().err
    parts = shard_paths(out, 4)
    shards = [f"{os.path.dirname(pattern)}/{s}-{n:04d}.tar" for s in ("test", "train")
              for n in range(2)]
    for part, shard in zip(parts, shards):  # each output shard holds one input tar, whole
        assert {p.split("#")[0] for p in open_features(part).paths()} == {shard}
    assert_as_one_process(ref, out)
    # a re-run with a shard missing runs that one only; the complete ones are kept
    kept = {p: p.stat().st_mtime_ns for p in parts[1:]}
    parts[0].unlink()
    out.unlink()
    r = embed(pattern, out, cluster="local:2", **{**CLUSTER_KW, "progress": True})
    assert "4 shards on 2 workers (local:2): 3 complete, 1 to run" in capfd.readouterr().err
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert_as_one_process(ref, out)


@pytest.mark.slow
def test_tars_at_urls_stream_each_shard_once(same_images, tmp_path, tiny_backbone, monkeypatch):
    """file:// shards are read as a store's are (fsspec, tar in stream mode): the same rows
    as the local shards, and the embed opens each shard once to list it and once to read it,
    resuming or not."""
    from featurecache.data import remote

    _, pattern = same_images
    opened, open_binary = [], remote.open_binary
    monkeypatch.setattr(remote, "open_binary",
                        lambda url, so=None: opened.append(url) or open_binary(url, so))
    local, url = tmp_path / "local.h5", tmp_path / "url.h5"
    embed(pattern, local, backbone=tiny_backbone, batch_size=4, **KW)
    opened.clear()
    embed("file://" + pattern, url, backbone=tiny_backbone, batch_size=4, **KW)
    shards = [f"file://{os.path.dirname(pattern)}/{s}-{n:04d}.tar" for s in ("test", "train")
              for n in range(2)]
    assert opened == shards + shards  # listed, then read: once each, in order
    one, two = open_features(local), open_features(url)
    assert two.paths() == ["file://" + p for p in one.paths()]
    np.testing.assert_array_equal(two.X("avgpool"), one.X("avgpool"))


def kill_a_worker_mid_tar(pattern, out, sizes, **kw):
    """A clustered embed of ``pattern`` into ``out`` on a fresh LocalCluster of 2 worker
    processes, one of which is SIGKILLed while its task is in the middle of a tar (``sizes``:
    samples per output shard; rows of it committed, rows left). Returns the embed's result
    and whether the rerun of that task kept the committed segments and added after them."""
    import re
    import signal
    import threading
    import time

    from distributed import Client, LocalCluster

    from featurecache.cluster import shard_paths

    parts = shard_paths(out, len(sizes))
    sizes = {p.stem: n for p, n in zip(parts, sizes)}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client:
        pids = client.run(os.getpid)  # worker address -> pid
        done = {}
        run = threading.Thread(target=lambda: done.update(r=embed(
            pattern, out, cluster=cluster.scheduler_address, commit_rows=1, **kw)))
        run.start()
        victim, deadline = None, time.monotonic() + 240
        while victim is None and time.monotonic() < deadline and run.is_alive():
            for worker, keys in client.processing().items():
                for key in keys:
                    stem = re.search(r"part-\d{5}-of-\d{5}", str(key)).group(0)
                    partial = parts[0].parent / f"{stem}.h5.partial"
                    try:
                        segs = {p.name: p.stat().st_ino for p in partial.glob("seg-*.h5")}
                    except FileNotFoundError:
                        continue
                    if 2 <= len(segs) <= sizes[stem] - 2:  # mid-tar: committed rows, and left
                        victim, kept = (worker, partial), segs
            time.sleep(0.02)
        assert victim is not None, "no task was seen in the middle of a tar"
        os.kill(pids[victim[0]], signal.SIGKILL)
        resumed = False
        while run.is_alive():  # the rerun keeps the committed segments and adds after them
            try:
                segs = {p.name: p.stat().st_ino for p in victim[1].glob("seg-*.h5")}
            except FileNotFoundError:
                segs = {}
            resumed |= len(segs) > len(kept) and all(segs.get(n) == i for n, i in kept.items())
            time.sleep(0.02)
        run.join()
    assert "r" in done, "the clustered embed did not finish after a worker was killed"
    assert resumed, f"{victim[1].name} did not resume after its {len(kept)} committed segments"
    return done["r"]


@pytest.mark.slow
def test_a_worker_killed_mid_tar_shard_is_retried_and_resumes(same_images, tmp_path):
    """``--cluster local:2`` over tar shards, a worker SIGKILLed while its task is in the
    middle of a tar (rows of it committed, rows left): Dask runs the task again, which keeps
    the committed segments and reads on after them; the joined file equals a one-process
    embed, one input tar per output shard."""
    from featurecache.cluster import shard_paths

    from .test_cluster import assert_as_one_process

    _, pattern = same_images
    kw = {**CLUSTER_KW, "batch_size": 1}
    ref, out = tmp_path / "one.h5", tmp_path / "cluster.h5"
    embed(pattern, ref, **kw)
    assert kill_a_worker_mid_tar(pattern, out, (3, 3, 6, 6), **kw).n_rows == 18
    shards = [f"{os.path.dirname(pattern)}/{s}-{n:04d}.tar" for s in ("test", "train")
              for n in range(2)]
    for part, shard in zip(shard_paths(out, 4), shards):
        assert {p.split("#")[0] for p in open_features(part).paths()} == {shard}
    assert_as_one_process(ref, out)


@pytest.mark.slow
def test_labels_from_a_field_of_key_json(tmp_path, tiny_backbone):
    """``label_field``: a sample without KEY.cls / KEY.txt takes its label from that field of
    its KEY.json (a string, or an integer as a name); KEY.cls still comes first. The same
    images labelled by JSON embed to the rows of the same images labelled by .cls; a sample
    whose JSON lacks the field is skipped by id, naming it; other kinds refuse the option."""
    import json
    import pickle

    from click.testing import CliRunner

    from featurecache.cli import cli
    from featurecache.errors import OptionError

    def meta(label, **more):
        return json.dumps({"caption": "a photo", "label": label, **more}).encode()

    colours = sorted(COLORS)
    cls_samples, json_samples = [], []
    for n in range(12):
        c = colours[n % 3]
        png = image_bytes(COLORS[c], n)
        cls_samples.append((f"s{n:02d}", {"cls": c.encode(), "png": png}))
        members = {"json": meta(c), "png": png}
        if n == 4:  # a .cls beside the JSON wins over it
            members = {"cls": c.encode(), "json": meta("not-this-one"), "png": png}
        json_samples.append((f"s{n:02d}", members))
    for split, part in (("train", slice(0, 8)), ("test", slice(8, 12))):
        write_tar(tmp_path / "cls" / f"{split}-0.tar", cls_samples[part])
        write_tar(tmp_path / "json" / f"{split}-0.tar", json_samples[part])
    by_cls, by_json = (str(tmp_path / d / "{train,test}-0.tar") for d in ("cls", "json"))

    src = open_source(by_json, label_field="label")
    assert src.label_field == "label" and src.classes == colours
    assert [src.classes[r.label] for r in src.records] == [colours[n % 3] for n in range(12)]
    part = src.part_of(0, 2)  # what a cluster task receives, and its reader, pickled
    assert part.label_field == "label"
    assert pickle.loads(pickle.dumps(part.reader())).label_field == "label"
    with pytest.warns(DataWarning, match=r"^11 tar samples have no label member \(KEY.cls, "
                                         r"KEY.txt\) but a KEY.json: .*--label-field FIELD"), \
            pytest.raises(DataError, match="holds a single class"):  # s04's .cls only
        open_source(by_json)
    a, b = tmp_path / "cls.h5", tmp_path / "json.h5"
    embed(by_cls, a, backbone=tiny_backbone, **KW)
    r = embed(by_json, b, backbone=tiny_backbone, label_field="label", **KW)
    assert (r.n_rows, r.n_skipped) == (12, 0)
    one, two = open_features(a), open_features(b)
    assert [p.split("#")[1] for p in two.paths()] == [p.split("#")[1] for p in one.paths()]
    assert two.classes == one.classes and two.splits() == one.splits()
    np.testing.assert_array_equal(two.y(), one.y())
    np.testing.assert_array_equal(two.X("avgpool"), one.X("avgpool"))
    assert two.provenance["rebuild"].endswith(" --label-field label")
    assert "--label-field" not in one.provenance["rebuild"]

    # an integer is a class name; a JSON without the field, or with a float there, is skipped
    odd = [(f"t{n}", {"json": meta(n % 2), "png": image_bytes(COLORS["red"], 50 + n)})
           for n in range(6)]
    odd += [("t6", {"json": json.dumps({"caption": "no label"}).encode(),
                    "png": image_bytes(COLORS["red"], 56)}),
            ("t7", {"json": meta(1.5), "png": image_bytes(COLORS["red"], 57)})]
    shard = write_tar(tmp_path / "odd" / "train-0.tar", odd)
    write_tar(tmp_path / "odd" / "test-0.tar", [(f"u{n}", {"json": meta(n), "png": image_bytes(
        COLORS["blue"], 60 + n)}) for n in range(2)])
    pattern = str(tmp_path / "odd" / "{train,test}-0.tar")
    assert open_source(pattern, label_field="label").classes == ["0", "1"]
    r = embed(pattern, tmp_path / "odd.h5", backbone=tiny_backbone, label_field="label", **KW)
    assert (r.n_rows, r.n_skipped) == (8, 2)
    why = ("the sample has no label (a {k}.cls or {k}.txt member with the class name, or a "
           "{k}.json object whose field 'label' is a string or an integer)")
    assert open_features(tmp_path / "odd.h5").skipped() == [
        (f"{shard}#t6", why.format(k="t6")), (f"{shard}#t7", why.format(k="t7"))]

    with pytest.raises(OptionError, match=r"label_field='label' names the field of a tar "
                                          r"sample's KEY.json .* is not tar shards"):
        embed(make_folder_of(tmp_path), tmp_path / "f.h5", backbone=tiny_backbone,
              label_field="label", **KW)
    # the CLI's flag and the pipeline's key
    out = tmp_path / "cli.h5"
    res = CliRunner().invoke(cli, ["embed", by_json, "-o", str(out), "--label-field", "label",
                                   "--workers", "0", "-q", "--max-per-class", "1"])
    assert res.exit_code == 0, res.output
    assert open_features(out).n_rows == 6 and " --label-field label" in \
        open_features(out).provenance["rebuild"]
    from featurecache.pipeline import _embed_kwargs, load_pipeline

    plan = load_pipeline(text=f'[data]\nroot = "{by_json}"\nlabel_field = "label"\n')
    assert _embed_kwargs(plan.config)["label_field"] == "label"
    plan = load_pipeline(text='[data]\nroot = "builtin:digits"\n')
    assert _embed_kwargs(plan.config)["label_field"] is None


def make_folder_of(tmp_path):
    from .conftest import make_folder

    return make_folder(tmp_path / "imgs", 2)
