"""``report.html``: the whole comparison as one self-contained page.

The verdict, a sortable results table (the winner marked), and the plots as inline SVG from
matplotlib's SVG backend, each point or cell named by a tooltip: score vs depth, few-shot
curve, the winner's confusion matrix, and recall per class x candidate. No network reference
(no script, style sheet, font or image from elsewhere), so it works offline and as a mail
attachment. The same inputs give the same bytes: no timestamp inside (the SVGs carry no date,
their ids are salted by a constant), and the run's own timing sentence is left out (it is in
``report.md`` and ``results.json``).
"""

from __future__ import annotations

import html
import io
import json
import re
from pathlib import Path

from ..stats import METRICS
from .rows import format_params

__all__ = ["Html", "svg_of"]

_METRIC_NAMES = {"accuracy": "test accuracy", "balanced_accuracy": "test balanced accuracy",
                 "macro_f1": "test macro-F1"}

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:78em;padding:0 1em;color:#1a1a1a}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em}
.verdict{background:#f5f7fa;border-left:4px solid #3a6ea5;padding:.8em 1em}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
th,td{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:right;white-space:nowrap}
th{cursor:pointer;background:#eef1f5;user-select:none;position:sticky;top:0}
th.text,td.text{text-align:left}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tr.winner td{font-weight:600;background:#fff6d6}
tr.winner td:first-child::before{content:"\\2605 "}
.ci{color:#666;font-size:.9em}.note{color:#444;font-size:13px;max-width:60em}
figure{margin:1em 0}svg{max-width:100%;height:auto}
"""

_SCRIPT = """
(function () {
  var table = document.getElementById("results");
  var body = table.tBodies[0];
  var heads = table.tHead.rows[0].cells;
  function value(row, col) {
    var v = row.cells[col].getAttribute("data-v");
    var x = parseFloat(v);
    return isNaN(x) ? v : x;
  }
  function sortBy(col, dir) {
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = value(a, col), y = value(b, col);
      var c = x < y ? -1 : x > y ? 1 : 0;
      return dir === "ascending" ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    for (var i = 0; i < heads.length; i++) heads[i].removeAttribute("aria-sort");
    heads[col].setAttribute("aria-sort", dir);
  }
  for (var i = 0; i < heads.length; i++) {
    heads[i].addEventListener("click", (function (col) {
      return function () {
        var now = heads[col].getAttribute("aria-sort");
        sortBy(col, now === "descending" ? "ascending" : "descending");
      };
    })(i));
  }
  var m = /sort=([\\w-]+?)-(asc|desc)$/.exec(location.hash);
  if (m) {
    for (var j = 0; j < heads.length; j++) {
      if (heads[j].getAttribute("data-key") === m[1]) {
        sortBy(j, m[2] === "asc" ? "ascending" : "descending");
      }
    }
  }
  document.documentElement.setAttribute("data-ready", "1");
})();
"""


def svg_of(fig, tips=(), prefix: str = "f") -> str:
    """A matplotlib figure as an inline ``<svg>`` element: no XML prolog, no metadata, no
    comments, no namespace URLs (the HTML parser supplies them); its ids prefixed (several
    SVGs share one page); each ``(gid, text)`` of ``tips`` a ``<title>`` tooltip."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "featurecache", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    s = buf.getvalue()
    s = s[s.index("<svg"):]
    s = re.sub(r"<metadata>.*?</metadata>\s*", "", s, flags=re.S)
    s = re.sub(r"<!--.*?-->", "", s, flags=re.S)
    s = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", s)
    s = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', s)
    s = re.sub(r'(xlink:href="#|href="#|url\(#)([^")]+)', lambda m: f"{m.group(1)}{prefix}-{m.group(2)}", s)
    for gid, text in tips:
        s = s.replace(f'<g id="{prefix}-{gid}">',
                      f'<g id="{prefix}-{gid}"><title>{html.escape(text)}</title>', 1)
    return s


def _cell(text: str, value, klass: str = "") -> str:
    v = "" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))
    k = f' class="{klass}"' if klass else ""
    return f'<td{k} data-v="{html.escape(v)}">{text}</td>'


def _score(r, m) -> str:
    return (f'{r[m]:.3f} <span class="ci">[{r[m + "_lo"]:.3f}, {r[m + "_hi"]:.3f}]</span>')


def results_table(rows, winner) -> str:
    """The results as an HTML table whose columns sort on click (``data-v`` per cell)."""
    several = len({r["backbone"] for r in rows}) > 1
    on_fold = any("selected_on" in r for r in rows)
    cols = ([("backbone", "backbone", True)] if several else []) + [
        ("depth", "depth", False), ("layer", "layer", True), ("head", "head", True),
        ("strategy", "strategy", True), ("dim", "dim", False), ("params", "best params", True),
        ("cv", "CV score", False)] + ([("select", "selection score", False)] if on_fold else []) + [
        (m, _METRIC_NAMES[m], False) for m in METRICS]
    head = "".join(f'<th data-key="{k}" class="{"text" if text else ""}">{html.escape(t)}</th>'
                   for k, t, text in cols)
    body = []
    for r in rows:
        params = format_params(r["params"])
        cv = (f"{r['cv_score']:.3f} ± {r['cv_std']:.3f}" if "n_val" not in r else
              f"{r['cv_score']:.3f} (val, {r['n_val']} rows)")
        cells = ([_cell(html.escape(r["backbone"]), r["backbone"], "text")] if several else []) + [
            _cell(f"{r['depth']:g}", float(r["depth"])),
            _cell(html.escape(r["layer"]), r["layer"], "text"),
            _cell(html.escape(r["head"]), r["head"], "text"),
            _cell(html.escape(r.get("strategy", "frozen")), r.get("strategy", "frozen"), "text"),
            _cell(str(r["dim"]), int(r["dim"])), _cell(html.escape(params), params, "text"),
            _cell(cv, float(r["cv_score"]))]
        if on_fold:
            cells.append(_cell(f"{r['select_score']:.3f} ± {r['select_sem']:.3f}",
                               float(r["select_score"])))
        cells += [_cell(_score(r, m), float(r[m])) for m in METRICS]
        mark = ' class="winner" title="chosen"' if r is winner else ""
        body.append(f"<tr{mark}>{''.join(cells)}</tr>")
    return (f'<table id="results"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


class Html:
    """``report.html``: the report as one self-contained, byte-stable page."""

    def files(self, data) -> tuple:
        return ("report.html",)

    def write(self, folder: Path, data) -> None:
        (folder / "report.html").write_text(render(data), encoding="utf-8")


def render(data) -> str:
    import numpy as np

    from ..plots import confusion_figure, depth_figure, few_shot_figure, recall_figure
    from .evaluate import per_class_recall
    from .verdict import how_to_read, skipped_heads

    rows, winner, metric = data.rows, data.winner, data.metric
    n_train, n_test = data.split_counts
    figures = []
    tips = []
    figures.append(("Test score vs depth", svg_of(depth_figure(rows, winner, metric, tips),
                                                  tips, "depth")))
    if data.settings["shots"]:
        tips = []
        figures.append(("How many labels do I need?",
                        svg_of(few_shot_figure(rows, winner, metric, tips), tips, "shots")))
    tips = []
    figures.append(("Confusion matrix of the winner (test split)",
                    svg_of(confusion_figure(data.confusion, data.classes, winner, tips), tips,
                           "cm")))
    if data.preds is not None:
        recall = per_class_recall(data.y_test, data.preds, len(data.classes))
        labels = [f"{r['backbone']} " * (len(data.sources) > 1) + f"{r['layer']} ({r['head']})"
                  for r in rows]
        tips = []
        figures.append(("Recall per class and candidate (test split)",
                        svg_of(recall_figure(labels, data.classes, np.asarray(recall), tips),
                               tips, "recall")))
    src = "; ".join(f"<code>{html.escape(s['feature_file'])}</code> ({html.escape(s['backbone'])}, "
                    f"weights <code>{html.escape(str(s['weights']))}</code>)" for s in data.sources)
    verdict = data.verdict.stable() if hasattr(data.verdict, "stable") else data.verdict
    settings = {k: v for k, v in data.settings.items() if k not in ("seconds", "run_id")}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>Layer-depth comparison</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Layer-depth comparison</h1>",
        f"<p>Features: {src}; {n_train} train / {n_test} test rows, {len(data.classes)} "
        f"classes.</p>",
        f'<p class="verdict">{verdict.html()}</p>',
        *(f'<p class="note">{html.escape(line)}</p>' for line in skipped_heads(data.settings)),
        "<h2>Results</h2>",
        '<p class="note">Click a column to sort; the winner (chosen before the test split was '
        "read) is starred.</p>",
        results_table(rows, winner),
        f'<p class="note">{_inline_md(how_to_read(data))}</p>',
    ]
    for title, svg in figures:
        parts.append(f"<h2>{html.escape(title)}</h2><figure>{svg}</figure>")
    parts.append(f'<h2>Settings</h2><pre>{html.escape(json.dumps(settings, indent=1, default=str))}</pre>')
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


def _inline_md(text: str) -> str:
    """The markdown paragraph's code spans as HTML."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
