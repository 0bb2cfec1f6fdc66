"""The Dask engine's cost: the same images embedded by plain ``embed`` and by
``embed(cluster="local:2")`` on the same cores, measured in one run.

Reports:
* overhead = clustered wall / plain wall, whole calls (cluster start, client listing and
  backbone load, shard files, join included); target <= 1.10;
* the fixed cost of one shard, from two clustered runs that differ only in the shard count:
  2 workers run the shards, so each extra shard costs about 2 x (wall difference) / (extra
  shards) of wall; and directly: backbone load + file creation + one image, in one process;
* from those, how many images a shard needs so that fixed costs stay under 2% of its time,
  for a GPU at a given img/s (``--gpu-rate``: an assumption unless measured on a GPU).

    python benchmarks/cluster.py [--data ../shared/data/clipart10] [--n 1600]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from featurecache import embed
from featurecache.data import open_source

LAYERS = ["blocks.5", "blocks.10", "head", "avgpool"]
BATCH = 16
SPLIT = (lambda i: "train" if i % 10 else "test")  # compare needs a test split


def manifest(records, classes, n, path: Path) -> Path:
    """A CSV of n rows cycling over the data set's images; beyond its size, the images are
    copied under new names (a manifest lists each file once)."""
    copies = path.with_suffix("")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for i in range(n):
            r = records[i % len(records)]
            p = r.path
            if i >= len(records):
                copies.mkdir(exist_ok=True)
                p = copies / f"{i}{Path(r.path).suffix}"
                shutil.copyfile(r.path, p)
            w.writerow([p, classes[r.label], SPLIT(i) if SPLIT else "train"])
    return path


def timed(**kw) -> float:
    t = time.perf_counter()
    embed(layers=LAYERS, batch_size=BATCH, progress=False, overwrite=True, **kw)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/clipart10"))
    ap.add_argument("--n", type=int, default=1600)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--gpu-rate", type=float, default=2000.0,
                    help="img/s of one GPU for the sizing note (an assumption here)")
    args = ap.parse_args()
    src = open_source(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="fc-cluster-"))
    data = manifest(src.records, src.classes, args.n, tmp / "data.csv")
    one = manifest(src.records, src.classes, 2, tmp / "one.csv")

    plain = timed(source=data, output=tmp / "plain.h5")
    clustered = timed(source=data, output=tmp / "cluster.h5", cluster="local:2",
                      shards=args.shards)
    more = 4 * args.shards
    clustered_more = timed(source=data, output=tmp / "cluster_more.h5", cluster="local:2",
                           shards=more)
    per_shard_slope = 2 * (clustered_more - clustered) / (more - args.shards)
    direct = timed(source=one, output=tmp / "one.h5", shard=(0, 2))  # 1 image: load + file
    per_image = plain / args.n
    fixed = max(direct, 0.0)
    report = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores, torch {torch.__version__}, cpu",
        "date": time.strftime("%Y-%m-%d"), "images": args.n, "layers": LAYERS,
        "plain_s": round(plain, 2), "plain_img_s": round(args.n / plain, 1),
        f"cluster_local2_{args.shards}_shards_s": round(clustered, 2),
        f"cluster_local2_{more}_shards_s": round(clustered_more, 2),
        "overhead": round(clustered / plain, 3),
        "fixed_cost_per_shard_s_from_slope": round(per_shard_slope, 2),
        "fixed_cost_per_shard_s_direct": round(fixed, 2),
        "images_per_shard_for_2pct_on_this_cpu": round(fixed / (0.02 * per_image)),
        "images_per_shard_for_2pct_at_gpu_rate": round(fixed * args.gpu_rate / 0.02),
        "gpu_rate_assumed_img_s": args.gpu_rate,
    }
    print(json.dumps(report, indent=1))
    print(f"\noverhead (clustered / plain) = {report['overhead']} (target <= 1.10); fixed cost "
          f"per shard {report['fixed_cost_per_shard_s_direct']} s (direct) / "
          f"{report['fixed_cost_per_shard_s_from_slope']} s (slope)")


if __name__ == "__main__":
    main()
