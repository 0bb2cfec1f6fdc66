"""Data at URLs, against a real S3-compatible server: moto's server mode on 127.0.0.1 (a free
port), started and stopped here; no traffic to any other address. Loose images in a bucket
embed to the rows of the same images in a local folder; a manifest of URLs and a manifest
at a URL too; a missing object and a damaged one are skipped inputs named by URL; a
transient error (a proxy in front of the server answers the first requests 503 SlowDown, or
cuts a body short) is absorbed by a retry and counted; a wrong endpoint or refused
credentials are one line from the console script; credentials are never recorded."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from .conftest import make_folder, make_image
from .test_tar import same_images  # noqa: F401 (a fixture)

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

SECRET = "s3cr3t-Value-never-recorded"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """Test credentials, and nothing of this machine's: no ~/.aws files, no profile, no
    instance metadata (which would be traffic to another address)."""
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    from featurecache.data import remote

    monkeypatch.setattr(remote, "BACKOFF", 0.01)  # the retries' waits, short in tests


@pytest.fixture(scope="module")
def server():
    """moto's S3 on 127.0.0.1 at a free port: its endpoint URL."""
    s = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s.start()
    host, port = s.get_host_and_port()
    assert host == "127.0.0.1"
    yield f"http://127.0.0.1:{port}"
    s.stop()


def _client(endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def bucket(server):
    """A new, empty bucket on the server (each test its own): ``(name, client)``."""
    name = f"fc-{uuid.uuid4().hex[:12]}"
    c = _client(server)
    c.create_bucket(Bucket=name)
    return name, c


def _upload(c, bucket, folder: Path, prefix: str) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            c.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(folder).as_posix()}")


def _embed(source, out, bb, **kw):
    from featurecache import embed

    return embed(source, out, backbone=bb, layers=["blocks.5", "avgpool"], num_workers=0,
                 progress=False, **kw)


def _rows(path, root: str):
    """The file's rows keyed by the id relative to ``root``: {rel: (label, split, features)}."""
    from featurecache import open_features

    f = open_features(path)
    X = {layer: f.X(layer) for layer in ("blocks.5", "avgpool")}
    y, splits, out = f.y(), f.splits(), {}
    for i, p in enumerate(f.paths()):
        assert p.startswith(root), (p, root)
        rel = p[len(root):].lstrip("/").replace(os.sep, "/")
        out[rel] = (f.classes[y[i]], splits[i], {k: v[i] for k, v in X.items()})
    return out, f


def _same_rows(a, b) -> None:
    assert sorted(a) == sorted(b)
    assert list(a) == list(b), "rows in another order"
    for k in a:
        assert a[k][:2] == b[k][:2], k
        for layer in a[k][2]:
            np.testing.assert_array_equal(a[k][2][layer], b[k][2][layer])


@pytest.mark.slow
def test_a_bucket_of_loose_images_embeds_to_the_rows_of_the_same_local_folder(
        server, bucket, tiny_backbone, tmp_path):
    name, c = bucket
    local = make_folder(tmp_path / "imgs", 4)
    (local / ".DS_Store").write_bytes(b"junk")
    (local / "red" / "notes.txt").write_text("not an image")
    _upload(c, name, local, "photos")
    url = f"s3://{name}/photos/"
    so = {"endpoint_url": server}

    r_local = _embed(str(local), tmp_path / "local.h5", tiny_backbone)
    r_url = _embed(url, tmp_path / "url.h5", tiny_backbone, storage_options=so)
    assert (r_url.n_rows, r_url.n_skipped) == (r_local.n_rows, 0) == (12, 0)
    assert r_url.ignored == r_local.ignored == {"hidden or system entries": 1,
                                                 "files that are not images": 1}
    a, fa = _rows(tmp_path / "local.h5", str(local.resolve()))
    b, fb = _rows(tmp_path / "url.h5", f"s3://{name}/photos")
    _same_rows(a, b)
    assert all(p.startswith(f"s3://{name}/photos/") for p in fb.paths())  # ids are the URLs
    p = fb.provenance
    assert p["data_root"] == f"s3://{name}/photos" and p["data_kind"] == "folder"
    assert f"--storage-options '{{\"endpoint_url\": \"{server}\"}}'" in p["rebuild"]
    assert p["rebuild"].split()[2] == url

    # the fingerprint is the stamps' (size:ETag): a rewritten object changes it, and the
    # same command refuses to resume into a file of other data
    from featurecache.data import open_source

    before = open_source(url, storage_options=so)
    assert all(r.stamp.split(":")[0].isdigit() and len(r.stamp) > 20 for r in before.records)
    make_image(tmp_path / "x.png", (1, 2, 3), seed=9)
    c.upload_file(str(tmp_path / "x.png"), name, "photos/red/red_0.png")
    assert open_source(url, storage_options=so).fingerprint() != before.fingerprint()


def test_split_folders_at_a_url(server, bucket, tmp_path):
    from featurecache.data import open_source

    name, c = bucket
    for split in ("train", "test"):
        make_folder(tmp_path / "s" / split, 2)
    _upload(c, name, tmp_path / "s", "data")
    src = open_source(f"s3://{name}/data", storage_options={"endpoint_url": server})
    assert src.kind == "split-folders" and src.split_origin == "given"
    assert sorted({r.split for r in src.records}) == ["test", "train"]
    assert len(src.records) == 12 and src.classes == ["blue", "green", "red"]


@pytest.mark.slow
def test_a_manifest_of_urls_and_a_manifest_at_a_url(server, bucket, tiny_backbone, tmp_path):
    name, c = bucket
    local = make_folder(tmp_path / "imgs", 3)
    _upload(c, name, local, "m/images")
    so = {"endpoint_url": server}
    rel = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.png"))
    lines = ["path,label,split"] + [f"{r},{r.split('/')[0]},{'test' if r.endswith('_0.png') else 'train'}"
                                    for r in rel]
    (local / "manifest.csv").write_text("\n".join(lines) + "\n")
    urls = ["path,label,split"] + [f"s3://{name}/m/images/{line}" for line in lines[1:]]
    (tmp_path / "urls.csv").write_text("\n".join(urls) + "\n")
    c.put_object(Bucket=name, Key="m/images/manifest.csv",
                 Body=(local / "manifest.csv").read_bytes())  # relative paths, at a URL

    _embed(str(local / "manifest.csv"), tmp_path / "local.h5", tiny_backbone)
    _embed(str(tmp_path / "urls.csv"), tmp_path / "urls.h5", tiny_backbone, storage_options=so)
    _embed(f"s3://{name}/m/images/manifest.csv", tmp_path / "at.h5", tiny_backbone,
           storage_options=so)
    a, _ = _rows(tmp_path / "local.h5", str(local.resolve()))
    b, fb = _rows(tmp_path / "urls.h5", f"s3://{name}/m/images")
    d, fd = _rows(tmp_path / "at.h5", f"s3://{name}/m/images")
    _same_rows(a, b)
    _same_rows(a, d)
    assert fb.provenance["data_kind"] == fd.provenance["data_kind"] == "manifest"
    assert fd.provenance["data_root"] == f"s3://{name}/m/images/manifest.csv"


@pytest.mark.slow
def test_a_missing_object_and_a_damaged_one_are_skipped_inputs_named_by_url(
        server, bucket, tiny_backbone, tmp_path):
    from featurecache import open_features
    from featurecache.errors import DataError, DataWarning

    name, c = bucket
    local = make_folder(tmp_path / "imgs", 3)
    (local / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _upload(c, name, local, "p")
    so = {"endpoint_url": server}
    gone = f"s3://{name}/p/green/green_9.png"
    rows = ["path,label"] + [f"s3://{name}/p/{p.relative_to(local).as_posix()},"
                             f"{p.parent.name}" for p in sorted(local.rglob("*.png"))]
    (tmp_path / "m.csv").write_text("\n".join(rows + [f"{gone},green"]) + "\n")

    with pytest.warns(DataWarning, match="1 of 11 objects do not exist: " + gone):
        r = _embed(str(tmp_path / "m.csv"), tmp_path / "m.h5", tiny_backbone,
                   storage_options=so)
    assert (r.n_rows, r.n_skipped) == (9, 2)
    skipped = dict((p, why) for p, why in open_features(tmp_path / "m.h5").skipped())
    assert skipped[gone] == "object not found"
    assert "cannot decode image" in skipped[f"s3://{name}/p/red/broken.png"]

    r = _embed(f"s3://{name}/p/", tmp_path / "f.h5", tiny_backbone, storage_options=so)
    assert (r.n_rows, r.n_skipped) == (9, 1)
    with pytest.raises(DataError, match=f"s3://{name}/p/red/broken.png: cannot decode"):
        _embed(f"s3://{name}/p/", tmp_path / "fail.h5", tiny_backbone, storage_options=so,
               on_error="fail")


class _FlakyProxy:
    """A reverse proxy on 127.0.0.1 in front of the server: the first ``fail`` GETs of an
    object are answered 503 SlowDown (as S3 answers under load), or, in ``cut`` mode, with
    half the body and the connection closed. Everything else passes through."""

    def __init__(self, upstream: str, fail: int, cut: bool = False):
        self.upstream = upstream.split("//")[1]
        self.left, self.cut, self.failed, self.lock = fail, cut, 0, threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                is_object = self.command == "GET" and "list-type" not in self.path and \
                    self.path.split("?")[0].count("/") >= 2
                with proxy.lock:
                    fail = is_object and proxy.left > 0
                    proxy.left -= fail
                    proxy.failed += fail
                if fail and not proxy.cut:
                    msg = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                           b"<Message>Please reduce your request rate.</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length",
                                         "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", resp.getheader("Content-Length", "0")
                                 if self.command == "HEAD" else str(len(data)))
                if fail:  # cut: promise the whole body, send half, hang up
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.slow
def test_a_transient_error_is_absorbed_by_a_retry_and_counted(server, bucket, tiny_backbone,
                                                              tmp_path):
    name, c = bucket
    local = make_folder(tmp_path / "imgs", 3)
    _upload(c, name, local, "p")
    _embed(str(local), tmp_path / "local.h5", tiny_backbone)
    proxy = _FlakyProxy(server, fail=3)
    try:
        r = _embed(f"s3://{name}/p", tmp_path / "url.h5", tiny_backbone,
                   storage_options={"endpoint_url": proxy.url})
    finally:
        proxy.close()
    assert proxy.failed == 3 and r.retries == 3 and (r.n_rows, r.n_skipped) == (9, 0)
    a, _ = _rows(tmp_path / "local.h5", str(local.resolve()))
    b, _ = _rows(tmp_path / "url.h5", f"s3://{name}/p")
    _same_rows(a, b)


def test_a_stream_cut_short_is_reopened_at_its_offset(server, bucket):
    from featurecache.data import remote

    name, c = bucket
    data = os.urandom(300_000)
    c.put_object(Bucket=name, Key="big.bin", Body=data)
    proxy = _FlakyProxy(server, fail=1, cut=True)
    try:
        before = remote.retries()
        with remote.open_binary(f"s3://{name}/big.bin", {"endpoint_url": proxy.url}) as f:
            got = b"".join(iter(lambda: f.read(65536), b""))
    finally:
        proxy.close()
    assert got == data and proxy.failed == 1 and remote.retries() == before + 1


def test_retries_are_bounded(server, bucket):
    from featurecache.data import remote

    name, c = bucket
    c.put_object(Bucket=name, Key="a.bin", Body=b"abc")
    proxy = _FlakyProxy(server, fail=100)
    try:
        with pytest.raises(remote.RemoteError, match=f"s3://{name}/a.bin: .*after "
                                                     f"{remote.ATTEMPTS} tries"):
            remote.read_bytes(f"s3://{name}/a.bin", {"endpoint_url": proxy.url})
    finally:
        proxy.close()
    assert proxy.failed == remote.ATTEMPTS


def _cli(*args, cwd, **env):
    return subprocess.run([sys.executable, "-m", "featurecache.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FEATURECACHE_REMOTE_BACKOFF": "0.01", **env})


def _one_error_line(r) -> str:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, r.stderr
    assert SECRET not in r.stderr + r.stdout
    return errors[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_wrong_endpoint_is_one_line_from_the_console_script(server, bucket, tmp_path):
    name, c = bucket
    c.put_object(Bucket=name, Key="p/a/1.png", Body=b"x")
    dead = f"http://127.0.0.1:{_free_port()}"
    r = _cli("embed", f"s3://{name}/p/", "-o", "f.h5", "--storage-options",
             json.dumps({"endpoint_url": dead, "key": "AKIAX", "secret": SECRET}), cwd=tmp_path)
    line = _one_error_line(r)
    assert f"s3://{name}/p/" in line and f"cannot reach the store at {dead}" in line
    assert not (tmp_path / "f.h5").exists()

    r = _cli("embed", f"s3://{name}/p/", "-o", "f.h5", "--storage-options",
             '{"endpoint_url": ' + SECRET, cwd=tmp_path)  # not JSON: the value is never echoed
    assert r.returncode == 2 and "--storage-options" in r.stderr and SECRET not in r.stderr


@pytest.mark.slow
def test_refused_credentials_are_one_line_and_never_shown(server, bucket, tmp_path):
    name, c = bucket
    c.put_object(Bucket=name, Key="p/a/1.png", Body=b"x")

    def auth(count: str):  # moto's switch: check every request's key from now on, or not
        req = urllib.request.Request(f"{server}/moto-api/reset-auth", data=count.encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req).read()

    auth("0")
    try:
        r = _cli("embed", f"s3://{name}/p/", "-o", "f.h5", "--storage-options",
                 json.dumps({"endpoint_url": server}), cwd=tmp_path,
                 AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG", AWS_SECRET_ACCESS_KEY=SECRET)
    finally:
        auth("inf")
    line = _one_error_line(r)
    assert f"s3://{name}/p/: the store at {server} refused the credentials" in line
    assert "AKIAWRONGWRONGWRONG" not in r.stderr


def test_credentials_in_storage_options_are_never_recorded(server, bucket, tiny_backbone,
                                                          tmp_path):
    from featurecache import open_features

    name, c = bucket
    _upload(c, name, make_folder(tmp_path / "imgs", 3), "p")
    so = {"endpoint_url": server, "key": "AKIAKEYKEYKEY", "secret": SECRET,
          "client_kwargs": {"region_name": "us-east-1", "aws_session_token": SECRET + "2"}}
    _embed(f"s3://{name}/p", tmp_path / "f.h5", tiny_backbone, storage_options=so)
    raw = (tmp_path / "f.h5").read_bytes()
    assert SECRET.encode() not in raw and b"AKIAKEYKEYKEY" not in raw
    rebuild = open_features(tmp_path / "f.h5").provenance["rebuild"]
    assert json.dumps({"client_kwargs": {"region_name": "us-east-1"},
                       "endpoint_url": server}, sort_keys=True) in rebuild

    from featurecache.data.remote import public_options, scrub

    assert public_options(so) == {"endpoint_url": server,
                                  "client_kwargs": {"region_name": "us-east-1"}}
    assert scrub(f"x {SECRET} y AKIAKEYKEYKEY", so) == "x *** y ***"


def test_storage_options_from_a_pipeline_table(tmp_path):
    from featurecache.pipeline import _embed_kwargs, load_pipeline

    plan = load_pipeline(text='[data]\nroot = "s3://bucket/photos/"\n'
                              '[data.storage_options]\nendpoint_url = "http://127.0.0.1:9"\n')
    assert plan.config["data"]["root"] == "s3://bucket/photos/"
    assert _embed_kwargs(plan.config)["storage_options"] == {"endpoint_url": "http://127.0.0.1:9"}
    plan = load_pipeline(text='[data]\nroot = "builtin:digits"\n')
    assert _embed_kwargs(plan.config)["storage_options"] is None


def test_brace_patterns():
    from featurecache.data.remote import expand_braces

    assert expand_braces("s3://b/train-{0000..0002}.tar") == \
        [f"s3://b/train-000{i}.tar" for i in range(3)]
    assert expand_braces("{train,test}-{8..10}") == \
        ["train-8", "train-9", "train-10", "test-8", "test-9", "test-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("a{b}c") == ["a{b}c"]


def test_local_paths_read_alike(tmp_path):
    from featurecache.data import remote
    from featurecache.data.folders import stamp

    p = tmp_path / "x.bin"
    p.write_bytes(b"hello")
    assert remote.stat(str(p)) == stamp(str(p))
    with remote.open_binary(str(p)) as f:
        assert f.read() == b"hello"
    assert remote.read_bytes(str(p)) == b"hello"
    assert remote.stats([str(p), str(tmp_path / "none")]) == [stamp(str(p)), ""]
    assert not remote.is_url(str(p)) and remote.is_url("s3://b/k") and remote.is_url("file:///x")


def test_importing_featurecache_imports_no_fsspec():
    code = ("import sys, featurecache, featurecache.data, featurecache.data.remote; "
            "print('fsspec' in sys.modules, 's3fs' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.slow
def test_the_issue_command_on_tars_in_a_bucket_equals_the_folder(server, bucket, tmp_path):
    """Issue 24's interface, as a user types it: the console script embeds
    ``s3://BUCKET/shards/{train,test}-{0000..0001}.tar`` from the local server (credentials
    from AWS_* in the environment) into the rows of the same images in a local split folder:
    each row's path SHARD_URL#KEY for FOLDER/SPLIT/KEY.EXT, in the folder's order within each
    split (the shards' pattern puts train before test), the same labels, splits and values.
    Both embeds are the console script in a fresh process (an embed in this test session's
    process runs in whatever torch state earlier tests left)."""
    from featurecache import open_features

    from .test_tar import split_folder_and_tars

    name, c = bucket
    folder, tars = split_folder_and_tars(tmp_path, per_class=4)  # 3 images a shard
    for tar in tars:
        c.upload_file(str(tar), name, f"shards/{tar.name}")

    pattern = f"s3://{name}/shards/{{train,test}}-{{0000..0001}}.tar"
    r = _cli("embed", pattern, "--storage-options", json.dumps({"endpoint_url": server}),
             "-o", "f.h5", "--layer", "avgpool", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote " in r.stdout and "12 rows x 1 layers (avgpool[1280]), 0 skipped" in r.stdout
    r = _cli("embed", str(folder), "-o", "folder.h5", "--layer", "avgpool", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    tars, local = open_features(tmp_path / "f.h5"), open_features(tmp_path / "folder.h5")
    order = {"train": 0, "test": 1}  # the pattern's order of the splits
    at = sorted(range(local.n_rows), key=lambda i: order[local.splits()[i]])  # stable
    shards = [f"s3://{name}/shards/{s}-{n:04d}.tar" for s in ("train", "test") for n in range(2)]
    assert [p.split("#")[0] for p in tars.paths()] == [u for u in shards for _ in range(3)]
    assert [p.split("#")[1] for p in tars.paths()] == \
        [os.path.splitext(os.path.relpath(local.paths()[i], folder))[0].split("/", 1)[1]
         for i in at]
    assert tars.classes == local.classes == ["blue", "green", "red"]
    assert list(tars.splits()) == [local.splits()[i] for i in at]
    np.testing.assert_array_equal(tars.y(), local.y()[at])
    np.testing.assert_array_equal(tars.X("avgpool"), local.X("avgpool")[at])
    p = tars.provenance
    assert p["data_kind"] == "tar" and p["data_root"] == pattern
    assert f"--storage-options '{{\"endpoint_url\": \"{server}\"}}'" in p["rebuild"]
    assert "testing" not in json.dumps(p)  # the key from the environment is not recorded


@pytest.mark.slow
def test_a_clustered_embed_of_tars_in_a_bucket_resumes_after_a_killed_worker(
        server, bucket, same_images, tmp_path):  # noqa: F811
    """``--cluster local:2`` over tar shards on the local server: one task per tar (each
    output shard holds one input tar, streamed by its worker from the store), a worker
    SIGKILLed in the middle of a tar, its task run again from the committed rows; the joined
    file equals a one-process embed of the same URLs."""
    from featurecache import embed, open_features
    from featurecache.cluster import shard_paths

    from .test_cluster import assert_as_one_process
    from .test_tar import CLUSTER_KW, kill_a_worker_mid_tar

    name, c = bucket
    _, pattern = same_images
    for tar in sorted(Path(pattern).parent.glob("*.tar")):
        c.upload_file(str(tar), name, f"shards/{tar.name}")
    url = f"s3://{name}/shards/{{test,train}}-{{0000..0001}}.tar"
    kw = {**CLUSTER_KW, "batch_size": 1, "storage_options": {"endpoint_url": server}}
    ref, out = tmp_path / "one.h5", tmp_path / "cluster.h5"
    embed(url, ref, **kw)
    assert kill_a_worker_mid_tar(url, out, (3, 3, 6, 6), **kw).n_rows == 18
    shards = [f"s3://{name}/shards/{s}-{n:04d}.tar" for s in ("test", "train") for n in range(2)]
    for part, shard in zip(shard_paths(out, 4), shards):
        assert {p.split("#")[0] for p in open_features(part).paths()} == {shard}
    assert_as_one_process(ref, out)
