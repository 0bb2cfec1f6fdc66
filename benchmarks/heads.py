"""Heads-stage timings (issue 4), measured in one run.

1. The two-stage search (19 grid points x 5 folds, then refit) for logreg and linear SVM on
   synthetic 20,000 x 1,280 float16 features with 10 classes.
2. ``compare`` over 5 layers x 2 heads on a shared data set embedded with EfficientNet-Lite0.

    python benchmarks/heads.py [--rows 20000] [--data ../shared/data/clipart10] [--n-jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import sklearn

from featurecache import embed
from featurecache.heads import search
from featurecache.report import compare

LAYERS = ["stem", "stage2", "stage3", "stage4", "avgpool"]


def synthetic(rows: int, dim: int = 1280, classes: int = 10, seed: int = 0):
    """Class-dependent means in a random 64-d subspace plus isotropic noise (float16)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    basis = rng.normal(0, 1, (64, dim)) / 100  # hard enough that C matters (~0.7 accuracy)
    centers = rng.normal(0, 1, (classes, 64))
    X = centers[y] @ basis + rng.normal(0, 1, (rows, dim))
    return X.astype(np.float16), y


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--svm-rows", type=int, default=None,
                    help="rows for the SVM search (default: --rows); LinearSVC's cost grows fast with C")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/clipart10"))
    ap.add_argument("--n-jobs", type=int, default=os.cpu_count())
    ap.add_argument("--skip-search", action="store_true", help="only the compare timing")
    args = ap.parse_args()
    out = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                      f"scikit-learn {sklearn.__version__}",
           "date": time.strftime("%Y-%m-%d"), "rows": args.rows, "n_jobs": args.n_jobs}
    out["svm_rows"] = args.svm_rows or args.rows
    X, y = synthetic(max(args.rows, out["svm_rows"]))
    for kind in () if args.skip_search else ("logreg", "svm"):
        n = args.rows if kind == "logreg" else out["svm_rows"]
        t = time.perf_counter()
        _, params, score, table = search(X[:n], y[:n], kind, n_jobs=args.n_jobs)
        out[f"search_{kind}_s"] = round(time.perf_counter() - t, 1)
        out[f"search_{kind}_best"] = {**params, "cv_accuracy": round(score, 4), "points": len(table)}
        print(kind, out[f"search_{kind}_s"], "s", out[f"search_{kind}_best"], flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="fc-heads-"))
    t = time.perf_counter()
    r = embed(args.data, tmp / "f.h5", layers=LAYERS, progress=False)
    out["embed_s"] = round(time.perf_counter() - t, 1)
    out["embed_rows"] = r.n_rows
    t = time.perf_counter()
    res = compare(tmp / "f.h5", tmp / "report", heads=["logreg", "svm"], n_jobs=args.n_jobs,
                  progress=False)
    out["compare_5x2_s"] = round(time.perf_counter() - t, 1)
    out["compare_winner"] = f"{res.winner['layer']} {res.winner['head']} " \
                            f"bal.acc {res.winner['balanced_accuracy']:.3f}"
    out["compare_rows"] = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                            if k in ("layer", "head", "balanced_accuracy", "fit_seconds")}
                           for row in res.rows]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
