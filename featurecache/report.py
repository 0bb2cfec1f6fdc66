"""Layer-depth comparison: every stored layer x head, searched, refit, scored on the test split.

:func:`compare` writes into one folder:

* ``results.csv`` / ``results.json``: one row per layer x head (CV score, test accuracy,
  balanced accuracy and macro-F1, each with a bootstrap 95% interval);
* ``report.md``: the table ordered by depth, the winner in bold, and a verdict;
* ``layer_depth.png``: balanced accuracy vs depth, one line per head, interval bars;
* ``confusion.png``: the winner's confusion matrix on the test split;
* ``heads/<layer>-<head>.joblib`` and ``best.joblib`` (the winner), ready for ``predict``.

The winner is the row with the highest test balanced accuracy (robust to unbalanced
classes); ties go to the higher CV score.

Example::

    >>> res = compare("feats.h5", "reports/run1", heads=["logreg"])   # doctest: +SKIP
    >>> print(res.verdict)                                            # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

from .errors import FeaturecacheError, HeadError
from .heads import HEAD_KINDS, fit_head

__all__ = ["compare", "CompareResult", "bootstrap_ci", "METRICS"]

METRICS = {
    "accuracy": accuracy_score,
    "balanced_accuracy": balanced_accuracy_score,
    "macro_f1": lambda y, p: f1_score(y, p, average="macro"),
}


def bootstrap_ci(y_true, y_pred, metric, n_boot: int = 1000, seed: int = 0) -> tuple:
    """Percentile 95% interval of ``metric`` over test rows resampled with replacement."""
    rng = np.random.default_rng(seed)
    n = len(y_true)
    with warnings.catch_warnings():  # a resample may miss a class; the metric copes
        warnings.simplefilter("ignore")
        stats = [metric(y_true[i], y_pred[i]) for i in (rng.integers(0, n, n) for _ in range(n_boot))]
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


@dataclass
class CompareResult:
    """Rows (one per layer x head, in depth order), the winner, the verdict, the folder."""

    rows: list
    winner: dict
    verdict: str
    out_dir: Path

    def table(self) -> str:
        return _markdown_table(self.rows, self.winner)


def compare(features, out_dir, layers=None, heads=("logreg", "svm"), extra_layers=(),
            kernel: str = "linear", cv: int = 5, class_weight=None, seed: int = 0,
            n_jobs=None, n_boot: int = 1000, overwrite: bool = False,
            progress: bool = True) -> CompareResult:
    """Fit every ``head`` on every layer and write the comparison report into ``out_dir``.

    Args:
        features: feature file path or :class:`~featurecache.store.FeatureFile`.
        layers: stored layers to compare (default: all of them).
        heads: head kinds (``logreg``, ``svm``).
        extra_layers: concatenations such as ``"blocks.5+avgpool"``, each its own row.
        overwrite: replace an existing ``out_dir``; otherwise an existing one is refused.

    Raises:
        FeaturecacheError: the folder exists, a layer or head is unknown, or the file has
            no test split.
    """
    from tqdm.auto import tqdm

    from .store import FeatureFile, open_features

    ff = features if isinstance(features, FeatureFile) else open_features(features)
    out_dir = Path(out_dir)
    heads = list(heads)
    bad = [h for h in heads if h not in HEAD_KINDS]
    if bad:
        raise HeadError(f"heads {bad} are not known; choose from {', '.join(HEAD_KINDS)}.")
    layers = list(layers) if layers else list(ff.layers)
    grid_layers = layers + [e for e in extra_layers if e not in layers]
    for layer in grid_layers:
        ff.check_layer(layer)
    y_test = ff.y("test")  # raises when the file has no test split
    if len(np.unique(ff.y("train"))) < 2:
        raise HeadError("the train split holds a single class; nothing to compare.")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FeaturecacheError(f"output folder {out_dir} exists and is not empty; choose "
                                    f"another or pass --overwrite.")
        shutil.rmtree(out_dir)
    (out_dir / "heads").mkdir(parents=True, exist_ok=True)

    rows, fitted = [], {}
    bar = tqdm([(l, h) for l in grid_layers for h in heads], disable=not progress,
               desc="compare", unit="fit", dynamic_ncols=True)
    for layer, kind in bar:
        bar.set_postfix_str(f"{layer} {kind}", refresh=True)
        t = time.perf_counter()
        head = fit_head(ff, layer, kind, kernel=kernel, cv=cv, class_weight=class_weight,
                        seed=seed, n_jobs=n_jobs)
        pred = head.predict(ff.X(layer, "test"))
        row = {"layer": layer, "head": kind, "depth": _depth(ff, layer),
               "dim": sum(ff.layers[p].dim for p in layer.split("+")),
               "params": head.params_, "cv_score": head.cv_score_}
        for name, metric in METRICS.items():
            row[name] = float(metric(y_test, pred))
            row[name + "_lo"], row[name + "_hi"] = bootstrap_ci(y_test, pred, metric, n_boot, seed)
        row["fit_seconds"] = time.perf_counter() - t
        name = f"{layer}-{kind}".replace("+", "_")
        row["head_file"] = str(head.save(out_dir / "heads" / f"{name}.joblib").relative_to(out_dir))
        rows.append(row)
        fitted[(layer, kind)] = (head, pred)
    rows.sort(key=lambda r: (r["depth"], "+" in r["layer"], r["layer"], r["head"]))
    winner = max(rows, key=lambda r: (r["balanced_accuracy"], r["cv_score"]))
    head, pred = fitted[(winner["layer"], winner["head"])]
    shutil.copyfile(out_dir / winner["head_file"], out_dir / "best.joblib")
    verdict = _verdict(rows, winner)
    _write(out_dir, ff, rows, winner, verdict, confusion_matrix(y_test, pred,
                                                                labels=range(len(ff.classes))))
    return CompareResult(rows, winner, verdict, out_dir)


def _depth(ff, layer: str) -> float:
    parts = layer.split("+")
    return max(ff.layers[p].depth for p in parts) + (0.5 if len(parts) > 1 else 0)


def _verdict(rows, winner) -> str:
    others = [r for r in rows if r is not winner]
    w = winner
    text = (f"**{w['layer']}** with a {w['head']} head wins: test balanced accuracy "
            f"{w['balanced_accuracy']:.3f} (95% CI {w['balanced_accuracy_lo']:.3f}-"
            f"{w['balanced_accuracy_hi']:.3f}), accuracy {w['accuracy']:.3f}, macro-F1 "
            f"{w['macro_f1']:.3f}.")
    if not others:
        return text
    runner = max(others, key=lambda r: (r["balanced_accuracy"], r["cv_score"]))
    gap = w["balanced_accuracy"] - runner["balanced_accuracy"]
    overlap = runner["balanced_accuracy_hi"] >= w["balanced_accuracy_lo"]
    text += (f" The runner-up, {runner['layer']} ({runner['head']}), scores "
             f"{runner['balanced_accuracy']:.3f}, {gap:.3f} lower; the intervals "
             + ("overlap, so this test set cannot tell the two apart." if overlap else
                "do not overlap, so the difference is clear on this test set."))
    shallow = min(rows, key=lambda r: r["depth"])
    if shallow["layer"] != w["layer"]:
        text += (f" The shallowest layer compared, {shallow['layer']}, reaches "
                 f"{shallow['balanced_accuracy']:.3f}.")
    return text


def _fmt(r, key) -> str:
    return f"{r[key]:.3f} [{r[key + '_lo']:.3f}, {r[key + '_hi']:.3f}]"


def _markdown_table(rows, winner) -> str:
    head = ("| depth | layer | head | dim | best params | CV score | test accuracy | "
            "balanced accuracy | macro-F1 |\n|---:|---|---|---:|---|---:|---|---|---|\n")
    lines = []
    for r in rows:
        params = ", ".join(f"{k}={v:.3g}" for k, v in r["params"].items())
        cells = [f"{r['depth']:g}", r["layer"], r["head"], str(r["dim"]), params,
                 f"{r['cv_score']:.3f}", _fmt(r, "accuracy"), _fmt(r, "balanced_accuracy"),
                 _fmt(r, "macro_f1")]
        if r is winner:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _write(out_dir: Path, ff, rows, winner, verdict, cm) -> None:
    keys = [k for k in rows[0] if k != "params"] + ["params"]
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "params": json.dumps(r["params"])})
    p = ff.provenance
    summary = {"feature_file": str(ff.path), "backbone": p["backbone"], "weights": p["weights"],
               "classes": ff.classes, "n_train": int(ff.splits().count("train")),
               "n_test": int(ff.splits().count("test")), "winner": winner, "verdict": verdict,
               "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1))
    md = (f"# Layer-depth comparison\n\nFeatures: `{ff.path}` ({p['backbone']}, weights "
          f"`{p['weights']}`, {summary['n_train']} train / {summary['n_test']} test rows, "
          f"{len(ff.classes)} classes).\n\n{verdict}\n\n{_markdown_table(rows, winner)}\n"
          f"Intervals are bootstrap 95% intervals over the test rows. The CV score is the mean "
          f"accuracy of the best hyperparameters in stratified CV on the train split. The winner "
          f"is picked on the test split, so its test score is slightly optimistic; the CV column "
          f"is the selection signal that never saw the test rows.\n\n"
          f"![score vs depth](layer_depth.png)\n\n![confusion matrix of the winner](confusion.png)\n")
    (out_dir / "report.md").write_text(md)
    _plot_depth(out_dir / "layer_depth.png", rows, winner)
    _plot_confusion(out_dir / "confusion.png", cm, ff.classes, winner)


def _plot_depth(path: Path, rows, winner) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for kind in dict.fromkeys(r["head"] for r in rows):
        rs = [r for r in rows if r["head"] == kind]
        x = [r["depth"] for r in rs]
        y = [r["balanced_accuracy"] for r in rs]
        err = [[r["balanced_accuracy"] - r["balanced_accuracy_lo"] for r in rs],
               [r["balanced_accuracy_hi"] - r["balanced_accuracy"] for r in rs]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=kind)
    ax.plot([winner["depth"]], [winner["balanced_accuracy"]], "*", ms=16, color="gold",
            markeredgecolor="black", label=f"winner: {winner['layer']} ({winner['head']})")
    ticks = sorted({(r["depth"], r["layer"]) for r in rows})
    ax.set_xticks([t[0] for t in ticks])
    ax.set_xticklabels([t[1] for t in ticks], rotation=35, ha="right", fontsize=8)
    ax.set_xlabel("layer (by depth)")
    ax.set_ylabel("test balanced accuracy (95% CI)")
    ax.set_title("Which layer? Score vs depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_confusion(path: Path, cm, classes, winner) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * n, 1.0 + 0.5 * n), dpi=110)
    ax.imshow(cm, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(n))
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n))
    ax.set_yticklabels(classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{winner['layer']} ({winner['head']}), test split", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
