"""The files of a comparison report, one writer per format, registered in :data:`WRITERS`.

A writer is an object with ``files(data)`` (the names it owns in the report folder, for
``publish`` and for adopting an older report's files) and ``write(folder, data)``. The report
is published into its folder as one unit by :func:`files.publish_folder`; a new format is one
writer added to :data:`WRITERS`.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from .data import ReportData
from .rows import format_params
from .html import Html
from .verdict import how_to_read, skipped_heads

__all__ = ["write_report", "own_files", "markdown_table", "ReportData", "WRITERS",
           "REPORT_FILES"]


def own_files(folder: Path) -> set:
    """The files a report written before versions existed left in ``folder`` (named by its
    results.json), adopted whole by :func:`files.publish_folder` before it is replaced."""
    try:
        old = json.loads((folder / "results.json").read_text())
        heads = {r["head_file"] for r in old.get("rows", []) if r.get("head_file")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {f for f in REPORT_FILES if (folder / f).is_file()} | heads


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
        params = format_params(r["params"])
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


class Tables:
    """``results.csv`` (one row per candidate) and ``results.json`` (rows, winner, verdict,
    settings, sources)."""

    def files(self, data) -> tuple:
        return ("results.csv", "results.json")

    def write(self, folder: Path, data: ReportData) -> None:
        rows = [r.as_dict() if hasattr(r, "as_dict") else r for r in data.rows]
        flat = [k for k in dict.fromkeys(k for r in rows for k in r)
                if k not in ("params", "few_shot", "lead_over_runner_up", "margin_over_frozen")]
        with open(folder / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=flat + ["params", "few_shot"], extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({**r, "params": json.dumps(r["params"]),
                            "few_shot": json.dumps(r.get("few_shot", {}))})
        n_train, n_test = data.split_counts
        winner = data.winner.as_dict() if hasattr(data.winner, "as_dict") else data.winner
        summary = {"feature_files": data.sources, "classes": data.classes, "n_train": n_train,
                   "n_test": n_test, "settings": data.settings, "winner": winner,
                   "verdict": data.verdict.markdown(), "rows": rows}
        (folder / "results.json").write_text(json.dumps(summary, indent=1, default=float))


class Markdown:
    """``report.md``: the verdict, the table (winner in bold), how to read it, the plots."""

    def files(self, data) -> tuple:
        return ("report.md",)

    def write(self, folder: Path, data: ReportData) -> None:
        settings, rows, winner = data.settings, data.rows, data.winner
        n_train, n_test = data.split_counts
        src = "; ".join(f"`{s['feature_file']}` ({s['backbone']}, weights `{s['weights']}`)"
                        for s in data.sources)
        plots = "![score vs depth](layer_depth.png)\n\n"
        if settings["shots"]:
            plots += "![score vs labelled images per class](few_shot.png)\n\n"
        skipped = "".join(f"{line}\n\n" for line in skipped_heads(settings))
        md = (f"# Layer-depth comparison\n\nFeatures: {src}; {n_train} train / {n_test} test "
              f"rows, {len(data.classes)} classes.\n\n{data.verdict.markdown()}\n\n{skipped}"
              f"{markdown_table(rows, winner)}\n{how_to_read(data)}"
              f"\n\n{plots}![confusion matrix of the winner](confusion.png)\n")
        (folder / "report.md").write_text(md)


class Plots:
    """``layer_depth.png``, ``confusion.png`` and (with shots) ``few_shot.png``."""

    def files(self, data) -> tuple:
        return ("layer_depth.png", "few_shot.png", "confusion.png")

    def write(self, folder: Path, data: ReportData) -> None:
        from ..plots import plot_confusion, plot_depth, plot_few_shot

        plot_depth(folder / "layer_depth.png", data.rows, data.winner, data.metric)
        plot_confusion(folder / "confusion.png", data.confusion, data.classes, data.winner)
        if data.settings["shots"]:
            plot_few_shot(folder / "few_shot.png", data.rows, data.winner, data.metric)


class HeadFiles:
    """``heads/*.joblib`` (every frozen head, ready for ``predict``) and ``best.joblib``."""

    def files(self, data) -> tuple:
        return ("best.joblib",)

    def write(self, folder: Path, data: ReportData) -> None:
        (folder / "heads").mkdir()
        for name, head in data.heads.items():
            head.save(folder / name)
        shutil.copyfile(folder / data.best_head, folder / "best.joblib")


WRITERS = (HeadFiles(), Tables(), Markdown(), Plots(), Html())  # a new format: one more here

REPORT_FILES = tuple(f for w in WRITERS for f in w.files(None))


def write_report(folder: Path, data: ReportData) -> None:
    """Every registered writer's files into ``folder``."""
    for writer in WRITERS:
        writer.write(folder, data)
