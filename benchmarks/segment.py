"""Segmentation probe benchmark (issue 25): featurecache ``segment`` beside the hand-written
practitioner script (``benchmarks/dense_practitioner.py``: per-cell LogisticRegression,
GridSearchCV over C x class_weight, GroupKFold by image, 30,000 cells), in one run, on the
same feature file and the same five probes (stage2, stage3, stage4, stage5 and the
stage3+stage4+stage5 hypercolumn).

Each contender runs as its own process (a command a user types), timed by wall clock, its
peak RSS read from ``wait4``. Printed: test mIoU per probe of both (featurecache must be
within 0.01 or above), the chosen parameters, the wall times and their ratio, and then the
default ``featurecache segment`` (every map, the auto hypercolumns, logreg and k-NN).

    python benchmarks/segment.py [FILE.h5] [--skip-default]

Without FILE, ``../shared/data/clipart_scenes`` is embedded first (``--keep-map
stage2,stage3,stage4,stage5``; not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENES = HERE.parent.parent / "shared" / "data" / "clipart_scenes"
PROBES = ["stage2", "stage3", "stage4", "stage5", "stage3+stage4+stage5"]


def run_peak(cmd: list) -> tuple:
    """``(stdout, wall seconds, peak RSS MiB)``: the command run under ``wait4``."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if p.returncode:
            sys.exit(f"{' '.join(map(str, cmd))} failed:\n{err.read()[-3000:]}")
        return out.read(), wall, usage.ru_maxrss / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?")
    ap.add_argument("--skip-default", action="store_true")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fc-seg-bench-"))
    path = args.path
    if not path:
        path = str(tmp / "s.h5")
        subprocess.run([sys.executable, "-m", "featurecache.cli", "embed", str(SCENES), "-o", path,
                        "--keep-map", "stage2,stage3,stage4,stage5", "-q"], check=True)
    print(f"# {platform.node()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}; {path}")

    out, p_wall, p_rss = run_peak([sys.executable, str(HERE / "dense_practitioner.py"), path,
                                   "--layers", ",".join(PROBES), "--n-jobs", "-1"])
    prac = {"+".join(d["layers"]): d for d in map(json.loads, out.splitlines())}

    rep = tmp / "rep"
    _, f_wall, f_rss = run_peak([sys.executable, "-m", "featurecache.cli", "segment", path,
                                 "-o", str(rep), "-q", "--heads", "logreg",
                                 "--layers", ",".join(p for p in PROBES if "+" not in p),
                                 "--hypercolumn", ",".join(p for p in PROBES if "+" in p)])
    ours = {r["layer"]: r for r in json.loads((rep / "results.json").read_text())["rows"]}

    print(f"{'probe':<22} {'practitioner':>12} {'featurecache':>12} {'diff':>7}  "
          f"{'chosen (practitioner | featurecache)'}")
    worst = 1.0
    for p in PROBES:
        a, b = prac[p], ours[p]
        worst = min(worst, b["miou"] - a["miou"])
        print(f"{p:<22} {a['miou']:12.4f} {b['miou']:12.4f} {b['miou'] - a['miou']:+7.4f}  "
              f"C={a['C']} cw={a['class_weight']} ({a['seconds']:.0f} s) | "
              f"C={b['params']['C']} cw={b['params']['class_weight']} ({b['seconds']:.0f} s)")
    print(f"wall: practitioner {p_wall:.1f} s (peak RSS {p_rss:.0f} MiB), featurecache "
          f"{f_wall:.1f} s (peak RSS {f_rss:.0f} MiB): practitioner / featurecache = "
          f"{p_wall / f_wall:.2f}; worst mIoU difference {worst:+.4f}")
    result = {"practitioner_s": p_wall, "featurecache_s": f_wall, "ratio": p_wall / f_wall,
              "practitioner_rss_mib": p_rss, "featurecache_rss_mib": f_rss,
              "worst_miou_diff": worst,
              "miou": {p: [prac[p]["miou"], ours[p]["miou"]] for p in PROBES}}
    if not args.skip_default:
        rep2 = tmp / "rep2"
        _, d_wall, d_rss = run_peak([sys.executable, "-m", "featurecache.cli", "segment", path,
                                     "-o", str(rep2), "-q"])
        data = json.loads((rep2 / "results.json").read_text())
        w = data["winner"]
        print(f"default `featurecache segment` ({len(data['rows'])} rows: every map, auto "
              f"hypercolumns, logreg + knn): {d_wall:.1f} s, peak RSS {d_rss:.0f} MiB; winner "
              f"{w['layer']} {w['head']} (CV {w['cv_score']:.3f}, test mIoU {w['miou']:.3f})")
        for r in data["rows"]:
            print(f"  {r['layer']:<22} {r['head']:<6} CV {r['cv_score']:.3f} mIoU "
                  f"{r['miou']:.3f} ({r['seconds']:.0f} s)")
        result.update(default_s=d_wall, default_rss_mib=d_rss, default_winner=w["layer"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
