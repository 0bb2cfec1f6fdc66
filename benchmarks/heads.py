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
3. ``--scale 50000,100000`` (issue 27): one 1,280-wide layer of that many rows (80 % train,
   20 % test), synthetic and (``--real``) a real stored layer (EfficientNet-Lite0's avgpool
   of ``digits``, each split's rows tiled with 1 % Gaussian jitter to the size: the real
   features' statistics, a split's copies never on the other side). Each contender runs in
   its own process while this one samples the process tree's PSS (its workers included):
   * ``compare(heads=[kind])`` for each kind (logreg, svm, knn): seconds, peak memory
     against the layer's float32 size (target <= 3x), the chosen parameters, test balanced
     accuracy;
   * a converged scikit-learn fit at each chosen parameter (``StandardScaler`` + the
     estimator on float64: ``LogisticRegression(tol=1e-6)``, ``LinearSVC(dual=False)`` (``SVC
     (kernel="linear")`` below the Gram limit, where the svm head solves the hinge loss),
     the cosine ``KNeighborsClassifier`` with the same vote weights): its test balanced
     accuracy beside compare's (target: within 0.005);
   * the practitioner's ``GridSearchCV`` logistic search (8 C, 5 folds, as above) on the
     same train rows: seconds, peak memory, test balanced accuracy.

    python benchmarks/heads.py [--n-jobs 2] [--large-rows 20000] [--skip-large-exhaustive]
    python benchmarks/heads.py --skip-search --skip-compare --scale 50000,100000 --real
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
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


def scale_file(path: Path, rows: int, real: Path | None = None, seed: int = 0) -> Path:
    """One 1,280-wide layer ``avgpool`` of ``rows`` rows (80 % train), synthetic or tiled real."""
    from featurecache.layers import LayerSpec
    from featurecache.store import Writer

    rng = np.random.default_rng(seed)
    n_tr = int(rows * 0.8)
    if real is None:
        X, y = synthetic(rows, seed=seed)
        classes = 10
        splits = np.array(["train"] * n_tr + ["test"] * (rows - n_tr))
    else:
        import featurecache

        ff = featurecache.open_features(real)
        parts, ys, sp = [], [], []
        for split, n in (("train", n_tr), ("test", rows - n_tr)):
            Xs, yy = ff.X("avgpool", split).astype(np.float32), ff.y(split)
            idx = rng.integers(0, len(yy), n)
            scale = 0.01 * Xs.std(0)
            parts.append(Xs[idx] + rng.normal(0, 1, (n, Xs.shape[1])).astype(np.float32) * scale)
            ys.append(yy[idx])
            sp += [split] * n
        X, y, splits = np.vstack(parts).astype(np.float16), np.concatenate(ys), np.array(sp)
        classes = len(ff.classes)
    spec = [LayerSpec("avgpool", "avgpool", "map", "avg", X.shape[1], 0)]
    meta = {"backbone": "synthetic", "weights": "none", "weights_sha256": "", "preprocess": {},
            "pool": "avg", "token_pool": "cls", "dtype": "float16", "layers": ["avgpool"],
            "extraction_method": "synthetic", "data_root": str(real or "synthetic"),
            "data_kind": "synthetic", "data_fingerprint": "synthetic", "split_origin": "synthetic",
            "seed": seed, "shard_index": 0, "shard_count": 1, "shard_start": 0, "n_inputs": rows}
    with Writer(path, meta, spec, [f"c{i}" for i in range(classes)], overwrite=True) as w:
        for s in range(0, rows, 5000):
            sl = slice(s, min(rows, s + 5000))
            w.write({"avgpool": X[sl]}, [f"img{i}.png" for i in range(sl.start, sl.stop)],
                    y[sl].tolist(), splits[sl].tolist(), n_inputs=sl.stop - sl.start)
        w.close(complete=True)
    return path


def peak_memory(cmd: list) -> tuple[dict, float, float]:
    """Run ``cmd`` (it prints one JSON line last); sample its process tree's PSS every 0.2 s.

    Returns (its JSON, seconds, peak GiB)."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak, stop = [0], threading.Event()

    def sample():
        top = psutil.Process(proc.pid)
        while not stop.is_set():
            total = 0
            try:
                procs = [top] + top.children(recursive=True)
            except psutil.Error:
                break
            for p in procs:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total)
            stop.wait(0.2)

    t = time.perf_counter()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    secs = time.perf_counter() - t
    stop.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{cmd} failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1]), round(secs, 1), round(peak[0] / 2 ** 30, 2)


def _balanced(y, pred) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return round(float(balanced_accuracy_score(y, pred)), 4)


def run_contender(job: dict) -> dict:
    """One contender, in its own process (``--contender JSON``)."""
    import warnings

    import featurecache

    warnings.filterwarnings("ignore")
    path, n_jobs = Path(job["path"]), job["n_jobs"]
    if job["what"] == "compare":
        with tempfile.TemporaryDirectory(prefix="fc-scale-") as tmp:
            res = compare(path, Path(tmp) / "r", heads=[job["kind"]], n_jobs=n_jobs, progress=False)
        r = res.rows[0]
        return {"params": r["params"], "cv": round(r["cv_score"], 4),
                "test": round(r["balanced_accuracy"], 4)}
    ff = featurecache.open_features(path)
    Xtr, ytr = ff.X("avgpool", "train").astype(np.float32), ff.y("train")
    Xte, yte = ff.X("avgpool", "test").astype(np.float32), ff.y("test")
    if job["what"] == "practitioner":
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV, StratifiedKFold
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=1000))])
        gs = GridSearchCV(pipe, {"clf__C": [10.0 ** e for e in range(-4, 4)]},
                          cv=StratifiedKFold(5, shuffle=True, random_state=0),
                          scoring="balanced_accuracy", n_jobs=n_jobs).fit(Xtr, ytr)
        return {"params": {"C": gs.best_params_["clf__C"]}, "cv": round(gs.best_score_, 4),
                "test": _balanced(yte, gs.predict(Xte))}
    # the converged reference at compare's chosen parameters, float64
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    from featurecache.estimators import temperature_weights
    from featurecache.solvers import use_gram

    p = job["params"]
    gram = use_gram(len(ytr), Xtr.shape[1])  # the svm head's problem: hinge (libsvm) or squared hinge
    est = {"logreg": lambda: LogisticRegression(C=p.get("C"), tol=1e-6, max_iter=10000),
           "svm": lambda: SVC(kernel="linear", C=p.get("C")) if gram else
           LinearSVC(C=p.get("C"), dual=False, max_iter=10000),
           "knn": lambda: KNeighborsClassifier(n_neighbors=p.get("k", 1), metric="cosine",
                                               algorithm="brute", weights=temperature_weights),
           }[job["kind"]]()
    model = make_pipeline(StandardScaler(), est).fit(Xtr.astype(np.float64), ytr)
    return {"test": _balanced(yte, model.predict(Xte.astype(np.float64)))}


def scale_case(rows: int, real: Path | None, n_jobs: int, tmp: Path, kinds) -> dict:
    path = scale_file(tmp / f"scale-{rows}.h5", rows, real)
    layer_gib = rows * 1280 * 4 / 2 ** 30
    out = {"rows": rows, "source": "real (digits avgpool, tiled)" if real else "synthetic",
           "layer_float32_gib": round(layer_gib, 3)}

    def contender(**job):
        return peak_memory([sys.executable, __file__, "--contender",
                            json.dumps({"path": str(path), "n_jobs": n_jobs, **job})])

    for kind in kinds:
        res, secs, gib = contender(what="compare", kind=kind)
        ref, ref_secs, _ = contender(what="reference", kind=kind, params=res["params"])
        out[kind] = {"seconds": secs, "peak_gib": gib, "peak_over_layer": round(gib / layer_gib, 2),
                     **res, "sklearn_test": ref["test"], "sklearn_seconds": ref_secs,
                     "test_minus_sklearn": round(res["test"] - ref["test"], 4)}
        print(rows, out["source"], kind, out[kind], flush=True)
    out["compare_total_seconds"] = round(sum(out[k]["seconds"] for k in kinds), 1)
    res, secs, gib = contender(what="practitioner")
    out["practitioner_logreg"] = {"seconds": secs, "peak_gib": gib,
                                  "peak_over_layer": round(gib / layer_gib, 2), **res}
    print(rows, out["source"], "practitioner", out["practitioner_logreg"], flush=True)
    path.unlink()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-jobs", type=int, default=os.cpu_count())
    ap.add_argument("--small-rows", type=int, default=2100)
    ap.add_argument("--large-rows", type=int, default=20000)
    ap.add_argument("--skip-large", action="store_true", help="no 20,000-row search")
    ap.add_argument("--skip-large-exhaustive", action="store_true",
                    help="no exhaustive reference at 20,000 rows (about 10 min for the SVM)")
    ap.add_argument("--skip-search", action="store_true", help="only the compare timing")
    ap.add_argument("--skip-compare", action="store_true", help="no 6-layer compare timing")
    ap.add_argument("--scale", default="", help="rows of the scale cases, e.g. 50000,100000")
    ap.add_argument("--scale-kinds", default="logreg,svm,knn")
    ap.add_argument("--real", action="store_true",
                    help="scale cases on the real stored layer too (embeds digits once into "
                         "benchmarks/.cache)")
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.contender:
        print(json.dumps(run_contender(json.loads(args.contender))))
        return
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
    if args.scale:
        real = None
        if args.real:
            import featurecache

            real = Path(__file__).resolve().parent / ".cache" / "digits-lite0.h5"
            if not real.exists():
                real.parent.mkdir(exist_ok=True)
                featurecache.embed(Path(__file__).resolve().parents[2] / "shared" / "data" / "digits",
                                   real, layers=["stage3", "stage4", "avgpool"], progress=False)
        with tempfile.TemporaryDirectory(prefix="fc-scale-") as tmp:
            out["scale"] = [scale_case(int(r), src, args.n_jobs, Path(tmp), args.scale_kinds.split(","))
                            for r in args.scale.split(",") for src in [None] + ([real] if real else [])]
    if args.skip_compare:
        print(json.dumps(out, indent=1))
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
        return
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
