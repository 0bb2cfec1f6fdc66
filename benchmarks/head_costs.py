"""The heads that are costly at scale: measured time vs compare's estimate.

``compare`` skips a head kind on a layer when the kind's estimate of its CV search
(:meth:`featurecache.kinds.base.HeadKind.search_minutes`, a cost model fitted on this
benchmark's runs, 2 cores) exceeds ``--max-head-minutes`` (default 10), and says why. The
estimate is of what the head costs compare: this script times the real search
(``featurecache.heads.search``: 5-fold CV, both sweeps and the refit, ``n_jobs=2``) and the
refit head's predictions of a quarter as many test rows (compare's 80 / 20 split), as
compare predicts them, for each such kind at a few sizes of the heads benchmark's
synthetic features, beside the estimate, so the model can be checked (ratio
``estimate / measured``) and refitted on another machine:

* ``svm --kernel rbf``: libsvm's kernel SVM (time grows as rows^2 or faster);
* ``mlp``: scikit-learn's MLP (epochs x rows x widths, early stopped);
* ``knn``: cosine k-NN in blocks (rows^2 x features).

The linear heads (logreg, linear svm) grow linearly in rows and are measured up to 100,000
rows by ``benchmarks/heads.py --scale``; they have no estimate and are never skipped.

    python benchmarks/head_costs.py [--rows 1000,2000,4000] [--kinds rbf,mlp,knn]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import sklearn

from featurecache import kinds
from featurecache.heads import search

from heads import synthetic

KINDS = {"rbf": ("svm", "rbf"), "mlp": ("mlp", "linear"), "knn": ("knn", "linear")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1000,2000,4000", help="training rows, comma-separated")
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--kinds", default="rbf,mlp,knn")
    p.add_argument("--n-jobs", type=int, default=2)
    a = p.parse_args()
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}, n_jobs={a.n_jobs}, dim={a.dim}")
    print("| head | train rows | measured s | estimate s | estimate / measured | CV |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in a.kinds.split(","):
        kind, kernel = KINDS[name]
        for rows in map(int, a.rows.split(",")):
            X, y = synthetic(rows + rows // 4, a.dim)
            X = X.astype(np.float32)
            t = time.perf_counter()
            pipe, params, score, _ = search(X[:rows], y[:rows], kind, kernel, n_jobs=a.n_jobs)
            with sklearn.config_context(working_memory=128):  # as compare predicts
                pipe.predict(X[rows:])
            s = time.perf_counter() - t
            est = kinds.get(kind).search_minutes(rows, a.dim, kernel)
            est = "- | -" if est is None else f"{60 * est:.1f} | {60 * est / s:.2f}"
            print(f"| {name} | {rows:,} | {s:.1f} | {est} | {score:.3f} |", flush=True)


if __name__ == "__main__":
    main()
