"""The files of a comparison report: results.csv/json, report.md (table and verdict), the
plots (published into the report folder as one unit by :func:`files.publish_folder`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .stats import SCORING_METRIC

__all__ = ["write_report", "own_files", "verdict_text", "markdown_table", "row_name",
           "REPORT_FILES"]

REPORT_FILES = ("results.csv", "report.md", "layer_depth.png", "few_shot.png", "confusion.png",
                 "best.joblib", "results.json")


def own_files(folder: Path) -> set:
    """The files a report written before versions existed left in ``folder`` (named by its
    results.json), adopted whole by :func:`files.publish_folder` before it is replaced."""
    try:
        old = json.loads((folder / "results.json").read_text())
        heads = {r["head_file"] for r in old.get("rows", []) if r.get("head_file")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {f for f in REPORT_FILES if (folder / f).is_file()} | heads


def row_name(r) -> str:
    return f"{r['backbone']} {r['layer']} ({r['head']})"


def verdict_text(rows, w, runner, scoring, select, several) -> str:
    """The verdict paragraph: the winner by CV, its test scores, its lead over the runner-up
    (paired bootstrap), the shallowest layer, and the best of each other backbone."""
    from .report import select_winner  # the selection rule lives with compare

    metric = SCORING_METRIC[scoring]
    what = f"{w['backbone']} " if several else ""
    on_fold = "selected_on" in w  # compare --finetuned: every candidate on the same rows
    if on_fold:
        frozen = [r for r in rows if r.get("strategy", "frozen") == "frozen"]
        tuned = [r for r in rows if r.get("strategy", "frozen") != "frozen"]
        best_f = max((r["select_score"] for r in frozen), default=float("nan"))
        best_t = max((r["select_score"] for r in tuned), default=float("nan"))
        name = (f"**{w['strategy']} of the blocks above {w['layer'].split('..')[0]}** "
                f"({w['folder']})" if w.get("strategy", "frozen") != "frozen" else
                f"**{what}{w['layer']}** with a {w['head']} head")
        text = (f"{name} is chosen by its {scoring} on the same rows as every other candidate: "
                f"the {w['selected_on']} that the fine-tune(s) picked their epoch on, "
                f"{w['select_score']:.3f} (best frozen head {best_f:.3f}, refit on the other "
                f"training rows with the parameters its CV chose; best fine-tune {best_t:.3f}, "
                f"its kept epoch). On the test split")
    elif w.get("strategy", "frozen") != "frozen":
        text = (f"**{w['strategy']} of the blocks above {w['layer'].split('..')[0]}** "
                f"({w['folder']}) is chosen by its {scoring} on a validation fold of the "
                f"train split, {w['cv_score']:.3f} (the best of its epochs on {w['n_val']} "
                f"rows: optimistic), above every frozen head's CV score. On the test split")
    else:
        text = (f"**{what}{w['layer']}** with a {w['head']} head is chosen by cross-validation "
                f"on the train split: CV {scoring} {w['cv_score']:.3f} (± {w['cv_std']:.3f} over "
                f"the folds). On the test split")
    text += (f", read once for this report, it scores {metric} "
            f"{w[metric]:.3f} (95% CI {w[metric + '_lo']:.3f}-{w[metric + '_hi']:.3f}), "
            f"accuracy {w['accuracy']:.3f}, macro-F1 {w['macro_f1']:.3f}.")
    if select == "cv-1se":
        best = select_winner(rows, "cv")
        if best is not w:
            text += (f" (--select cv-1se: the best selection score was "
                     f"{best.get('select_score', best['cv_score']):.3f} by "
                     f"{row_name(best)}; {w['layer']} is the narrowest and shallowest candidate "
                     f"within one standard error of it.)")
    if runner is not None:
        lead = w["lead_over_runner_up"]
        clear = lead["lo"] > 0 or lead["hi"] < 0
        text += (f" The runner-up{'' if on_fold else ' by CV'}, {row_name(runner) if several else runner['layer'] + ' (' + runner['head'] + ')'}"
                 + (f" ({runner['select_score']:.3f} on the validation fold)" if on_fold else
                    f" (CV {runner['cv_score']:.3f})") +
                 f", scores {runner[metric]:.3f} on test; the "
                 f"paired bootstrap of the difference on the same test rows gives "
                 f"{lead['difference']:+.3f} (95% CI {lead['lo']:+.3f} to {lead['hi']:+.3f}), so "
                 + ("the difference is clear on this test set." if clear else
                    "this test set cannot tell the two apart."))
    same = [r for r in rows if r["backbone"] == w["backbone"]
            and r.get("strategy", "frozen") == "frozen"]
    shallow = min(same, key=lambda r: (r["depth"], -r["cv_score"])) if same else w
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


def markdown_table(rows, winner) -> str:
    several = len({r["backbone"] for r in rows}) > 1
    cols = (["backbone"] if several else []) + [
        "depth", "strategy", "layer", "head", "dim", "best params", "grid", "CV score", "test accuracy",
        "balanced accuracy", "macro-F1"]
    on_fold = any("selected_on" in r for r in rows)
    if on_fold:  # compare --finetuned: the score every candidate was chosen by, same rows
        cols.insert(cols.index("test accuracy"), "selection score")
    shots = list(next((r["few_shot"] for r in rows if r.get("few_shot")), {}))
    cols += [f"{s}-shot" for s in shots]
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join("---:" if c in ("depth", "dim") else "---" for c in cols) + "|"]
    for r in rows:
        params = ", ".join(f"{k}={v:.3g}" for k, v in r["params"].items())
        cells = ([r["backbone"]] if several else []) + [
            f"{r['depth']:g}", r.get("strategy", "frozen"), r["layer"], r["head"], str(r["dim"]),
            params,
            f"{r['grid_evaluated']}/{r['grid_points']}",
            f"{r['cv_score']:.3f} ± {r['cv_std']:.3f}" if "n_val" not in r else
            f"{r['cv_score']:.3f} (val, {r['n_val']} rows)"] + (
            [f"{r['select_score']:.3f} ± {r['select_sem']:.3f}"] if on_fold else []) + [
            _fmt(r, "accuracy"), _fmt(r, "balanced_accuracy"), _fmt(r, "macro_f1")]
        cells += [f"{r['few_shot'][s]['mean']:.3f} ± {r['few_shot'][s]['std']:.3f}"
                  if "few_shot" in r else "-" for s in shots]
        if r is winner:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, files, names, rows, winner, verdict, cm, settings) -> None:
    flat = [k for k in dict.fromkeys(k for r in rows for k in r)
            if k not in ("params", "few_shot", "lead_over_runner_up", "margin_over_frozen")]
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
          f"{len(first.classes)} classes.\n\n{verdict}\n\n{markdown_table(rows, winner)}\n"
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
          + (" Fine-tuned rows (strategy `fine-tune`): the grid column counts the epochs run of "
             "those asked, and the CV score is the score on the validation fold of the train "
             "split that picked the epoch (the best of its epochs on that fold, so optimistic). "
             "The winner is chosen by the selection score, on the same rows for every "
             "candidate: that validation fold, the frozen heads refit on the other training "
             "rows with the parameters their CV chose (± is the binomial standard error on the "
             "fold); the model is in its own folder (`featurecache predict "
             "FOLDER IMAGES`), and `best.joblib` is the best frozen head."
             if any(r.get("strategy", "frozen") != "frozen" for r in rows) else "")
          + f"\n\n{plots}![confusion matrix of the winner](confusion.png)\n")
    (out_dir / "report.md").write_text(md)
    from .plots import plot_confusion, plot_depth, plot_few_shot

    metric = SCORING_METRIC[settings["scoring"]]
    plot_depth(out_dir / "layer_depth.png", rows, winner, metric)
    plot_confusion(out_dir / "confusion.png", cm, first.classes, winner)
    if settings["shots"]:
        plot_few_shot(out_dir / "few_shot.png", rows, winner, metric)
