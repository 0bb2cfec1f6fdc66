"""Joined files (issue 22): a virtual joined file records what it joined and refuses a shard
that was replaced since; a join killed at any rename, unlink or write leaves the old output or
the new one whole."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image, ImageOps

from featurecache import embed, open_features
from featurecache.errors import StoreError
from featurecache.store import join_shards

STRACE = shutil.which("strace")
SCRIPT = Path(sys.executable).with_name("featurecache")  # the console script


def _cli(*args, env=None, strace=()):
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "featurecache.cli"]
    return subprocess.run([*strace, *cmd, *map(str, args)], capture_output=True, text=True,
                          env=env)


@pytest.fixture
def shards(image_folder, tiny_backbone, tmp_path):
    kw = dict(backbone=tiny_backbone, layers=["blocks.5", "avgpool"], num_workers=0,
              progress=False)
    paths = [tmp_path / f"p{i}.h5" for i in range(2)]
    for i, p in enumerate(paths):
        embed(image_folder, p, shard=(i, 2), **kw)
    return paths, kw


def _inverted(folder: Path, dest: Path) -> Path:
    """The same classes and file names, every image inverted (other images)."""
    for p in sorted(folder.rglob("*.png")):
        out = dest / p.relative_to(folder)
        out.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.invert(Image.open(p).convert("RGB")).save(out)
    return dest


@pytest.mark.slow
def test_a_joined_file_refuses_a_shard_replaced_by_other_images(shards, image_folder,
                                                                 tmp_path):
    (p0, p1), kw = shards
    joined = join_shards([p0, p1], tmp_path / "j.h5")
    before = open_features(joined)
    assert before.complete and before.n_rows == 18
    rec = _record(joined)
    assert rec["path"] == ["p0.h5", "p1.h5"] and rec["n_rows"] == [9, 9]
    assert rec["creation_id"] == [open_features(p).provenance["creation_id"] for p in (p0, p1)]
    assert all(len(c) == 32 for c in rec["creation_id"]) and rec["creation_id"][0] != rec["creation_id"][1]
    # the reproduction: shard 1 overwritten with other images
    other = _inverted(image_folder, tmp_path / "data2")
    embed(other, p1, shard=(1, 2), overwrite=True, **kw)
    with pytest.raises(StoreError, match=r"shard 1 \(.*p1.h5\) is not the file it joined: it was "
                                         r"made with other settings or other images"):
        open_features(joined)
    res = _cli("info", joined)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "p1.h5" in res.stderr and "Join the shards again with --overwrite" in res.stderr
    assert "--shard 1/2" in res.stderr  # the command that restores that shard
    from featurecache.heads import fit_head

    with pytest.raises(StoreError, match="is not the file it joined"):
        fit_head(joined, "avgpool", "logreg", cv=2)
    with pytest.raises(StoreError, match="in \\['data_fingerprint'\\]; not the same run"):
        join_shards([p0, p1], joined, overwrite=True)  # the two shards are of other images
    # the fix: restore the shard, then join again
    embed(image_folder, p1, shard=(1, 2), overwrite=True, **kw)
    join_shards([p0, p1], joined, overwrite=True)
    after = open_features(joined)
    assert after.paths() == before.paths() and after.y().tolist() == before.y().tolist()


@pytest.mark.slow
def test_a_shard_embedded_again_with_the_same_settings_is_refused_too(shards, image_folder,
                                                                      tmp_path):
    (p0, p1), kw = shards
    joined = join_shards([p0, p1], tmp_path / "j.h5")
    copied = join_shards([p0, p1], tmp_path / "c.h5", copy=True)
    expected = open_features(copied).X("avgpool")
    embed(image_folder, p0, shard=(0, 2), overwrite=True, **kw)  # same fingerprint, new file
    with pytest.raises(StoreError, match=r"shard 0 .* embedded again since"):
        open_features(joined)
    ff = open_features(copied)  # a --copy join is self-contained: nothing to check
    assert ff.complete and ff.provenance["joined_as"] == "copy"
    np.testing.assert_array_equal(ff.X("avgpool"), expected)


def test_a_joined_file_made_before_the_record_still_opens(shards, tmp_path):
    (p0, p1), _ = shards
    joined = join_shards([p0, p1], tmp_path / "j.h5")
    with h5py.File(joined, "r+") as f:  # as featurecache wrote it before issue 22
        del f["joined_shards"]
        del f.attrs["creation_id"]
    ff = open_features(joined)
    assert ff.complete and ff.n_rows == 18
    np.testing.assert_array_equal(
        ff.X("avgpool"), np.concatenate([open_features(p).X("avgpool") for p in (p0, p1)]))


@pytest.mark.slow
def test_a_shard_resumed_from_an_old_header_keeps_one_creation_id(image_folder, tiny_backbone,
                                                                   tmp_path):
    """A run started by a featurecache that wrote no creation id gets one derived from its
    header: the same whichever process finishes it."""
    import json

    from featurecache.store import partial_path

    from .conftest import forward_fails_at

    kw = dict(backbone=tiny_backbone, layers=["avgpool"], num_workers=0, progress=False,
              batch_size=4, commit_rows=4)
    out = tmp_path / "f.h5"
    with forward_fails_at(2, "stop"), pytest.raises(RuntimeError, match="stop"):
        embed(image_folder, out, **kw)
    header = partial_path(out) / "header.json"
    saved = json.loads(header.read_text())
    del saved["meta"]["creation_id"]
    header.write_text(json.dumps(saved))
    import hashlib

    derived = hashlib.sha256(header.read_bytes()).hexdigest()[:32]
    embed(image_folder, out, **kw)
    assert open_features(out).provenance["creation_id"] == derived


def _record(path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: [v.decode() if isinstance(v, bytes) else int(v) for v in d[()]]
                for k, d in f["joined_shards"].items()}


def _count(args, env, syscall) -> int:
    res = _cli(*args, env=env, strace=[STRACE, "-f", "--seccomp-bpf", "-c", "-o", "/dev/stderr",
                                       "-e", f"trace={syscall}"])
    line = next((l for l in res.stderr.splitlines() if l.strip().endswith(syscall)), None)
    return int(line.split()[3]) if line else 0


@pytest.mark.slow
@pytest.mark.skipif(STRACE is None, reason="needs strace")
def test_a_join_killed_at_a_rename_unlink_or_write_leaves_the_old_or_the_new_file(
        shards, tmp_path):
    """The old output is a --copy join; the new one a virtual join of the same shards. After a
    kill at every rename and unlink of the join (and at writes early and late) the output is
    byte for byte one of the two; joining again then gives the new one and leaves nothing."""
    (p0, p1), _ = shards
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    out = tmp_path / "j.h5"
    args = ["join", out, p0, p1, "--overwrite"]
    assert _cli(*args, env=env).returncode == 0
    new = out.read_bytes()
    assert _cli("join", out, p0, p1, "--copy", "--overwrite", env=env).returncode == 0
    old = out.read_bytes()
    assert old != new
    assert _cli(*args, env=env).returncode == 0 and out.read_bytes() == new  # reproducible
    counts = {s: _count(args, env, s) for s in ("rename", "unlink", "pwrite64")}
    assert counts["rename"] >= 1 and counts["unlink"] >= 1 and counts["pwrite64"] > 4
    points = [("rename", w) for w in range(1, counts["rename"] + 1)] + \
             [("unlink", w) for w in range(1, counts["unlink"] + 1)] + \
             [("pwrite64", 1), ("pwrite64", counts["pwrite64"])]
    for syscall, when in points:
        out.write_bytes(old)
        # (no --seccomp-bpf here: the CLI starts child processes, and with it the injection
        # did not fire)
        res = _cli(*args, env=env, strace=[STRACE, "-f", "-o", "/dev/null",
                                            "-e", f"trace={syscall}", "-e",
                                            f"inject={syscall}:signal=KILL:when={when}"])
        case = (syscall, when, res.returncode)
        assert res.returncode in (-9, 137), case  # the kill happened
        assert out.read_bytes() in (old, new), case
        again = _cli(*args, env=env)
        assert again.returncode == 0, (case, again.stderr)
        assert out.read_bytes() == new, case
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], case
