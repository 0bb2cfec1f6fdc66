"""Heads on real stored layers against the practitioner's script (issue 22, item 9).

For each shared data set (EfficientNet-Lite0, ImageNet weights; layers stage3, stage4,
avgpool embedded once into a cache folder) and each layer, in one run:

* featurecache: ``fit_head(ff, layer, kind)`` (its CV search on the train split, refit),
  test accuracy and wall time;
* the practitioner: ``GridSearchCV(Pipeline(StandardScaler, LogisticRegression()), C in
  1e-4..1e3 (8 values), cv=5, balanced accuracy, refit)`` with scikit-learn's defaults, and
  the same with ``LinearSVC()`` for the svm head; test accuracy and wall time.

Prints one line per (set, layer, head): both accuracies, the difference (featurecache minus
the script: never below -0.005 is the target) and the time ratio.

    python benchmarks/heads_real.py [--sets clipart10,digits] [--cache DIR] [--n-jobs 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
LAYERS = ["stage3", "stage4", "avgpool"]


def practitioner(kind, X, y, n_jobs):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    clf = LogisticRegression() if kind == "logreg" else LinearSVC()
    grid = GridSearchCV(Pipeline([("s", StandardScaler()), ("c", clf)]),
                        {"c__C": list(np.logspace(-4, 3, 8))}, cv=5,
                        scoring="balanced_accuracy", n_jobs=n_jobs)
    return grid.fit(X.astype(np.float32), y)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="clipart10,digits")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--heads", default="logreg,svm")
    ap.add_argument("--n-jobs", type=int, default=os.cpu_count())
    args = ap.parse_args()
    import featurecache
    from featurecache.heads import fit_head

    warnings.filterwarnings("ignore")
    args.cache.mkdir(exist_ok=True)
    print(f"# {platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    print("set layer head | featurecache test acc, s | script test acc, s | diff | time ratio")
    worst = 0.0
    for name in args.sets.split(","):
        path = args.cache / f"{name}-lite0.h5"
        if not path.exists():
            featurecache.embed(SHARED / name, path, layers=LAYERS, progress=False)
        ff = featurecache.open_features(path)
        Xte_all = {l: ff.X(l, "test") for l in LAYERS}
        y_tr, y_te = ff.y("train"), ff.y("test")
        for layer in LAYERS:
            X_tr = ff.X(layer, "train")
            for kind in args.heads.split(","):
                t = time.perf_counter()
                head = fit_head(ff, layer, kind, n_jobs=args.n_jobs)
                t_fc = time.perf_counter() - t
                acc_fc = float((head.predict(Xte_all[layer]) == y_te).mean())
                t = time.perf_counter()
                ref = practitioner(kind, X_tr, y_tr, args.n_jobs)
                t_ref = time.perf_counter() - t
                acc_ref = float((ref.predict(Xte_all[layer].astype(np.float32)) == y_te).mean())
                worst = min(worst, acc_fc - acc_ref)
                print(f"{name} {layer} {kind} | {acc_fc:.3f}, {t_fc:.1f} | {acc_ref:.3f}, "
                      f"{t_ref:.1f} | {acc_fc - acc_ref:+.3f} | {t_ref / t_fc:.2f}x", flush=True)
    print(f"worst difference (featurecache - script): {worst:+.3f} (target >= -0.005)")


if __name__ == "__main__":
    main()
