"""embed --update (issue 24): unchanged rows copied byte for byte, new and changed images
embedded, deleted ones dropped; the result equals a fresh embed of the data as they are now."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from featurecache import embed, open_features
from featurecache.cluster import same_within_rounding
from featurecache.errors import OptionError, StoreError, StoreMismatchError
from featurecache.store import partial_path
from featurecache.update import hashed_split

from .conftest import COLORS, forward_fails_at, make_folder, make_image

LAYERS = ["blocks.5", "avgpool"]


def run(src, out, bb, **kw):
    kw = {"backbone": bb, "layers": LAYERS, "num_workers": 0, "progress": False, **kw}
    return embed(src, out, **kw)


def split_folders(root, n_train=4, n_test=2):
    """DATA/<split>/<class>/*.png: a given split, so a fresh embed splits as the update does."""
    for split, n in (("train", n_train), ("test", n_test)):
        for ci, (name, color) in enumerate(COLORS.items()):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                make_image(root / split / name / f"{i}.png", color, seed=ci * 100 + i + 50 * (split == "test"))
    return root


def rewrite(path, color, seed):
    """New bytes under the same name (and a modification time that surely differs)."""
    st = os.stat(path)
    make_image(path, color, seed=seed, size=40)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def rows(path):
    ff = open_features(path)
    return ff, {p: i for i, p in enumerate(ff.paths())}


def assert_equal_to_fresh(updated, fresh, old, embedded=()):
    """Row for row: same paths in the same order, labels, splits and classes as ``fresh``;
    rows not in ``embedded`` (paths) byte-identical to ``old``'s, the others within float16
    rounding of ``fresh``'s."""
    (u, _), (f, _), (o, at_old) = rows(updated), rows(fresh), rows(old)
    assert u.paths() == f.paths() and u.splits() == f.splits() and u.classes == f.classes
    assert (u.y() == f.y()).all()
    assert u.stamps() == f.stamps()
    for layer in LAYERS:
        X, F, O = u.X(layer), f.X(layer), o.X(layer)
        assert X.dtype == O.dtype == np.float16
        for i, p in enumerate(u.paths()):
            if p in embedded:
                assert same_within_rounding(X[i:i + 1], F[i:i + 1]).all(), (layer, p)
            else:
                assert X[i].tobytes() == O[at_old[p]].tobytes(), (layer, p)  # copied


@pytest.mark.slow
def test_add_remove_change_equal_a_fresh_embed(tmp_path, tiny_backbone):
    root = split_folders(tmp_path / "data")
    out = tmp_path / "f.h5"
    run(root, out, tiny_backbone)
    shutil.copy(out, tmp_path / "old.h5")
    added = [root / "train" / "red" / "new_a.png", root / "test" / "blue" / "new_b.png"]
    make_image(added[0], COLORS["red"], seed=901)
    make_image(added[1], COLORS["blue"], seed=902)
    (root / "train" / "green" / "1.png").unlink()
    changed = root / "train" / "blue" / "2.png"
    rewrite(changed, COLORS["blue"], seed=903)
    seen = []
    r = run(root, out, tiny_backbone, update=True, progress=lambda d, t: seen.append((d, t)))
    assert {k: r.update[k] for k in ("new", "changed", "deleted", "unchanged", "relabelled")} == \
        {"new": 2, "changed": 1, "deleted": 1, "unchanged": 16, "relabelled": 0}
    assert r.update["embedded"] == 3 and r.update["copied"] == 16 and r.n_rows == 19
    assert seen[-1] == (3, 3)  # the progress counts the embedded images only
    run(root, tmp_path / "fresh.h5", tiny_backbone)
    assert_equal_to_fresh(out, tmp_path / "fresh.h5", tmp_path / "old.h5",
                          embedded={str(p) for p in (*added, changed)})
    o, at = rows(tmp_path / "old.h5")
    u, at_u = rows(out)
    assert not np.array_equal(u.X("avgpool")[at_u[str(changed)]], o.X("avgpool")[at[str(changed)]])
    assert not partial_path(out).exists()
    p = u.provenance
    assert p["update"]["new"] == 2 and p["update_of"] == o.provenance["creation_id"]
    assert p["data_fingerprint"] == open_features(tmp_path / "fresh.h5").provenance["data_fingerprint"]
    # up to date now: nothing is written, and a plain embed finds the file complete
    again = run(root, out, tiny_backbone, update=True)
    assert again.already_complete and again.update["unchanged"] == 19
    assert run(root, out, tiny_backbone).already_complete


@pytest.mark.slow
def test_relabel_in_a_manifest_is_copied_with_its_new_label(tmp_path, tiny_backbone):
    root = make_folder(tmp_path / "imgs", 5)
    images = sorted(root.rglob("*.png"))
    manifest = tmp_path / "m.csv"

    def write(relabel=None):
        lines = ["path,label,split"]
        for i, p in enumerate(images):
            label = "green" if p == relabel else p.parent.name
            lines.append(f"{p},{label},{'test' if i % 3 == 0 else 'train'}")
        manifest.write_text("\n".join(lines) + "\n")

    write()
    out = tmp_path / "f.h5"
    run(manifest, out, tiny_backbone)
    shutil.copy(out, tmp_path / "old.h5")
    moved = images[1]  # a red image, now labelled green
    write(relabel=moved)
    r = run(manifest, out, tiny_backbone, update=True)
    assert (r.update["relabelled"], r.update["embedded"], r.update["unchanged"]) == (1, 0, 14)
    run(manifest, tmp_path / "fresh.h5", tiny_backbone)
    assert_equal_to_fresh(out, tmp_path / "fresh.h5", tmp_path / "old.h5")
    u, at = rows(out)
    assert u.classes[u.y()[at[str(moved)]]] == "green"


@pytest.mark.slow
def test_a_file_moved_to_another_class_folder(tmp_path, tiny_backbone):
    """In a folder the class is part of the id (the path): a move is one deleted image and
    one new one, embedded again."""
    root = split_folders(tmp_path / "data")
    out = tmp_path / "f.h5"
    run(root, out, tiny_backbone)
    shutil.copy(out, tmp_path / "old.h5")
    src, dst = root / "train" / "red" / "3.png", root / "train" / "green" / "moved.png"
    os.rename(src, dst)
    r = run(root, out, tiny_backbone, update=True)
    assert (r.update["new"], r.update["deleted"], r.update["embedded"]) == (1, 1, 1)
    run(root, tmp_path / "fresh.h5", tiny_backbone)
    assert_equal_to_fresh(out, tmp_path / "fresh.h5", tmp_path / "old.h5", embedded={str(dst)})


@pytest.mark.slow
def test_a_seeded_split_never_moves(tmp_path, tiny_backbone):
    """Without a given split, old rows keep theirs and new images get a hash of their id;
    a fresh embed would re-draw every split, so the rows are compared by path."""
    root = make_folder(tmp_path / "imgs", 6)
    out = tmp_path / "f.h5"
    run(root, out, tiny_backbone, layers=["avgpool"])
    o, at_old = rows(out)
    old_splits = dict(zip(o.paths(), o.splits()))
    old_x = o.X("avgpool")
    new = [root / "red" / f"zz_{i}.png" for i in range(4)]
    for i, p in enumerate(new):
        make_image(p, COLORS["red"], seed=700 + i)
    (root / "blue" / "blue_2.png").unlink()
    r = run(root, out, tiny_backbone, layers=["avgpool"], update=True)
    assert (r.update["new"], r.update["deleted"], r.update["embedded"]) == (4, 1, 4)
    u, at = rows(out)
    splits = dict(zip(u.paths(), u.splits()))
    for p, s in splits.items():
        assert s == (old_splits[p] if p in old_splits else hashed_split(p, 0.3, 0)), p
    keys = [(s, int(y), p) for p, s, y in zip(u.paths(), u.splits(), u.y())]
    assert keys == sorted(keys)  # the source's order: (split, class, path)
    fresh = run(root, tmp_path / "fresh.h5", tiny_backbone, layers=["avgpool"])
    f, at_f = rows(tmp_path / "fresh.h5")
    X, F = u.X("avgpool"), f.X("avgpool")
    assert sorted(u.paths()) == sorted(f.paths()) and fresh.n_rows == r.n_rows
    for p, i in at.items():
        assert u.classes[u.y()[i]] == f.classes[f.y()[at_f[p]]]
        if p in at_old:
            assert X[i].tobytes() == old_x[at_old[p]].tobytes()
        else:
            assert same_within_rounding(X[i:i + 1], F[at_f[p]:at_f[p] + 1]).all()
    assert "hashed(test_size=0.3, seed=0)" in u.provenance["split_origin"]


@pytest.mark.slow
def test_a_failure_mid_update_keeps_the_old_file_and_the_rerun_ends_equal(
        tmp_path, tiny_backbone, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    root = split_folders(tmp_path / "data", n_train=6, n_test=3)
    out = tmp_path / "f.h5"
    kw = {"batch_size": 2, "commit_rows": 2}
    run(root, out, tiny_backbone, **kw)
    old = out.read_bytes()
    for i in range(7):
        make_image(root / "train" / "green" / f"n{i}.png", COLORS["green"], seed=800 + i)
    (root / "test" / "red" / "0.png").unlink()
    run(root, out, tiny_backbone, update=True, **kw)
    expected = out.read_bytes()
    out.write_bytes(old)
    with forward_fails_at(3), pytest.raises(RuntimeError, match="stop"):
        run(root, out, tiny_backbone, update=True, **kw)
    assert out.read_bytes() == old  # the old file, untouched and readable
    assert open_features(out).n_rows == 27 and partial_path(out).is_dir()
    seen = []
    r = run(root, out, tiny_backbone, update=True, progress=lambda d, t: seen.append((d, t)),
            **kw)
    assert r.resumed_from > 0 and seen[0][0] > 2 and seen[-1] == (7, 7)
    assert out.read_bytes() == expected and not partial_path(out).exists()


@pytest.mark.slow
def test_a_different_update_discards_a_stopped_one(tmp_path, tiny_backbone):
    root = split_folders(tmp_path / "data")
    out = tmp_path / "f.h5"
    run(root, out, tiny_backbone, commit_rows=1, batch_size=1)
    for i in range(3):
        make_image(root / "train" / "red" / f"n{i}.png", COLORS["red"], seed=600 + i)
    with forward_fails_at(2), pytest.raises(RuntimeError):
        run(root, out, tiny_backbone, update=True, commit_rows=1, batch_size=1)
    make_image(root / "train" / "red" / "n3.png", COLORS["red"], seed=604)  # the data moved on
    r = run(root, out, tiny_backbone, update=True, commit_rows=1, batch_size=1)
    assert r.update["new"] == 4 and r.resumed_from == 0 and r.n_rows == 22
    run(root, tmp_path / "fresh.h5", tiny_backbone)
    assert open_features(out).paths() == open_features(tmp_path / "fresh.h5").paths()


@pytest.mark.slow
@pytest.mark.parametrize("change, field", [({"layers": ["avgpool"]}, "layers"),
                                           ({"dtype": "float32"}, "dtype"),
                                           ({"pool": "max"}, "pool")])
def test_other_settings_are_refused_naming_the_field(tmp_path, tiny_backbone, change, field):
    root = split_folders(tmp_path / "data", 2, 1)
    out = tmp_path / "f.h5"
    run(root, out, tiny_backbone)
    before = out.read_bytes()
    make_image(root / "train" / "red" / "n.png", COLORS["red"], seed=5)
    with pytest.raises(StoreMismatchError, match=rf"\({field}: file has"):
        run(root, out, tiny_backbone, update=True, **change)
    assert out.read_bytes() == before and not partial_path(out).exists()


@pytest.mark.slow
def test_update_refuses_overwrite_shard_and_cluster(tmp_path, tiny_backbone):
    root = split_folders(tmp_path / "data", 2, 1)
    out = tmp_path / "f.h5"
    run(root, out, tiny_backbone)
    with pytest.raises(OptionError, match="do not go together"):
        run(root, out, tiny_backbone, update=True, overwrite=True)
    with pytest.raises(OptionError, match="not one shard"):
        run(root, out, tiny_backbone, update=True, shard=(0, 2))
    with pytest.raises(OptionError, match="runs in this process"):
        embed(root, out, backbone="efficientnet_lite0", update=True, cluster="local:1",
              progress=False)


@pytest.mark.slow
def test_an_update_of_a_missing_file_is_a_fresh_embed(tmp_path, tiny_backbone, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    root = make_folder(tmp_path / "imgs", 4)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    r = run(root, tmp_path / "a" / "f.h5", tiny_backbone, update=True)
    run(root, tmp_path / "b" / "f.h5", tiny_backbone)
    assert r.update["new"] == 12 and r.update["embedded"] == 12
    a, b = open_features(tmp_path / "a" / "f.h5"), open_features(tmp_path / "b" / "f.h5")
    assert a.paths() == b.paths() and a.splits() == b.splits()
    assert a.X("avgpool").tobytes() == b.X("avgpool").tobytes()


@pytest.mark.slow
def test_a_file_without_stamps(tmp_path, tiny_backbone):
    """A file made before rows kept stamps: its rows count as unchanged when its data
    fingerprint shows it (images only added); otherwise they are embedded again."""
    import h5py

    root = split_folders(tmp_path / "data", 3, 1)
    out = tmp_path / "f.h5"
    run(root, out, tiny_backbone)
    with h5py.File(out, "a") as f:
        del f["stamps"]
    assert open_features(out).stamps() is None
    shutil.copy(out, tmp_path / "old.h5")
    make_image(root / "train" / "red" / "n.png", COLORS["red"], seed=5)
    r = run(root, out, tiny_backbone, update=True)
    assert (r.update["new"], r.update["unchanged"], r.update["embedded"]) == (1, 12, 1)
    run(root, tmp_path / "fresh.h5", tiny_backbone)
    assert_equal_to_fresh(out, tmp_path / "fresh.h5", tmp_path / "old.h5",
                          embedded={str(root / "train" / "red" / "n.png")})
    shutil.copy(tmp_path / "old.h5", out)  # again, with an image deleted too
    (root / "train" / "blue" / "0.png").unlink()
    r = run(root, out, tiny_backbone, update=True)
    assert (r.update["changed"], r.update["unchanged"], r.update["deleted"]) == (11, 0, 1)
    assert any("no per-row stamps" in n for n in r.update["notes"])
    assert open_features(out).stamps() is not None


@pytest.mark.slow
def test_heads_made_on_the_old_file_work_on_the_new_one(tmp_path, tiny_backbone):
    from featurecache.heads import fit_head

    root = split_folders(tmp_path / "data", 4, 2)
    out = tmp_path / "f.h5"
    run(root, out, tiny_backbone)
    head = fit_head(out, "avgpool", cv=2, progress=False)
    make_image(root / "test" / "red" / "n.png", COLORS["red"], seed=5)
    run(root, out, tiny_backbone, update=True)
    res = head.evaluate(out)
    assert res["n"] == 7


@pytest.mark.slow
def test_the_console_script_prints_the_summary(tmp_path):
    root = split_folders(tmp_path / "data", 2, 1)
    out = tmp_path / "f.h5"
    cmd = [sys.executable, "-m", "featurecache.cli", "embed", str(root), "-o", str(out),
           "--layer", "avgpool", "--workers", "0", "-q"]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    make_image(root / "train" / "red" / "n.png", COLORS["red"], seed=5)
    (root / "train" / "green" / "0.png").unlink()
    r = subprocess.run([*cmd, "--update"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    line = r.stdout.strip().splitlines()[-1]
    for part in ("+1 new", "~0 changed", "-1 deleted", "8 unchanged", "embedded 1 images"):
        assert part in line, line
    info = subprocess.run([sys.executable, "-m", "featurecache.cli", "info", str(out)],
                          capture_output=True, text=True).stdout
    assert "a row's split never moves on update" in info and "split given" in info


@pytest.mark.slow
def test_a_kill_at_the_rename_or_after_it(tmp_path, tiny_backbone, monkeypatch):
    """Before the one rename the old file is in place, and the re-run ends equal; after it
    the new one is, and the re-run finds it up to date and removes what the kill left."""
    import featurecache.store.segments as segments
    import featurecache.store.shield as shield

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    root = split_folders(tmp_path / "data", 3, 1)
    out = tmp_path / "f.h5"
    run(root, out, tiny_backbone)
    old = out.read_bytes()
    make_image(root / "train" / "red" / "n.png", COLORS["red"], seed=5)
    run(root, out, tiny_backbone, update=True)
    expected = out.read_bytes()
    out.write_bytes(old)

    real_replace = os.replace

    def killed(*args, **kwargs):
        raise OSError("killed")

    def replace(src, dst):  # only the final rename (segments are renamed too)
        if os.path.abspath(dst) == str(out):
            killed()
        return real_replace(src, dst)

    with monkeypatch.context() as mp:
        mp.setattr(shield.os, "replace", replace)
        with pytest.raises(StoreError, match="killed"):
            run(root, out, tiny_backbone, update=True)
    assert out.read_bytes() == old and partial_path(out).is_dir()
    run(root, out, tiny_backbone, update=True)
    assert out.read_bytes() == expected and not partial_path(out).exists()
    out.write_bytes(old)
    with monkeypatch.context() as mp:
        mp.setattr(segments.shutil, "rmtree", killed)
        with pytest.raises(StoreError, match="killed"):
            run(root, out, tiny_backbone, update=True)
    assert out.read_bytes() == expected and partial_path(out).is_dir()
    again = run(root, out, tiny_backbone, update=True)
    assert again.already_complete and not partial_path(out).exists()
