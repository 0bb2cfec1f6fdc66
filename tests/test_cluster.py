"""The clustered embed and compare on a real Dask LocalCluster (2 worker processes, 1 thread
each): what it guarantees against one process, surviving a killed worker and a killed client,
a worker running two shards at once, an --overwrite that keeps the old file until the new one
is joined, and options that would be ignored."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest


from featurecache import embed, open_features  # noqa: E402
from featurecache.cluster import (ClusterError, same_within_rounding, shard_folders,  # noqa: E402
                                  shard_paths)
from featurecache.errors import FeaturecacheError  # noqa: E402

from .conftest import make_folder  # noqa: E402

# the real default backbone, by name (workers load it), at its own 224 px
KW = {"backbone": "efficientnet_lite0", "layers": ["stage3", "avgpool"], "batch_size": 2,
      "num_workers": 0, "progress": False, "keep_map": ["stage3"], "map_size": 7}


STRACE = shutil.which("strace")
SCRIPT = Path(sys.executable).with_name("featurecache")  # the console script


def _cli(*args, strace=(), **kw):
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "featurecache.cli"]
    return subprocess.run([*strace, *cmd, *map(str, args)], capture_output=True, text=True, **kw)


def assert_as_one_process(reference, out):
    """What a clustered embed guarantees (README, "Running on a cluster"): the same rows in
    the same order with the same paths, labels, splits and skipped inputs as one process; every
    stored value (layers and maps) within float16 rounding of the one-process value."""
    one, mine = open_features(reference), open_features(out)
    assert mine.n_rows == one.n_rows and mine.classes == one.classes
    assert mine.paths() == one.paths() and mine.splits() == one.splits()
    assert mine.skipped() == one.skipped()
    np.testing.assert_array_equal(mine.y(), one.y())
    assert list(mine.layers) == list(one.layers) and set(mine.maps) <= set(one.maps)
    for layer in one.layers:
        assert same_within_rounding(mine.X(layer), one.X(layer)).all(), layer
    for name in mine.maps:  # the reference stores a map; some runs here do not
        rows = range(one.n_rows)
        assert same_within_rounding(mine.map_rows(name, rows), one.map_rows(name, rows)).all(), name


def test_the_rounding_guarantee_is_one_float16_step():
    x = np.array([[0.59716797, 5.56e-05, 3.0]], dtype=np.float16)
    step = np.spacing(x)
    assert same_within_rounding(x, x + step).all()  # one step at each value's size
    assert not same_within_rounding(x[:, :1], (x + 2 * step)[:, :1]).all()  # two are not
    # near zero: within 2**-16 of the row's largest value (float32 sums, then rounded)
    assert same_within_rounding(x, x + np.array([[0, 2 * 2.0 ** -16, 0]])).all()
    assert not same_within_rounding(x, x + np.array([[0, 2.0 ** -11, 0]])).all()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("cluster") / "imgs", 10)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "one.h5"
    embed(images, out, **KW)
    return out


@pytest.fixture(scope="module")
def local_cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        yield cluster


@pytest.mark.slow
def test_a_clustered_embed_equals_one_process(images, reference, tmp_path):
    out = tmp_path / "feats.h5"
    r = embed(images, out, cluster="local:2", shards=3, **KW)
    assert r.n_rows == 30 and not r.already_complete
    assert [s.name for s in r.layers] == ["stage3", "avgpool"] and [m.name for m in r.maps] == ["stage3"]
    parts = shard_paths(out, 3)
    assert [p.name for p in parts] == [f"part-0000{i}-of-00003.h5" for i in range(3)]
    assert all(open_features(p).complete for p in parts)
    assert_as_one_process(reference, out)
    mine, ref = open_features(out), open_features(reference)
    joined, one = mine.provenance, ref.provenance
    assert joined["fingerprint"] == one["fingerprint"] and joined["joined_from"] == 3
    assert joined["rebuild"].split(" -o ")[0] == one["rebuild"].split(" -o ")[0]
    info = subprocess.run([sys.executable, "-m", "featurecache.cli", "info", str(out)],
                          capture_output=True, text=True)
    assert "joined from 3 shards (virtual)" in info.stdout
    assert "values equal to a one-process embed's within float16 rounding" in info.stdout
    again = embed(images, out, cluster="local:2", shards=3, **KW)  # nothing left to do
    assert again.already_complete and again.n_rows == 30


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_its_shard_resumes(images, reference, local_cluster,
                                                           tmp_path):
    from distributed import Client

    out = tmp_path / "feats.h5"
    folder = shard_paths(out, 2)[0].parent
    with Client(local_cluster, set_as_default=False) as client:
        pids = client.run(os.getpid)  # worker address -> pid
        done = {}
        run = threading.Thread(target=lambda: done.update(r=embed(
            images, out, cluster=local_cluster.scheduler_address, shards=2, commit_rows=1,
            **{**KW, "batch_size": 1})))
        run.start()
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline:
            segs = list(folder.glob("*.partial/seg-*.h5")) if folder.is_dir() else []
            busy = {w: keys for w, keys in client.processing().items() if keys}
            if len(segs) >= 2 and busy:
                victim = next(iter(busy))
            time.sleep(0.05)
        assert victim is not None, "no shard was seen running"
        os.kill(pids[victim], signal.SIGKILL)
        run.join(300)
    assert "r" in done, "the clustered embed did not finish after a worker was killed"
    assert_as_one_process(reference, out)


@pytest.mark.slow
def test_a_killed_client_reruns_only_what_is_left(images, reference, tmp_path):
    out = tmp_path / "feats.h5"
    cmd = [sys.executable, "-m", "featurecache.cli", "embed", str(images), "-o", str(out),
           "--layer", "stage3,avgpool", "--batch-size", "1", "--workers", "0",
           "--cluster", "local:2", "--shards", "6", "-q"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    parts = shard_paths(out, 6)
    deadline = time.monotonic() + 180
    while not any(p.exists() for p in parts) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the client and its local cluster
    proc.wait()
    complete = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts if p.exists()}
    assert 1 <= len(complete) < 6 and not out.exists()
    res = subprocess.run(cmd[:-1], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"{len(complete)} complete, {6 - len(complete)} to run" in res.stderr
    for p, stamp in complete.items():  # complete shards are not recomputed
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp
    assert_as_one_process(reference, out)


@pytest.mark.slow
def test_compare_on_the_cluster_gives_the_local_table(reference, tmp_path):
    from featurecache.report import compare

    kw = {"heads": ["logreg", "knn"], "cv": 3, "n_boot": 50, "progress": False}
    local = compare(reference, tmp_path / "local", **kw)
    remote = compare(reference, tmp_path / "remote", cluster="local:2", **kw)
    assert local.table() == remote.table()
    np.testing.assert_array_equal(
        [r["cv_score"] for r in local.rows], [r["cv_score"] for r in remote.rows])
    assert local.winner == remote.winner


@pytest.mark.slow
def test_bad_cluster_requests_fail_fast_and_clearly(images, tmp_path):
    t = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "featurecache.cli", "embed", str(images), "-o",
                          str(tmp_path / "f.h5"), "--cluster", "tcp://127.0.0.1:9", "-q"],
                         capture_output=True, text=True)
    assert res.returncode == 1 and time.monotonic() - t < 60
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in res.stderr
    assert "Traceback" not in res.stderr
    with pytest.raises(ClusterError, match=r"shards=31 is more shards than the 30 images"):
        embed(images, tmp_path / "f.h5", cluster="local:2", shards=31, **KW)
    with pytest.raises(ClusterError, match=r"local:N with N >= 1"):
        embed(images, tmp_path / "f.h5", cluster="local:zero", **KW)
    assert not (tmp_path / "f.h5").exists() and not (tmp_path / "f.h5.shards").exists()
    keep = tmp_path / "labels.csv"
    keep.write_text("path,label\n")
    with pytest.raises(FeaturecacheError, match="is not a feature file"):
        embed(images, keep, cluster="local:2", overwrite=True, **KW)
    assert keep.read_text() == "path,label\n"


@pytest.mark.slow
def test_a_pipeline_with_a_cluster_table_runs_sharded(tmp_path):
    from featurecache.pipeline import load_pipeline, run_pipeline

    plan = load_pipeline(text=f"""
output = "{tmp_path / 'run'}"
[data]
root = "builtin:digits"
max_per_class = 4
[embed]
layers = ["avgpool"]
[compare]
heads = ["logreg"]
cv = 2
n_boot = 20
[cluster]
address = "local:2"
shards = 2
""")
    record = run_pipeline(plan, progress=False)
    feats = open_features(tmp_path / "run" / "features.h5")
    assert feats.provenance["joined_from"] == 2 and feats.n_rows == 80
    assert record["embed"]["rows"] == 80 and (tmp_path / "run" / "report" / "report.md").exists()


@pytest.mark.slow
def test_one_worker_runs_two_shards_at_once(images, reference, tmp_path):
    """One worker process with two threads gets both shards at once (the README's `dask worker
    --nthreads 4` too): torch.fx tracing in one thread broke the other's forward pass
    ("module is not installed as a submodule")."""
    from distributed import LocalCluster

    out = tmp_path / "feats.h5"
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                      dashboard_address=None) as cluster:
        r = embed(images, out, cluster=cluster.scheduler_address, shards=2, **KW)
    assert r.n_rows == 30
    assert_as_one_process(reference, out)


def _stamps(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_an_overwrite_keeps_the_old_file_until_the_new_one_is_joined(images, reference,
                                                                    local_cluster, tmp_path,
                                                                    monkeypatch):
    """The old file and its shards stay readable while an --overwrite runs: a run stopped
    after its first new shard leaves them as they were; a re-run (without --overwrite)
    resumes the new shards, swaps the joined file, and only then removes the old shards."""
    import featurecache.cluster as cluster_module

    address = local_cluster.scheduler_address
    out = tmp_path / "feats.h5"
    old_kw = {**KW, "layers": ["avgpool"], "keep_map": [], "map_size": None}
    embed(images, out, cluster=address, shards=2, **old_kw)
    first, second = shard_folders(out)
    old_bytes, old_stamps = out.read_bytes(), _stamps(first)
    old_x = open_features(out).X("avgpool")

    run_shards = cluster_module._run_shards

    def stop_after_one(client, source, parts, todo, *args):
        run_shards(client, source, parts, todo[:1], *args)
        raise RuntimeError("stopped")  # the client stops with one new shard done, one not started

    monkeypatch.setattr(cluster_module, "_run_shards", stop_after_one)
    with pytest.raises(RuntimeError, match="stopped"):
        embed(images, out, cluster=address, shards=2, overwrite=True, **KW)
    monkeypatch.setattr(cluster_module, "_run_shards", run_shards)
    assert out.read_bytes() == old_bytes and _stamps(first) == old_stamps
    np.testing.assert_array_equal(open_features(out).X("avgpool"), old_x)  # still readable
    new_parts = shard_paths(out, 2, second)
    assert open_features(new_parts[0]).complete and not new_parts[1].exists()
    done = _stamps(second)[new_parts[0].name]
    r = embed(images, out, cluster=address, shards=2, **KW)  # no --overwrite: resumes
    assert r.n_rows == 30 and _stamps(second)[new_parts[0].name] == done  # not recomputed
    assert_as_one_process(reference, out)
    assert not first.exists()  # the old shards, removed after the swap
    # and the next --overwrite builds beside these, in the first folder again
    embed(images, out, cluster=address, shards=2, overwrite=True, **old_kw)
    assert not second.exists() and list(open_features(out).layers) == ["avgpool"]
    np.testing.assert_array_equal(open_features(out).X("avgpool"), old_x)


@pytest.mark.slow
@pytest.mark.skipif(STRACE is None, reason="needs strace")
def test_a_clustered_embed_killed_at_its_renames_and_unlinks(images, local_cluster, tmp_path):
    """The client killed at each rename and unlink of its own thread (the join's commit, the
    removal of the old shards), finishing an --overwrite whose new shards are complete: the
    output is the old file or the new one, whole; the same command then finishes the swap.
    benchmarks/crash_points.py --cluster sweeps the whole run, shards included."""
    out = tmp_path / "feats.h5"
    first, second = shard_folders(out)
    base = ["embed", images, "-o", out, "--cluster", local_cluster.scheduler_address,
            "--shards", "2", "--batch-size", "2", "--workers", "0", "-q"]
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    assert _cli(*base, "--layer", "avgpool", env=env).returncode == 0
    old = out.read_bytes()
    snapshot = tmp_path / "old"
    shutil.copytree(first, snapshot / first.name)
    new_cmd = [*base, "--layer", "stage3,avgpool", "--overwrite"]
    stopped = _cli(*new_cmd, env=env, strace=[STRACE, "-o", "/dev/null", "-e", "trace=rename",
                                              "-e", "inject=rename:signal=KILL:when=1"])
    assert stopped.returncode in (-9, 137) and out.read_bytes() == old
    shutil.copytree(second, snapshot / second.name)  # the new shards, complete
    resume = [*base, "--layer", "stage3,avgpool"]
    counts = {}
    for syscall in ("rename", "unlink"):
        res = _cli(*resume, env=env, strace=[STRACE, "-c", "-o", "/dev/stderr", "-e",
                                             f"trace={syscall}"])
        assert res.returncode == 0, res.stderr[-2000:]
        line = next(l for l in res.stderr.splitlines() if l.strip().endswith(syscall))
        counts[syscall] = int(line.split()[3])
        if syscall == "rename":
            new = out.read_bytes()
        assert out.read_bytes() == new
        out.write_bytes(old)
        for folder in (first, second):
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(snapshot / folder.name, folder)
    assert counts["rename"] >= 2 and counts["unlink"] >= 2  # a mark, the join; the old shards
    points = [("rename", w) for w in range(1, counts["rename"] + 1)] + \
        [("unlink", 1), ("unlink", counts["unlink"] // 2), ("unlink", counts["unlink"])]
    for syscall, when in points:
        res = _cli(*resume, env=env, strace=[STRACE, "-o", "/dev/null", "-e",
                                             f"trace={syscall}", "-e",
                                             f"inject={syscall}:signal=KILL:when={when}"])
        case = (syscall, when, res.returncode)
        assert res.returncode in (-9, 137), case
        assert out.read_bytes() in (old, new), case
        ff = open_features(out)  # whole: every shard it points to is there
        assert ff.complete and ff.n_rows == 30, case
        again = _cli(*resume, env=env)
        assert again.returncode == 0, (case, again.stderr[-2000:])
        assert out.read_bytes() == new and not first.exists(), case
        out.write_bytes(old)
        for folder in (first, second):
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(snapshot / folder.name, folder)


@pytest.mark.slow
def test_options_a_clustered_embed_would_ignore_are_refused(images, tmp_path):
    for args, says in [
            (["--shard", "1/2", "--cluster", "local:1"],
             "--shard 1/2 does not go with --cluster local:1: a clustered embed cuts the data "
             "into shards itself; choose how many with --shards 2"),
            (["--shards", "3"], "--shards 3 applies to a clustered embed only: add --cluster "
                                "local"),
            (["--copy"], "--copy applies to a clustered embed only")]:
        res = _cli("embed", images, "-o", tmp_path / "f.h5", *args, "-q")
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert says in res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FeaturecacheError, match=r"shard='1/2' does not go with cluster='local:1'"):
        embed(images, tmp_path / "f.h5", cluster="local:1", shard=(1, 2), **KW)


@pytest.mark.slow
def test_an_address_dask_cannot_parse_exits_cleanly(images, tmp_path):
    res = _cli("embed", images, "-o", tmp_path / "f.h5", "--cluster", "bogus", "-q")
    assert res.returncode == 1, res.stderr
    assert "--cluster bogus is not a cluster address (missing port number" in res.stderr
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr
