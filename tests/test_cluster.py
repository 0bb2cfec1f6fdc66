"""The clustered embed and compare on a real Dask LocalCluster (2 worker processes, 1 thread
each): equal to one process, surviving a killed worker and a killed client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest


from featurecache import embed, open_features  # noqa: E402
from featurecache.cluster import ClusterError, shard_paths  # noqa: E402
from featurecache.errors import FeaturecacheError  # noqa: E402

from .conftest import make_folder  # noqa: E402
from .test_embed import assert_same_file  # noqa: E402

# the real default backbone, by name (workers load it), at its own 224 px
KW = {"backbone": "efficientnet_lite0", "layers": ["stage3", "avgpool"], "batch_size": 2,
      "num_workers": 0, "progress": False, "keep_map": ["stage3"], "map_size": 7}


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


def test_a_clustered_embed_equals_one_process(images, reference, tmp_path):
    out = tmp_path / "feats.h5"
    r = embed(images, out, cluster="local:2", shards=3, **KW)
    assert r.n_rows == 30 and not r.already_complete
    assert [s.name for s in r.layers] == ["stage3", "avgpool"] and [m.name for m in r.maps] == ["stage3"]
    parts = shard_paths(out, 3)
    assert [p.name for p in parts] == [f"part-0000{i}-of-00003.h5" for i in range(3)]
    assert all(open_features(p).complete for p in parts)
    assert_same_file(reference, out)
    mine, ref = open_features(out), open_features(reference)
    np.testing.assert_allclose(mine.map_rows("stage3", range(30)).astype(np.float32),
                               ref.map_rows("stage3", range(30)).astype(np.float32),
                               rtol=1e-2, atol=1e-2)
    joined, one = mine.provenance, ref.provenance
    assert joined["fingerprint"] == one["fingerprint"] and joined["joined_from"] == 3
    assert joined["rebuild"].split(" -o ")[0] == one["rebuild"].split(" -o ")[0]
    info = subprocess.run([sys.executable, "-m", "featurecache.cli", "info", str(out)],
                          capture_output=True, text=True)
    assert "joined from 3 shards (virtual)" in info.stdout
    again = embed(images, out, cluster="local:2", shards=3, **KW)  # nothing left to do
    assert again.already_complete and again.n_rows == 30


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
    assert_same_file(reference, out)


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
    assert_same_file(reference, out)


def test_compare_on_the_cluster_gives_the_local_table(reference, tmp_path):
    from featurecache.report import compare

    kw = {"heads": ["logreg", "knn"], "cv": 3, "n_boot": 50, "progress": False}
    local = compare(reference, tmp_path / "local", **kw)
    remote = compare(reference, tmp_path / "remote", cluster="local:2", **kw)
    assert local.table() == remote.table()
    np.testing.assert_array_equal(
        [r["cv_score"] for r in local.rows], [r["cv_score"] for r in remote.rows])
    assert local.winner == remote.winner


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
