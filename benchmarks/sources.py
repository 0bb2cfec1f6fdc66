"""Embed throughput by where the images live: the same N images as loose files in a local
folder, in local webdataset tar shards, and on a local S3 server (moto's, in its own process
on 127.0.0.1) as loose objects and as tar shards; one run, same machine, same backbone.

Each embed is ``featurecache.embed`` end to end (listing, reading, decoding, forward passes,
writing), with the backbone loaded once beforehand and passed in; images/s = rows / the
embed's seconds. Beside it, ``read_img_s``: listing, reading and decoding alone (the
source's dataset through a DataLoader with the same workers and the backbone's transform, no
forward pass), the cost of the format itself, which a slow forward pass on a CPU hides. A
warm-up embed runs first; the page cache holds every file, so the local
rows measure the format, the S3 rows the HTTP round trips of the store's client (s3fs) against
a server on the same machine (no network latency: a real store adds its own). Every file's
rows are checked to be the same images with the same labels, splits and features as the
local folder's, paths aside.

Layout: ``DATA/{train,test}/<class>/<i>.jpg``; the tars hold the same samples in the folder's
row order, ``--per-tar`` per shard, ``train-0000.tar ... test-0000.tar ...``.

    python benchmarks/sources.py [--n 300] [--size 160] [--per-tar 50] [--backbone efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("blue", "green", "red", "yellow")
COLORS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30),
          "yellow": (220, 210, 40)}


def jpeg(color, seed: int, size: int) -> bytes:
    """A small photo-like JPEG: a colour gradient with noise (about 5-15 KB at 160 px)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.6, 1.2, size)[None, :, None] * np.linspace(1.1, 0.7, size)[:, None, None]
    arr = np.clip(np.array(color) * ramp + rng.normal(0, 12, (size, size, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_data(root: Path, n: int, size: int, per_tar: int):
    """The folder and the tars; returns (folder, tar spec, [(split, class, name)] in row order)."""
    folder, shards = root / "folder", root / "shards"
    rows = []
    for i in range(n):
        c = CLASSES[i % len(CLASSES)]
        split = "test" if i % 5 == 0 else "train"
        data = jpeg(COLORS[c], i, size)
        p = folder / split / c / f"{i:05d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        rows.append((split, c, f"{i:05d}", data))
    rows.sort(key=lambda r: (r[0], CLASSES.index(r[1]), r[2]))  # the folder's row order
    shards.mkdir()
    parts = []
    for split in ("test", "train"):
        mine = [r for r in rows if r[0] == split]
        for k in range(0, len(mine), per_tar):
            path = shards / f"{split}-{k // per_tar:04d}.tar"
            with tarfile.open(path, "w") as tf:
                for _, c, name, data in mine[k:k + per_tar]:
                    for ext, body in (("cls", c.encode()), ("jpg", data)):
                        info = tarfile.TarInfo(f"{c}/{name}.{ext}")
                        info.size = len(body)
                        tf.addfile(info, io.BytesIO(body))
            parts.append(path)
    return folder, parts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log: Path):
    """moto's S3 server in its own process on 127.0.0.1 (so that it does not share this
    process's interpreter with the embed loop); returns (process, endpoint)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"moto's server did not start; see {log}")


def test_credentials(tmp: Path) -> None:
    """moto's test credentials, and nothing of this machine's (no ~/.aws, no metadata)."""
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        os.environ.pop(k, None)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                      AWS_CONFIG_FILE=str(tmp / "no-aws-config"),
                      AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-credentials"))


def upload(endpoint: str, folder: Path, tars: list) -> str:
    import boto3

    c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket = "bench"
    c.create_bucket(Bucket=bucket)
    for p in sorted(folder.rglob("*.jpg")):
        c.upload_file(str(p), bucket, f"photos/{p.relative_to(folder).as_posix()}")
    for p in tars:
        c.upload_file(str(p), bucket, f"shards/{p.name}")
    return bucket


def spec_of(tars: list, prefix: str) -> str:
    """``PREFIX/test-{0000..000K}.tar::PREFIX/train-{0000..000M}.tar``."""
    parts = []
    for split in ("test", "train"):
        k = sum(1 for p in tars if p.name.startswith(split + "-"))
        parts.append(f"{prefix}/{split}-{{0000..{k - 1:04d}}}.tar" if k > 1
                     else f"{prefix}/{split}-0000.tar")
    return "::".join(parts)


def read_rate(spec: str, bb, workers: int, batch_size: int, **extra) -> float:
    """Images/s of listing, reading and decoding ``spec`` alone (no forward pass)."""
    import torch

    from featurecache.data import collate, open_source

    t = time.perf_counter()
    src = open_source(spec, **extra)
    loader = torch.utils.data.DataLoader(
        src.dataset(src.records, bb.preprocess.transform(), bb.preprocess.exif),
        batch_size=batch_size, num_workers=workers, collate_fn=collate)
    n = sum(len(b.index) for b in loader)
    assert n == len(src.records), (spec, n)
    return n / (time.perf_counter() - t)


def rows_of(path: Path):
    """{(split, class, name): features} of a feature file, and the row order of the keys."""
    from featurecache import open_features

    f = open_features(path)
    X, y, splits = f.X("avgpool"), f.y(), f.splits()
    keys = []
    for i, p in enumerate(f.paths()):
        name = os.path.splitext(p.rsplit("/", 1)[-1].rsplit("#", 1)[-1])[0]
        keys.append((splits[i], f.classes[y[i]], name))
    return dict(zip(keys, X)), keys


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="images")
    ap.add_argument("--size", type=int, default=160, help="side of each JPEG, pixels")
    ap.add_argument("--per-tar", type=int, default=50, help="samples per tar shard")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="decode workers (embed's default)")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import torch

    from featurecache import embed
    from featurecache.backbones import load_backbone

    tmp = Path(tempfile.mkdtemp(prefix="fc-bench-sources-"))
    test_credentials(tmp)
    folder, tars = make_data(tmp, args.n, args.size, args.per_tar)
    server, endpoint = start_server(tmp / "moto.log")
    try:
        t = time.perf_counter()
        bucket = upload(endpoint, folder, tars)
        upload_s = time.perf_counter() - t
        so = {"endpoint_url": endpoint}
        bb = load_backbone(args.backbone)
        kw = {"backbone": bb, "layers": ["avgpool"], "num_workers": args.workers,
              "batch_size": args.batch_size, "progress": False}
        embed(folder, tmp / "warmup.h5", max_per_class=4, **kw)  # first-call costs
        runs = {
            "local folder (loose files)": (str(folder), {}),
            "local tar shards": (spec_of(tars, str(tmp / "shards")), {}),
            "S3 loose objects": (f"s3://{bucket}/photos/", {"storage_options": so}),
            "S3 tar shards": (spec_of(tars, f"s3://{bucket}/shards"), {"storage_options": so}),
        }
        results, reference = {}, None
        for i, (name, (spec, extra)) in enumerate(runs.items()):
            out = tmp / f"run{i}.h5"
            r = embed(spec, out, **kw, **extra)
            feats, order = rows_of(out)
            if reference is None:
                reference = (feats, order)
            else:  # the same images, labels, splits and values as the folder's rows
                assert sorted(order) == sorted(reference[1]), name
                assert all(np.array_equal(feats[k], reference[0][k]) for k in order), name
            results[name] = {"spec": spec, "rows": r.n_rows, "skipped": r.n_skipped,
                             "seconds": round(r.seconds, 2),
                             "img_s": round(r.n_rows / r.seconds, 1),
                             "retries": getattr(r, "retries", 0),
                             "read_img_s": round(read_rate(spec, bb, args.workers,
                                                           args.batch_size, **extra), 1)}
    finally:
        server.terminate()
        server.wait(10)
    base = results["local folder (loose files)"]
    sizes = [p.stat().st_size for p in folder.rglob("*.jpg")]
    report = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, torch "
                   f"{torch.__version__}, {'cuda' if torch.cuda.is_available() else 'cpu'}",
        "date": time.strftime("%Y-%m-%d"), "images": args.n,
        "jpeg": f"{args.size} px, mean {np.mean(sizes) / 1024:.1f} KiB",
        "tar_shards": len(tars), "per_tar": args.per_tar, "backbone": args.backbone,
        "decode_workers": args.workers, "batch_size": args.batch_size,
        "upload_seconds": round(upload_s, 1), "runs": results,
    }
    print(json.dumps(report, indent=1))
    print()
    for name, r in results.items():
        print(f"{name:<28} embed {r['img_s']:>6.1f} img/s ({r['seconds']:.1f} s, x"
              f"{r['img_s'] / base['img_s']:.2f} of the local folder);  read+decode alone "
              f"{r['read_img_s']:>6.1f} img/s (x{r['read_img_s'] / base['read_img_s']:.2f})")


if __name__ == "__main__":
    main()
