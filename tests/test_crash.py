"""The feature store survives every crash (issue 12): a kill or a full disk at any write, a
reader during the embed, a second writer; damaged files and non-finite features."""

import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from featurecache import embed, open_features
from featurecache.errors import DataError, StoreError
from featurecache.store import partial_path

from .conftest import forward_fails_at, make_image

STRACE = shutil.which("strace")

SCRIPT = """
import dataclasses, sys
from featurecache import embed
from featurecache.backbones import Preprocess, load_backbone
bb = dataclasses.replace(load_backbone("efficientnet_lite0"), preprocess=Preprocess(resize=64, crop=64))
gate = sys.argv[3] if len(sys.argv) > 3 else None
if gate:  # after two batches, wait until the test creates the gate file
    import os, time
    from featurecache.extract import FeatureExtractor
    forward = FeatureExtractor.forward
    calls = []
    def gated(self, x):
        calls.append(1)
        while len(calls) > 2 and not os.path.exists(gate):
            time.sleep(0.05)
        return forward(self, x)
    FeatureExtractor.forward = gated
embed(sys.argv[1], sys.argv[2], backbone=bb, layers=["blocks.5", "avgpool"], batch_size=4,
      commit_rows=4, num_workers=0, progress=False)
"""


@pytest.fixture
def crash_setup(tmp_path):
    root = tmp_path / "imgs"
    for ci, color in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220)]):
        (root / f"c{ci}").mkdir(parents=True)
        for i in range(8):
            make_image(root / f"c{ci}" / f"{i}.png", color, seed=ci * 100 + i)
    (root / "c1" / "broken.png").write_text("not an image")  # a skipped input too
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    return root, script, env


def _run(script, root, out, env, strace=(), delay=None):
    cmd = [*strace, sys.executable, str(script), str(root), str(out)] + ([str(delay)] if delay else [])  # delay: a gate file
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)


def _count(script, root, out, env, syscall) -> int:
    res = _run(script, root, out, env, [STRACE, "-f", "--seccomp-bpf", "-c", "-o", "/dev/stderr",
                                        "-e", f"trace={syscall}"])
    line = next(l for l in res.stderr.splitlines() if l.strip().endswith(syscall))
    return int(line.split()[3])


@pytest.mark.slow
@pytest.mark.skipif(STRACE is None, reason="needs strace")
def test_a_kill_or_full_disk_at_any_write_then_resume_is_bit_identical(crash_setup, tmp_path):
    """Segments are written with write(2) by the writer thread (one per commit), the final file
    with pwrite64(2) by the assembling process; strace counts each syscall per thread, so the
    N-th call of every thread is hit: N spreads over both phases."""
    root, script, env = crash_setup
    out = tmp_path / "run" / "f.h5"  # one output path: it is part of the provenance
    out.parent.mkdir()
    assert _run(script, root, out, env).returncode == 0
    expected = out.read_bytes()
    out.unlink()
    n_pwrite = _count(script, root, out, env, "pwrite64")
    out.unlink()
    assert n_pwrite > 10
    # both phases for both faults; benchmarks/crash_points.py sweeps 48 points of a longer run
    cases = {"signal=KILL": [("write", 3), ("pwrite64", 1), ("pwrite64", n_pwrite)],
             "error=ENOSPC": [("write", 2), ("pwrite64", n_pwrite // 3),
                              ("pwrite64", n_pwrite - 1)]}
    for fault, points in cases.items():
        for syscall, when in points:
            # strace 6.1 does not deliver an injected signal under --seccomp-bpf (the run goes
            # on untouched): kills are traced in full, and asserted to have happened
            seccomp = [] if fault.startswith("signal") else ["--seccomp-bpf"]
            res = _run(script, root, out, env, [STRACE, "-f", *seccomp, "-o", "/dev/null",
                                                "-e", f"trace={syscall}", "-e",
                                                f"inject={syscall}:{fault}:when={when}"])
            case = (fault, syscall, when)
            assert res.returncode != -11, (case, res.stderr[-2000:])  # never a segfault
            assert res.returncode != 0, case  # the fault reached the run
            if fault.startswith("signal"):
                assert res.returncode in (-9, 137), (case, res.stderr[-2000:])
            if fault == "error=ENOSPC" and res.returncode and syscall == "pwrite64":
                assert "no space left on device" in res.stderr, (case, res.stderr[-2000:])
            assert not out.exists() or out.read_bytes() == expected, case
            again = _run(script, root, out, env)
            assert again.returncode == 0, (case, again.stderr[-2000:])
            assert out.read_bytes() == expected, case
            assert not partial_path(out).exists(), case
            assert [p.name for p in out.parent.iterdir()] == ["f.h5"], case
            out.unlink()


@pytest.mark.slow
def test_after_a_failed_commit_nothing_more_is_committed(crash_setup, tmp_path, tiny_backbone,
                                                         monkeypatch):
    root, _, _ = crash_setup
    from featurecache.store import writer as writer_module

    calls = {"n": 0}
    real = writer_module.write_rows

    def fail_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_module, "write_rows", fail_second)
    out = tmp_path / "f.h5"
    with pytest.raises(StoreError, match="no space left on device .* resume"):
        embed(root, out, backbone=tiny_backbone, layers=["avgpool"], batch_size=4, commit_rows=4,
              num_workers=0, progress=False)
    part = open_features(out)
    assert part.n_rows == 4 and not part.complete  # only the first commit counts
    monkeypatch.setattr(writer_module, "write_rows", real)
    embed(root, out, backbone=tiny_backbone, layers=["avgpool"], batch_size=4, commit_rows=4,
          num_workers=0, progress=False)
    done = open_features(out)
    assert done.complete and len(done.paths()) == len(set(done.paths())) == 24
    ref = tmp_path / "ref.h5"
    embed(root, ref, backbone=tiny_backbone, layers=["avgpool"], batch_size=4, num_workers=0,
          progress=False)
    assert done.paths() == open_features(ref).paths()
    np.testing.assert_array_equal(done.X("avgpool"), open_features(ref).X("avgpool"))


@pytest.mark.slow
def test_the_final_file_does_not_depend_on_where_a_run_stopped(crash_setup, tmp_path,
                                                                tiny_backbone, monkeypatch):
    """An error outside the store (here in the forward pass) commits the rows queued so far,
    so the resumed run's segments are cut at other rows than an uninterrupted run's; the
    final file must still be the same bytes (HDF5 places variable-length strings per write)."""

    root, _, _ = crash_setup
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    out = tmp_path / "f.h5"
    kw = dict(backbone=tiny_backbone, layers=["blocks.5", "avgpool"], batch_size=4,
              commit_rows=8, num_workers=0, progress=False)
    embed(root, out, **kw)
    expected = out.read_bytes()
    out.unlink()
    with forward_fails_at(2, "stop here"), pytest.raises(RuntimeError, match="stop here"):
        embed(root, out, **kw)
    assert open_features(out).n_rows == 4  # a segment of 4 rows, where the full run has 8
    r = embed(root, out, **kw)
    assert r.resumed_from == 4 and r.n_rows == 24
    assert out.read_bytes() == expected


@pytest.mark.slow
def test_readers_and_a_second_writer_during_an_embed(crash_setup, tmp_path):
    root, script, env = crash_setup
    out = tmp_path / "f.h5"
    gate = tmp_path / "go"  # the first writer holds its third batch until this file exists
    first = subprocess.Popen([sys.executable, str(script), str(root), str(out), str(gate)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300  # polls for the first commit (a load-proof bound)
        while not list(partial_path(out).glob("seg-*.h5")) and time.time() < deadline:
            time.sleep(0.2)
        assert list(partial_path(out).glob("seg-*.h5")), "the embed never committed"
        second = _run(script, root, out, env)
        assert second.returncode != 0 and "is being written by process" in second.stderr
        seen = []
        for _ in range(4):  # readers during the run see committed rows and never hurt it
            info = subprocess.run([sys.executable, "-m", "featurecache.cli", "info", str(out)],
                                  capture_output=True, text=True)
            assert info.returncode == 0 and "Traceback" not in info.stderr, info.stderr
            seen.append(info.stdout)
        assert all("INCOMPLETE" in s for s in seen)  # the writer is held: never complete yet
    finally:
        gate.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    ff = open_features(out)
    assert ff.complete and ff.n_rows == 24


def test_damaged_files_are_named_not_tracebacks(feats_path_factory, tmp_path):
    path = feats_path_factory()
    broken = tmp_path / "broken.h5"
    shutil.copyfile(path, broken)
    with h5py.File(broken, "r+") as f:
        del f["paths"]
    with pytest.raises(StoreError, match=r"damaged: /paths missing"):
        open_features(broken)
    liar = tmp_path / "liar.h5"
    shutil.copyfile(path, liar)
    with h5py.File(liar, "r+") as f:
        f.attrs["n_committed"] = 500
    with pytest.raises(StoreError, match=r"damaged: it claims 500 rows"):
        open_features(liar)
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    out = subprocess.run([sys.executable, "-m", "featurecache.cli", "info", str(tmp_path / "junk.h5")],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "junk.h5" in out.stderr


def test_non_finite_features_are_never_stored(image_folder, tiny_backbone, tmp_path, monkeypatch):
    from featurecache.extract import FeatureExtractor

    forward = FeatureExtractor.forward

    def poisoned(self, x):
        out = {k: v.clone() for k, v in forward(self, x).items()}
        out["avgpool"][0, 3] = float("nan")  # the first image of every batch
        return out

    monkeypatch.setattr(FeatureExtractor, "forward", poisoned)
    kw = dict(backbone=tiny_backbone, layers=["avgpool"], num_workers=0, progress=False,
              batch_size=6)
    with pytest.raises(DataError, match=r"non-finite features .*'avgpool'.*on_error='skip'"):
        embed(image_folder, tmp_path / "a.h5", on_error="fail", **kw)
    r = embed(image_folder, tmp_path / "b.h5", **kw)
    ff = open_features(tmp_path / "b.h5")
    assert r.n_skipped == 3 and ff.n_rows == 15 and np.isfinite(ff.X("avgpool")).all()
    assert all("non-finite" in reason for _, reason in ff.skipped())


@pytest.fixture
def feats_path_factory(image_folder, tiny_backbone, tmp_path):
    def make():
        out = tmp_path / "f.h5"
        embed(image_folder, out, backbone=tiny_backbone, layers=["avgpool"], num_workers=0,
              progress=False)
        return out
    return make


@pytest.mark.slow
@pytest.mark.skipif(STRACE is None, reason="needs strace")
def test_decode_workers_that_cannot_hand_over_a_batch_end_the_run_then_it_resumes(
        crash_setup, tmp_path, tiny_backbone):
    """Issue 22, item 17: with the first write of every thread failing (as with a full
    /dev/shm), the workers' feeders died and the embed waited forever. Now: one line naming
    the cause and the fix, a non-zero exit, and the same command resumes to a whole file."""
    root, _, env = crash_setup
    out = tmp_path / "f.h5"
    cmd = [sys.executable, "-m", "featurecache.cli", "embed", str(root), "-o", str(out),
           "--layer", "stage3,avgpool", "--batch-size", "4", "--workers", "2", "-q"]
    r = subprocess.run([STRACE, "-f", "-qq", "-o", os.devnull, "-e", "trace=write", "-e",
                        "inject=write:error=ENOSPC:when=1", *cmd], capture_output=True, text=True,
                       env={**env, "FEATURECACHE_DECODE_TIMEOUT": "15"}, timeout=600)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert "decode workers" in last and "/dev/shm" in last and "--workers 0" in last, last
    assert not out.exists()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    fresh = tmp_path / "fresh.h5"
    assert subprocess.run([*cmd[:6], str(fresh), *cmd[7:]], env=env).returncode == 0
    a, b = open_features(out), open_features(fresh)
    assert a.paths() == b.paths() and a.n_rows == b.n_rows == 24
    np.testing.assert_array_equal(a.X("avgpool"), b.X("avgpool"))
