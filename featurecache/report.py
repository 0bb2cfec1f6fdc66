"""Layer-depth comparison: every backbone x layer x head, selected by CV, reported on test.

:func:`compare` searches every head kind on every stored layer (of one feature file, or of
several files of the same images made with different backbones), all on the same CV folds
of the train split, and picks the winner **by the cross-validated score** (``--select cv``),
or the narrowest / shallowest candidate within one standard error of the best
(``--select cv-1se``). The test split is read once, after the selection, to report: metrics
with bootstrap 95% intervals, and a paired bootstrap of the winner's lead over the runner-up
on the same test rows. With ``shots``, every row is also refit on k images per class (seeded
draws, repeated) to answer "how many labels do I need?".

It writes into one folder:

* ``results.csv`` / ``results.json``: one row per backbone x layer x head;
* ``report.md``: the table ordered by depth, the winner in bold, and the verdict;
* ``layer_depth.png``: test score vs depth, one line per backbone x head;
* ``few_shot.png`` (with ``shots``): test score vs labelled images per class;
* ``confusion.png``: the winner's confusion matrix on the test split;
* ``heads/*.joblib`` and ``best.joblib`` (the winner), ready for ``predict``.

Example::

    >>> res = compare("feats.h5", "reports/run1", heads=["logreg", "knn"])   # doctest: +SKIP
    >>> print(res.verdict)                                                   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FeaturecacheError, HeadError, HeadOptionError, option
from .options import COMPARE, SELECT, check
from .search import HEAD_KINDS, check_options
from .stats import METRICS, SCORING_METRIC, bootstrap, interval, paired_difference

__all__ = ["compare", "CompareResult", "SELECT", "select_winner"]

_HEAD_COST = {"knn": 0, "logreg": 1, "svm": 2}  # cheaper first, for the one-SE rule


@dataclass
class CompareResult:
    """Rows (one per backbone x layer x head, in depth order), the winner, the verdict."""

    rows: list
    winner: dict
    verdict: str
    out_dir: Path

    def table(self) -> str:
        return _markdown_table(self.rows, self.winner)


def select_winner(rows, select: str = "cv") -> dict:
    """The row chosen from CV scores only (never from the test split).

    ``cv``: the highest mean CV score (ties: the narrower, then shallower, then cheaper head).
    ``cv-1se``: among the rows whose CV score is within one standard error of the best, the
    narrowest, then shallowest, then cheapest.
    """
    def simplicity(r):
        return (r["dim"], r["rel_depth"], _HEAD_COST.get(r["head"], 9))

    best = min(rows, key=lambda r: (-r["cv_score"], simplicity(r)))
    if select == "cv":
        return best
    if select != "cv-1se":
        raise HeadOptionError(f"select {select!r} is not one of {', '.join(SELECT)}.")
    floor = best["cv_score"] - best["cv_sem"]
    return min((r for r in rows if r["cv_score"] >= floor), key=simplicity)


def _open_all(features) -> list:
    """Open the feature files and check that they hold the same images, labels and splits."""
    from .store import FeatureFile, open_features

    items = features if isinstance(features, (list, tuple)) else [features]
    if not items:
        raise FeaturecacheError("no feature file given.")
    files = [f if isinstance(f, FeatureFile) else open_features(f) for f in items]
    first = files[0]
    for ff in files[1:]:
        where = f"{ff.path} and {first.path} are not of the same images"
        if ff.classes != first.classes:
            raise FeaturecacheError(f"{where}: classes {ff.classes} vs {first.classes}.")
        if ff.n_rows != first.n_rows:
            raise FeaturecacheError(f"{where}: {ff.n_rows} vs {first.n_rows} rows. Embed the "
                                    f"same data with each backbone to compare them.")
        for name, a, b in (("path", ff.paths(), first.paths()), ("split", ff.splits(), first.splits()),
                           ("label", ff.y().tolist(), first.y().tolist())):
            bad = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), None)
            if bad is not None:
                raise FeaturecacheError(f"{where}: row {bad} has {name} {a[bad]!r} in the first "
                                        f"and {b[bad]!r} in the second.")
    return files


def _labels(files) -> list:
    """A short name per file for the backbone column: the backbone, or the file name when two
    files share a backbone."""
    from .files import same_file

    for i, a in enumerate(files):
        for b in files[:i]:
            if same_file(a.path, b.path):
                raise FeaturecacheError(f"{a.path} is given twice; give each feature file once.")
    names = [ff.provenance["backbone"] for ff in files]
    if len(set(names)) < len(names):
        names = [ff.path.name.removesuffix(".h5") for ff in files]
    if len(set(names)) < len(names):  # same backbone and file name, in different folders
        names = [str(ff.path.with_suffix("")) for ff in files]
    return names


def compare(features, out_dir, *, layers=None, heads=("logreg", "svm", "knn"), extra_layers=(),
            kernel: str = "linear", cv: int = 5, scoring: str = "balanced_accuracy",
            select: str = "cv", class_weight=None, seed: int = 0, n_jobs=-1,
            n_boot: int = 1000, shots=(), repeats: int = 3, overwrite: bool = False,
            progress: bool = True) -> CompareResult:
    """Fit every head on every layer (of every file), pick a winner by CV, write the report.

    Args:
        features: a feature file path or :class:`~featurecache.store.FeatureFile`, or a list
            of them for several backbones over the same images.
        layers: stored layers to compare (default: all of each file's).
        heads: head kinds (``logreg``, ``svm``, ``knn``).
        extra_layers: concatenations such as ``"blocks.5+avgpool"``, each its own row.
        scoring: the CV score (``balanced_accuracy``, ``accuracy``, ``f1_macro``).
        select: ``cv`` (best CV score) or ``cv-1se`` (simplest within one standard error).
        shots: few-shot sizes, e.g. ``(1, 5, 10, "all")``: refit each row on that many train
            images per class, ``repeats`` seeded draws each, and report the test score.
        overwrite: replace an existing ``out_dir``; otherwise an existing one is refused.

    Raises:
        FeaturecacheError: the folder exists, a layer or head is unknown, the files are not
            of the same images, or there is no test split.
    """
    from .heads import Progress, fit_heads

    t0 = time.perf_counter()
    files = _open_all(features)
    out_dir = Path(out_dir)
    heads = list(heads)
    if not heads:
        raise HeadError(f"no head kind given; choose from {', '.join(HEAD_KINDS)}.")
    check_options(heads, kernel, scoring)
    check(COMPARE, {"cv": cv, "repeats": repeats, "n_boot": n_boot, "n_jobs": n_jobs,
                    "extra_layers": list(extra_layers)})
    check_options(heads, kernel, scoring)
    if select not in SELECT:
        raise HeadOptionError(f"select {select!r} is not one of {', '.join(SELECT)}.")
    shots = check_shots(shots, repeats)
    if n_boot < 1:
        raise HeadError(f"n_boot == {n_boot}: the confidence intervals need at least 1 bootstrap "
                        f"resample (1000 is the default).")
    names = _labels(files)
    jobs = {}
    for name, ff in zip(names, files):
        wanted = list(layers) if layers else list(ff.layers)
        for layer in wanted + [e for e in extra_layers if e not in wanted]:
            ff.check_layer(layer)
            jobs[(name, layer)] = (ff, layer)
    for ff in files:
        ff.check_complete()  # an unfinished embed is named as such, not as a missing split
    first = files[0]
    present = sorted(set(first.splits()))
    if "test" not in present:  # checked from the split names: no test label is read before the choice
        raise FeaturecacheError(f"{first.path} has no rows in split 'test'; splits present: "
                                f"{present}. compare reports on a held-out test split.")
    if len(np.unique(first.y("train"))) < 2:
        raise HeadError("the train split holds a single class; nothing to compare.")
    shots = _feasible_shots(shots, first.y("train"))
    if out_dir.exists() and not out_dir.is_dir():
        raise FeaturecacheError(f"{out_dir} is a file; give a folder for the report.")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FeaturecacheError(f"output folder {out_dir} exists and is not empty; choose "
                                f"another or pass {option('overwrite')} (which replaces only the files "
                                f"of a previous report).")
    if not out_dir.parent.is_dir():
        raise FeaturecacheError(f"folder {out_dir.parent} does not exist; create it first.")

    bar = Progress(progress, "compare (CV folds)")
    fitted = fit_heads(jobs, heads, kernel=kernel, cv=cv, scoring=scoring,
                       class_weight=class_weight, seed=seed, n_jobs=n_jobs, progress=bar.update)
    bar.close()
    rows = [_row(name, layer, kind, head, jobs) for ((name, layer), kind), head in fitted.items()]
    rows.sort(key=lambda r: (r["backbone"], r["depth"], "+" in r["layer"], r["layer"], r["head"]))
    winner = select_winner(rows, select)  # selection ends here; the test split is read below

    y_test = first.y("test")
    unscored = sorted(set(first.y("train").tolist()) - set(y_test.tolist()))
    if unscored:
        import warnings

        from .errors import DataWarning

        warnings.warn(DataWarning(
            f"classes {[first.classes[i] for i in unscored]} have no test images: the test "
            f"scores say nothing about them, and balanced accuracy averages over the others."))
    X_test = {key: ff.X(layer, "test") for key, (ff, layer) in jobs.items()}
    preds = np.stack([fitted[((r["backbone"], r["layer"]), r["head"])].predict(
        X_test[(r["backbone"], r["layer"])]) for r in rows])
    samples = bootstrap(y_test, preds, len(first.classes), n_boot, seed)
    point = _point_metrics(y_test, preds, len(first.classes))
    for j, r in enumerate(rows):
        for m in METRICS:
            lo, hi = interval(samples[m][:, j])
            r[m], r[m + "_lo"], r[m + "_hi"] = float(point[m][j]), float(lo), float(hi)
    metric = SCORING_METRIC[scoring]
    w = rows.index(winner)
    runner = None
    if len(rows) > 1:
        others = [r for r in rows if r is not winner]
        runner = select_winner(others, "cv")
        diff = paired_difference(samples[metric][:, w], samples[metric][:, rows.index(runner)])
        winner["lead_over_runner_up"] = {"runner_up": _name(runner), "metric": metric,
                                         "difference": winner[metric] - runner[metric], **diff}
    if shots:
        _few_shot(rows, fitted, jobs, y_test, X_test, shots, repeats, kernel, class_weight,
                  seed, metric, n_jobs)

    several = len(files) > 1
    for r in rows:
        stem = "-".join(([r["backbone"]] if several else []) + [r["layer"], r["head"]])
        r["head_file"] = f"heads/{stem.replace('+', '_')}.joblib"
    verdict = _verdict(rows, winner, runner, scoring, select, several)
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_test, preds[w], labels=range(len(first.classes)))
    settings = {"scoring": scoring, "select": select, "cv": fitted[next(iter(fitted))].meta["cv"],
                "heads": heads, "kernel": kernel, "class_weight": class_weight, "seed": seed,
                "n_boot": n_boot, "shots": [str(s) for s in shots], "repeats": repeats,
                "seconds": round(time.perf_counter() - t0, 1)}
    out_dir.mkdir(exist_ok=True)
    # everything is written into a hidden staging folder inside out_dir, then moved into
    # place file by file (results.json last): a kill leaves the previous report's files whole
    staging = Path(tempfile.mkdtemp(prefix=".compare-", dir=out_dir))
    try:
        (staging / "heads").mkdir()
        for r in rows:
            fitted[((r["backbone"], r["layer"]), r["head"])].save(staging / r["head_file"])
        shutil.copyfile(staging / winner["head_file"], staging / "best.joblib")
        _write(staging, files, names, rows, winner, verdict, cm, settings)
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return CompareResult(rows, winner, verdict, out_dir)


_REPORT_FILES = ("results.csv", "report.md", "layer_depth.png", "few_shot.png", "confusion.png",
                 "best.joblib", "results.json")


def _own_files(folder: Path) -> set:
    """The files a previous report in ``folder`` wrote (named by its results.json)."""
    try:
        old = json.loads((folder / "results.json").read_text())
        heads = {r["head_file"] for r in old.get("rows", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {f for f in _REPORT_FILES if (folder / f).is_file()} | heads


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the new report's files over the old ones, then remove the old report's files
    that the new one does not have. Nothing else in ``out_dir`` is touched."""
    from .files import fsync_dir

    stale = _own_files(out_dir)
    new = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    new.sort(key=lambda f: f == "results.json")  # the index of the report goes last
    for rel in new:
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, out_dir / rel)
    fsync_dir(out_dir)
    for rel in stale - set(new):
        target = (out_dir / rel).resolve()
        if out_dir.resolve() in target.parents:  # never outside the report folder
            target.unlink(missing_ok=True)


def _feasible_shots(shots, y_train) -> list:
    """Drop few-shot sizes that no class can fill (they would repeat "all" under another
    name), and say which sizes some classes cannot fill (those use all their images)."""
    import warnings

    from .errors import DataWarning

    counts = np.bincount(y_train)
    counts = counts[counts > 0]
    too_big = [k for k in shots if k != "all" and k >= counts.max()]
    partly = [k for k in shots if k != "all" and counts.min() < k < counts.max()]
    if too_big:
        warnings.warn(DataWarning(
            f"shots {too_big}: no class has more than {counts.max()} training images, so these "
            f"sizes would be the whole train split; left out (the 'all' size covers it)."))
    if partly:
        warnings.warn(DataWarning(
            f"shots {partly}: the smallest class has {counts.min()} training images; at these "
            f"sizes classes with fewer use all of theirs."))
    return [k for k in shots if k not in too_big]


def check_shots(shots, repeats) -> list:
    out = []
    for s in shots or ():
        if str(s).strip().lower() == "all":
            out.append("all")
            continue
        try:
            k = int(s)
        except (TypeError, ValueError):
            k = 0
        if k < 1:
            raise FeaturecacheError(f"shots must be positive whole numbers or 'all'; got {s!r}.")
        out.append(k)
    if out and repeats < 1:
        raise FeaturecacheError(f"repeats must be at least 1; got {repeats}.")
    return sorted(set(out), key=lambda s: (s == "all", s if s != "all" else 0))


def _row(name, layer, kind, head, jobs) -> dict:
    ff = jobs[(name, layer)][0]
    parts = layer.split("+")
    depth = max(ff.layers[p].depth for p in parts) + (0.5 if len(parts) > 1 else 0)
    deepest = max(s.depth for s in ff.layers.values()) or 1
    table = head.cv_results_
    return {"backbone": name, "layer": layer, "head": kind, "depth": depth,
            "rel_depth": round(min(depth / deepest, 1.0), 4),
            "dim": sum(ff.layers[p].dim for p in parts), "params": head.params_,
            "cv_score": head.cv_score_, "cv_std": head.meta["cv_std"],
            "cv_sem": float(np.std(head.meta["cv_fold_scores"]) /
                            np.sqrt(max(len(head.meta["cv_fold_scores"]) - 1, 1))),
            "grid_evaluated": sum(r["status"] == "evaluated" for r in table),
            "grid_points": len(table)}


def _point_metrics(y, preds, n_classes) -> dict:
    from .stats import metric_values

    vals = [metric_values(np.ones((1, len(y))), y, p, n_classes) for p in preds]
    return {m: np.array([v[m][0] for v in vals]) for m in METRICS}


def _few_shot(rows, fitted, jobs, y_test, X_test, shots, repeats, kernel, class_weight, seed,
              metric, n_jobs) -> None:
    """Refit every row with its chosen hyperparameters on k train images per class."""
    import joblib

    from .heads import refit
    from .stats import few_shot_indices

    first = jobs[next(iter(jobs))][0]
    y_train, n_classes = first.y("train"), len(first.classes)
    X_train = {key: ff.X(layer, "train") for key, (ff, layer) in jobs.items()}
    tasks = [(j, k, rep) for j in range(len(rows)) for k in shots if k != "all"
             for rep in range(repeats)]

    def one(j, k, rep):
        r = rows[j]
        key = (r["backbone"], r["layer"])
        idx = few_shot_indices(y_train, k, seed, rep)
        pipe = refit(X_train[key][idx], y_train[idx], r["head"], r["params"], kernel=kernel,
                     class_weight=class_weight, seed=seed, solver_rows=len(y_train))
        from .stats import metric_values

        p = pipe.predict(np.asarray(X_test[key], dtype=np.float32))
        return metric_values(np.ones((1, len(y_test))), y_test, p, n_classes)[metric][0]

    scores = joblib.Parallel(n_jobs=n_jobs, prefer="threads")(
        joblib.delayed(one)(*t) for t in tasks)
    got = {}
    for (j, k, _), s in zip(tasks, scores):
        got.setdefault((j, k), []).append(float(s))
    for j, r in enumerate(rows):
        r["few_shot"] = {str(k): ({"mean": r[metric], "std": 0.0, "n": 1} if k == "all" else
                                  {"mean": float(np.mean(got[(j, k)])),
                                   "std": float(np.std(got[(j, k)])), "n": repeats})
                         for k in shots}
        r["few_shot_metric"] = metric


def _name(r) -> str:
    return f"{r['backbone']} {r['layer']} ({r['head']})"


def _verdict(rows, w, runner, scoring, select, several) -> str:
    metric = SCORING_METRIC[scoring]
    what = f"{w['backbone']} " if several else ""
    text = (f"**{what}{w['layer']}** with a {w['head']} head is chosen by cross-validation "
            f"on the train split: CV {scoring} {w['cv_score']:.3f} (± {w['cv_std']:.3f} over the "
            f"folds). On the test split, read once for this report, it scores {metric} "
            f"{w[metric]:.3f} (95% CI {w[metric + '_lo']:.3f}-{w[metric + '_hi']:.3f}), "
            f"accuracy {w['accuracy']:.3f}, macro-F1 {w['macro_f1']:.3f}.")
    if select == "cv-1se":
        best = select_winner(rows, "cv")
        if best is not w:
            text += (f" (--select cv-1se: the best CV score was {best['cv_score']:.3f} by "
                     f"{_name(best)}; {w['layer']} is the narrowest and shallowest candidate "
                     f"within one standard error of it.)")
    if runner is not None:
        lead = w["lead_over_runner_up"]
        clear = lead["lo"] > 0 or lead["hi"] < 0
        text += (f" The runner-up by CV, {_name(runner) if several else runner['layer'] + ' (' + runner['head'] + ')'}"
                 f" (CV {runner['cv_score']:.3f}), scores {runner[metric]:.3f} on test; the "
                 f"paired bootstrap of the difference on the same test rows gives "
                 f"{lead['difference']:+.3f} (95% CI {lead['lo']:+.3f} to {lead['hi']:+.3f}), so "
                 + ("the difference is clear on this test set." if clear else
                    "this test set cannot tell the two apart."))
    same = [r for r in rows if r["backbone"] == w["backbone"]]
    shallow = min(same, key=lambda r: (r["depth"], -r["cv_score"]))
    if shallow["layer"] != w["layer"]:
        text += (f" The shallowest layer compared, {shallow['layer']}, reaches "
                 f"{shallow[metric]:.3f}.")
    if several:
        for b in dict.fromkeys(r["backbone"] for r in rows):
            if b != w["backbone"]:
                best_b = select_winner([r for r in rows if r["backbone"] == b], "cv")
                text += (f" Best of {b}: {best_b['layer']} ({best_b['head']}), CV "
                         f"{best_b['cv_score']:.3f}, test {best_b[metric]:.3f}.")
    return text


def _fmt(r, key) -> str:
    return f"{r[key]:.3f} [{r[key + '_lo']:.3f}, {r[key + '_hi']:.3f}]"


def _markdown_table(rows, winner) -> str:
    several = len({r["backbone"] for r in rows}) > 1
    cols = (["backbone"] if several else []) + [
        "depth", "layer", "head", "dim", "best params", "grid", "CV score", "test accuracy",
        "balanced accuracy", "macro-F1"]
    shots = list(rows[0].get("few_shot", {}))
    cols += [f"{s}-shot" for s in shots]
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join("---:" if c in ("depth", "dim") else "---" for c in cols) + "|"]
    for r in rows:
        params = ", ".join(f"{k}={v:.3g}" for k, v in r["params"].items())
        cells = ([r["backbone"]] if several else []) + [
            f"{r['depth']:g}", r["layer"], r["head"], str(r["dim"]), params,
            f"{r['grid_evaluated']}/{r['grid_points']}",
            f"{r['cv_score']:.3f} ± {r['cv_std']:.3f}", _fmt(r, "accuracy"),
            _fmt(r, "balanced_accuracy"), _fmt(r, "macro_f1")]
        cells += [f"{r['few_shot'][s]['mean']:.3f} ± {r['few_shot'][s]['std']:.3f}" for s in shots]
        if r is winner:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(out_dir: Path, files, names, rows, winner, verdict, cm, settings) -> None:
    flat = [k for k in rows[0] if k not in ("params", "few_shot", "lead_over_runner_up")]
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=flat + ["params", "few_shot"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "params": json.dumps(r["params"]),
                        "few_shot": json.dumps(r.get("few_shot", {}))})
    first = files[0]
    n_train, n_test = first.splits().count("train"), first.splits().count("test")
    sources = [{"name": n, "feature_file": str(ff.path), "backbone": ff.provenance["backbone"],
                "weights": ff.provenance["weights"]} for n, ff in zip(names, files)]
    summary = {"feature_files": sources, "classes": first.classes, "n_train": n_train,
               "n_test": n_test, "settings": settings, "winner": winner, "verdict": verdict,
               "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1, default=float))
    src = "; ".join(f"`{s['feature_file']}` ({s['backbone']}, weights `{s['weights']}`)"
                    for s in sources)
    plots = "![score vs depth](layer_depth.png)\n\n"
    if settings["shots"]:
        plots += "![score vs labelled images per class](few_shot.png)\n\n"
    md = (f"# Layer-depth comparison\n\nFeatures: {src}; {n_train} train / {n_test} test rows, "
          f"{len(first.classes)} classes.\n\n{verdict}\n\n{_markdown_table(rows, winner)}\n"
          f"How to read this: every head's hyperparameters and the winner are chosen by "
          f"{settings['cv']} cross-validation on the train split, scored by "
          f"{settings['scoring']}, on the same folds for every row (`--select "
          f"{settings['select']}`). The test split is read once, after the choice, to report: "
          f"intervals are bootstrap 95% intervals over the test rows, and the winner's lead over "
          f"the runner-up is a paired bootstrap on the same resamples. The grid column counts "
          f"the grid points evaluated on every fold; the others were skipped by early stopping "
          f"(see `cv_results` in the head files)."
          + (f" Few-shot columns: mean ± std of the test {SCORING_METRIC[settings['scoring']]} "
             f"over {settings['repeats']} seeded draws of k train images per class, refit with "
             f"the hyperparameters chosen on the full train split." if settings["shots"] else "")
          + f"\n\n{plots}![confusion matrix of the winner](confusion.png)\n")
    (out_dir / "report.md").write_text(md)
    from .plots import plot_confusion, plot_depth, plot_few_shot

    metric = SCORING_METRIC[settings["scoring"]]
    plot_depth(out_dir / "layer_depth.png", rows, winner, metric)
    plot_confusion(out_dir / "confusion.png", cm, first.classes, winner)
    if settings["shots"]:
        plot_few_shot(out_dir / "few_shot.png", rows, winner, metric)
