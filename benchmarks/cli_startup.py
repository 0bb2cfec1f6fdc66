"""CLI start-up and data listing, measured in one run.

(a) ``featurecache --help``, ``--version`` and ``info FILE`` as whole processes (cold imports of
    the package: torch, torchvision, scikit-learn and matplotlib must not be among them), with
    ``python -c pass`` as the floor;
(b) the seeded stratified train/test split of 1,000,000 records (it was quadratic);
(c) listing a folder of images and checking a manifest of the same files (one stat per file).

Targets (issue 13): --help and info under 1 s; the 1,000,000-record split in a few seconds.

    python benchmarks/cli_startup.py [--runs 5] [--files 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd, runs: int) -> dict:
    """Median wall seconds and peak RSS (MiB, read by GNU time) of a whole process, after one
    warm-up."""
    subprocess.run(cmd, capture_output=True, check=True)
    walls, peaks = [], []
    for _ in range(runs):
        t = time.perf_counter()
        res = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True,
                             check=True)
        walls.append(time.perf_counter() - t)
        peaks.append(int(res.stderr.strip().splitlines()[-1]) / 1024)
    return {"median_s": round(statistics.median(walls), 3), "max_s": round(max(walls), 3),
            "peak_mib": round(max(peaks), 1)}


def heavy_imports(args) -> list:
    code = ("import sys, runpy; sys.argv = ['featurecache'] + %r\n"
            "try:\n    runpy.run_module('featurecache.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'sklearn', 'matplotlib', 'h5py')"
            " if m in sys.modules))" % (args,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--files", type=int, default=20000, help="images in the listing test")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fc-startup-"))
    feats = tmp / "f.h5"  # made in a child whose peak memory the children's peak then holds:
    first = {"python -c pass": timed([sys.executable, "-c", "pass"], args.runs)}  # so before it
    subprocess.run([sys.executable, "-m", "featurecache.cli", "embed", "builtin:digits", "-o",
                    str(feats), "--backbone", "resnet18", "--weights", "none",
                    "--max-per-class", "2", "-q", "--workers", "0"], check=True, capture_output=True)
    fc = [sys.executable, "-m", "featurecache.cli"]
    report = {"machine": f"{platform.node()}, {os.cpu_count()} cores, Python "
                         f"{platform.python_version()}", "date": time.strftime("%Y-%m-%d"),
              **first}
    for name, cmd in (("--help", ["--help"]), ("--version", ["--version"]),
                      ("info FILE", ["info", str(feats)])):
        report[name] = {**timed(fc + cmd, args.runs), "heavy imports": heavy_imports(cmd)}

    from featurecache.data.sources import _seeded_split, open_source

    items = [(f"/data/img{i:07d}.jpg", f"class{i % 1000}", None, "") for i in range(1_000_000)]
    t = time.perf_counter()
    _seeded_split(items, 0.3, 0, "bench")
    report["split 1,000,000 records s"] = round(time.perf_counter() - t, 2)

    root = tmp / "imgs"
    src_png = tmp / "one.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(src_png)
    data = src_png.read_bytes()
    for c in range(20):
        (root / f"c{c}").mkdir(parents=True)
    for i in range(args.files):  # separate files: a hard link is refused as the same image
        (root / f"c{i % 20}" / f"{i}.png").write_bytes(data)
    t = time.perf_counter()
    src = open_source(root)
    report[f"list a folder of {args.files:,} images s"] = round(time.perf_counter() - t, 2)
    manifest = tmp / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{r.path},{src.classes[r.label]}\n"
                                                  for r in src.records))
    t = time.perf_counter()
    open_source(manifest)
    report[f"check a manifest of {args.files:,} images s"] = round(time.perf_counter() - t, 2)
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
