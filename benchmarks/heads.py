"""Heads-stage benchmark (issue 10): search speed, same answer, and compare end to end.

Everything is measured in one run, on the same machine, with the same worker pool warmed up
once before the first timing (so no contender pays joblib's start-up alone):

1. Search on synthetic float16 features (10 classes; class means in a random 64-d subspace
   plus noise, hard enough that C matters), at 2,100 x 1,280 and 20,000 x 1,280:
   * featurecache's search (early-stopped C path, Gram-matrix SVM), logreg and svm;
   * the exhaustive two-stage grid (all 13 decades, then 6 quarter-decades, no early stop),
     as the "same answer" reference: the difference of the chosen CV scores is printed;
   * the practitioner script at 2,100 rows: ``GridSearchCV(Pipeline(StandardScaler,
     LogisticRegression), 8 values of C, 5 folds, n_jobs)``.
2. ``compare`` over 6 layers (24 .. 1,280 wide) x {logreg, svm, knn} on a feature file of
   3,500 train / 1,500 test synthetic rows (deeper layers carry more class signal).

    python benchmarks/heads.py [--n-jobs 2] [--large-rows 20000] [--skip-large-exhaustive]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import joblib
import numpy as np
import sklearn

from featurecache.heads import search
from featurecache.report import compare

WIDTHS = {"blocks.1": 24, "blocks.3": 40, "blocks.8": 80, "blocks.11": 112, "blocks.15": 320,
          "avgpool": 1280}


def synthetic(rows: int, dim: int = 1280, classes: int = 10, seed: int = 0, signal: float = 0.01):
    """Class-dependent means in a random 64-d subspace plus isotropic noise (float16)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    basis = rng.normal(0, 1, (64, dim)) * signal
    centers = rng.normal(0, 1, (classes, 64))
    X = centers[y] @ basis + rng.normal(0, 1, (rows, dim))
    return X.astype(np.float16), y


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t, 2)


def practitioner_logreg(X, y, n_jobs):
    """What a practitioner writes: GridSearchCV over 8 values of C, 5 folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=1000))])
    gs = GridSearchCV(pipe, {"clf__C": [10.0 ** e for e in range(-4, 4)]},
                      cv=StratifiedKFold(5, shuffle=True, random_state=0),
                      scoring="balanced_accuracy", n_jobs=n_jobs)
    gs.fit(X.astype(np.float32), y)
    return gs.best_params_["clf__C"], gs.best_score_


def search_case(name, X, y, n_jobs, exhaustive=True, practitioner=False) -> dict:
    out = {"case": name, "shape": list(X.shape)}
    for kind in ("logreg", "svm"):
        (_, p, s, table), secs = timed(lambda: search(X, y, kind, n_jobs=n_jobs))
        evaluated = sum(r["status"] == "evaluated" for r in table)
        out[kind] = {"seconds": secs, "C": p["C"], "cv": round(s, 4),
                     "grid_evaluated": f"{evaluated}/{len(table)}"}
        if exhaustive:
            (_, pf, sf, _), secs_f = timed(lambda: search(X, y, kind, n_jobs=n_jobs, early_stop=False))
            out[kind].update(exhaustive_seconds=secs_f, exhaustive_C=pf["C"],
                             exhaustive_cv=round(sf, 4), cv_difference=round(sf - s, 4))
        print(name, kind, out[kind], flush=True)
    if practitioner:
        (c, s), secs = timed(lambda: practitioner_logreg(X, y, n_jobs))
        out["practitioner_logreg"] = {"seconds": secs, "C": c, "cv": round(s, 4),
                                      "ratio_fc_over_script": round(out["logreg"]["seconds"] / secs, 2)}
        print(name, "practitioner", out["practitioner_logreg"], flush=True)
    return out


def feature_file(path: Path, train: int = 3500, test: int = 1500, classes: int = 10, seed: int = 0):
    """A feature file of 6 synthetic layers written through the store's Writer."""
    from featurecache.layers import LayerSpec
    from featurecache.store import Writer

    rng = np.random.default_rng(seed)
    n = train + test
    y = rng.integers(0, classes, n)
    splits = ["train"] * train + ["test"] * test
    feats = {}
    for depth, (name, dim) in enumerate(WIDTHS.items()):
        centers = rng.normal(0, 1, (classes, dim)) * (0.04 + 0.03 * depth)
        feats[name] = (centers[y] + rng.normal(0, 1, (n, dim))).astype(np.float16)
    specs = [LayerSpec(name, name, "map", "avg", dim, i) for i, (name, dim) in enumerate(WIDTHS.items())]
    meta = {"backbone": "synthetic", "weights": "none", "weights_sha256": "", "preprocess": {},
            "pool": "avg", "token_pool": "cls", "dtype": "float16", "layers": list(WIDTHS),
            "extraction_method": "synthetic", "data_root": "synthetic", "data_kind": "synthetic",
            "data_fingerprint": "synthetic", "split_origin": "synthetic", "seed": seed,
            "shard_index": 0, "shard_count": 1, "shard_start": 0, "n_inputs": n}
    with Writer(path, meta, specs, [f"c{i}" for i in range(classes)], overwrite=True) as w:
        for s in range(0, n, 500):
            sl = slice(s, s + 500)
            w.write({k: v[sl] for k, v in feats.items()}, [f"img{i}.png" for i in range(s, min(n, s + 500))],
                    y[sl].tolist(), splits[sl], n_inputs=len(y[sl]))
        w.close(complete=True)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-jobs", type=int, default=os.cpu_count())
    ap.add_argument("--small-rows", type=int, default=2100)
    ap.add_argument("--large-rows", type=int, default=20000)
    ap.add_argument("--skip-large", action="store_true", help="no 20,000-row search")
    ap.add_argument("--skip-large-exhaustive", action="store_true",
                    help="no exhaustive reference at 20,000 rows (about 10 min for the SVM)")
    ap.add_argument("--skip-search", action="store_true", help="only the compare timing")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    out = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                      f"scikit-learn {sklearn.__version__}",
           "date": time.strftime("%Y-%m-%d"), "n_jobs": args.n_jobs}
    joblib.Parallel(n_jobs=args.n_jobs)(joblib.delayed(search)(*synthetic(60, 8), n_jobs=1)
                                         for _ in range(args.n_jobs))  # warm the worker pool
    if not args.skip_search:
        X, y = synthetic(args.small_rows)
        out["small"] = search_case("small", X, y, args.n_jobs, practitioner=True)
        if not args.skip_large:
            X, y = synthetic(args.large_rows)
            out["large"] = search_case("large", X, y, args.n_jobs,
                                       exhaustive=not args.skip_large_exhaustive)
    with tempfile.TemporaryDirectory(prefix="fc-heads-") as tmp:
        path = feature_file(Path(tmp) / "f.h5")
        res, secs = timed(lambda: compare(path, Path(tmp) / "report", heads=["logreg", "svm", "knn"],
                                          n_jobs=args.n_jobs, progress=False))
        out["compare"] = {"seconds": secs, "rows": len(res.rows),
                          "winner": f"{res.winner['layer']} {res.winner['head']} CV "
                                    f"{res.winner['cv_score']:.3f} test {res.winner['balanced_accuracy']:.3f}",
                          "per_row": [f"{r['layer']} {r['head']} {r['params']} cv={r['cv_score']:.3f} "
                                      f"grid={r['grid_evaluated']}/{r['grid_points']}" for r in res.rows]}
        print("compare", out["compare"]["seconds"], "s", out["compare"]["winner"], flush=True)
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
