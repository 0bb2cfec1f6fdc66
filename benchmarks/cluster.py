"""The Dask engine's cost: the same images embedded by ``featurecache embed`` and by
``featurecache embed --cluster local:2`` on the same cores, whole commands, in one run.

Reports:
* overhead = clustered wall / plain wall (process start, cluster start, listing and backbone
  load in the client, shard files, join: all included); target <= 1.10;
* the fixed cost of one shard, from two clustered runs that differ only in the shard count
  (2 workers share the shards, so each extra shard costs about 2 x wall difference / extra
  shards), and directly: a plain embed of 2 images (process start, backbone load, file);
* from those, the images a shard needs so that fixed costs stay under 2% of its time, on this
  CPU and for a GPU at ``--gpu-rate`` img/s (an assumption unless measured on a GPU).

    python benchmarks/cluster.py [--data ../shared/data/clipart10] [--n 1600]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from manifests import manifest  # benchmarks/manifests.py

from featurecache.data import open_source

LAYERS = "blocks.5,blocks.10,head,avgpool"


def timed(*args) -> float:
    t = time.perf_counter()
    subprocess.run(["featurecache", "embed", *map(str, args), "--layer", LAYERS, "-q"],
                   check=True, stdout=subprocess.DEVNULL)
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
    data = manifest(src.records, src.classes, args.n, tmp / "data.csv",
                    split=lambda i: "train" if i % 10 else "test")
    two = [next(r for r in src.records if r.label == c) for c in (0, 1)]
    small = manifest(two, src.classes, 2, tmp / "two.csv",
                     split=lambda i: "train" if i % 10 else "test")

    plain = timed(data, "-o", tmp / "plain.h5")
    print(f"plain: {plain:.1f} s", flush=True)
    clustered = timed(data, "-o", tmp / "c.h5", "--cluster", "local:2", "--shards", args.shards)
    print(f"clustered, {args.shards} shards: {clustered:.1f} s", flush=True)
    more = 4 * args.shards
    clustered_more = timed(data, "-o", tmp / "c4.h5", "--cluster", "local:2", "--shards", more)
    print(f"clustered, {more} shards: {clustered_more:.1f} s", flush=True)
    slope = 2 * (clustered_more - clustered) / (more - args.shards)
    direct = timed(small, "-o", tmp / "two.h5")
    per_image = plain / args.n
    report = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores, torch {torch.__version__}, cpu",
        "date": time.strftime("%Y-%m-%d"), "images": args.n, "layers": LAYERS,
        "plain_s": round(plain, 2), "plain_img_s": round(args.n / plain, 1),
        f"cluster_local2_{args.shards}_shards_s": round(clustered, 2),
        f"cluster_local2_{more}_shards_s": round(clustered_more, 2),
        "overhead": round(clustered / plain, 3),
        "fixed_cost_per_shard_s_from_slope": round(slope, 2),
        "fixed_cost_per_shard_s_direct": round(direct, 2),
        "images_per_shard_for_2pct_on_this_cpu": round(max(slope, direct) / (0.02 * per_image)),
        "images_per_shard_for_2pct_at_gpu_rate": round(max(slope, direct) * args.gpu_rate / 0.02),
        "gpu_rate_assumed_img_s": args.gpu_rate,
    }
    print(json.dumps(report, indent=1))
    print(f"\noverhead (clustered / plain) = {report['overhead']} (target <= 1.10); fixed cost "
          f"per shard {report['fixed_cost_per_shard_s_from_slope']} s (slope), "
          f"{report['fixed_cost_per_shard_s_direct']} s (a whole 2-image embed)")


if __name__ == "__main__":
    main()
