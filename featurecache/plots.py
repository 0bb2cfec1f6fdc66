"""The report's figures: score vs depth, few-shot curve, confusion.

Figures are made with :class:`matplotlib.figure.Figure` directly (not pyplot), so nothing
global changes: no backend is selected for the caller, no figure is left registered."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_depth", "plot_few_shot", "plot_confusion", "plot_curve", "depth_figure",
           "few_shot_figure", "confusion_figure", "recall_figure"]


def _figure(figsize, dpi: int = 110):
    """A figure and its axes, outside pyplot (saved through the Agg canvas)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.add_subplot()


def _lines(rows):
    """(backbone, head) -> rows, in first-seen order; each fine-tuned model is a line (a
    point) of its own, ``lp-ft (cache)``."""
    out = {}
    for r in rows:
        tuned = r.get("strategy", "frozen") != "frozen"
        head = f"{r['head']} ({r['strategy'].split('(')[-1].rstrip(')')})" if tuned else r["head"]
        out.setdefault((r["backbone"], head), []).append(r)
    return out


def _finish(fig, ax, legend_size: int):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    return fig


def _tip(artist, text: str, tips: list) -> None:
    """Name a point: its artist gets an id, and ``tips`` maps that id to the text (the HTML
    report shows it as a tooltip; the PNG ignores it)."""
    gid = f"tip-{len(tips)}"
    artist.set_gid(gid)
    tips.append((gid, text))


def plot_depth(path: Path, rows, winner, metric: str) -> None:
    """Test score (95% CI) vs depth; one line per backbone x head."""
    depth_figure(rows, winner, metric, []).savefig(path)


def depth_figure(rows, winner, metric: str, tips: list):
    """The depth plot's figure: test score (95% CI) vs depth, one line per backbone x head.
    With several backbones the x axis is the relative depth (0..1) of the layer within its
    backbone's stored layers. Every point is named in ``tips``."""
    several = len({r["backbone"] for r in rows}) > 1
    xkey = "rel_depth" if several else "depth"
    fig, ax = _figure((8, 4.5))
    for (backbone, kind), rs in _lines(rows).items():
        rs = sorted(rs, key=lambda r: r[xkey])
        err = [[r[metric] - r[metric + "_lo"] for r in rs], [r[metric + "_hi"] - r[metric] for r in rs]]
        bars = ax.errorbar([r[xkey] for r in rs], [r[metric] for r in rs], yerr=err, marker="o",
                           capsize=3, label=f"{backbone} {kind}" if several else kind)
        for r in rs:
            dot, = ax.plot([r[xkey]], [r[metric]], "o", color=bars[0].get_color(), ms=9,
                           alpha=0.01)  # a hover target per point
            _tip(dot, f"{r['backbone']} {r['layer']} ({r['head']}): test {metric} "
                      f"{r[metric]:.3f} [{r[metric + '_lo']:.3f}, {r[metric + '_hi']:.3f}], "
                      f"CV {r['cv_score']:.3f}", tips)
    ax.plot([winner[xkey]], [winner[metric]], "*", ms=16, color="gold", markeredgecolor="black",
            label=f"chosen by CV: {winner['layer']} ({winner['head']})")
    if several:
        ax.set_xlabel("relative depth of the layer in its backbone (0 = first stored, 1 = deepest)")
    else:
        ticks = sorted({(r["depth"], r["layer"]) for r in rows})
        ax.set_xticks([t[0] for t in ticks])
        ax.set_xticklabels([t[1] for t in ticks], rotation=35, ha="right", fontsize=8)
        ax.set_xlabel("layer (by depth)")
    ax.set_ylabel(f"test {metric.replace('_', ' ')} (95% CI)")
    ax.set_title("Which layer? Test score vs depth (winner chosen by CV)")
    return _finish(fig, ax, legend_size=7)


def plot_few_shot(path: Path, rows, winner, metric: str, n_lines: int = 4) -> None:
    """Test score vs labelled images per class for the best rows by CV (mean ± std)."""
    few_shot_figure(rows, winner, metric, [], n_lines).savefig(path)


def few_shot_figure(rows, winner, metric: str, tips: list, n_lines: int = 4):
    """The few-shot plot's figure; every point named in ``tips``."""
    best = sorted((r for r in rows if "few_shot" in r), key=lambda r: -r["cv_score"])[:n_lines]
    several = len({r["backbone"] for r in rows}) > 1
    fig, ax = _figure((7, 4.5))
    for r in best:
        shots = list(r["few_shot"])
        numeric = [s for s in shots if s != "all"]
        xs = [int(s) for s in numeric]
        if "all" in shots:
            xs.append(max(xs + [1]) * 2)
        ys = [r["few_shot"][s]["mean"] for s in shots]
        sd = [r["few_shot"][s]["std"] for s in shots]
        label = (f"{r['backbone']} " if several else "") + f"{r['layer']} ({r['head']})"
        bars = ax.errorbar(xs, ys, yerr=sd, marker="o", capsize=3,
                           label=label + (" *" if r is winner else ""))
        for x, s, y, d in zip(xs, shots, ys, sd):
            dot, = ax.plot([x], [y], "o", color=bars[0].get_color(), ms=9, alpha=0.01)
            _tip(dot, f"{label}, {s} per class: test {metric} {y:.3f} ± {d:.3f}", tips)
        ticks = (xs, [str(s) for s in numeric] + (["all"] if "all" in shots else []))
    ax.set_xscale("log")  # before the ticks: setting the scale resets them
    if best:
        ax.set_xticks(ticks[0])
        ax.set_xticklabels(ticks[1])
    ax.minorticks_off()
    ax.set_xlabel("labelled train images per class")
    ax.set_ylabel(f"test {metric.replace('_', ' ')} (mean ± std over draws)")
    ax.set_title("How many labels do I need?")
    return _finish(fig, ax, legend_size=8)


def plot_confusion(path: Path, cm, classes, winner) -> None:
    confusion_figure(cm, classes, winner, []).savefig(path)


MAX_CELL_TIPS = 900  # cells named one by one up to 30 x 30 classes


def _cells(ax, values, rows, cols, fmt, tips, what, dark_high: bool = True, top=None) -> None:
    """Numbers in the cells of a heat map, each cell a hover target named in ``tips``."""
    from matplotlib.patches import Rectangle

    many = len(rows) * len(cols) > MAX_CELL_TIPS
    if top is None:
        top = np.nanmax(values) if np.isfinite(values).any() else 1
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = values[i, j]
            high = np.isfinite(v) and v > top / 2
            ax.text(j, i, fmt(v), ha="center", va="center", fontsize=7,
                    color="white" if high == dark_high else "black")
            if not many:
                cell = ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=0))
                _tip(cell, what(i, j, v), tips)


def confusion_figure(cm, classes, winner, tips: list):
    """The winner's confusion matrix on the test split; each cell named in ``tips``."""
    n = len(classes)
    fig, ax = _figure((1.2 + 0.5 * n, 1.0 + 0.5 * n))
    ax.imshow(cm, cmap="Blues")
    _cells(ax, np.asarray(cm, dtype=float), classes, classes, lambda v: str(int(v)), tips,
           lambda i, j, v: f"true {classes[i]}, predicted {classes[j]}: {int(v)} images")
    ax.set_xticks(range(n))
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n))
    ax.set_yticklabels(classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{winner['layer']} ({winner['head']}), test split", fontsize=9)
    fig.tight_layout()
    return fig


def recall_figure(labels, classes, recall, tips: list):
    """Per-class recall on the test split (columns) of every candidate (rows, ``labels``)."""
    n, m = len(labels), len(classes)
    fig, ax = _figure((2.5 + 0.45 * m, 1.2 + 0.32 * n))
    ax.imshow(np.ma.masked_invalid(recall), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    _cells(ax, recall, labels, classes, lambda v: "-" if not np.isfinite(v) else f"{v:.2f}"[1:]
           if v < 1 else "1", tips,
           lambda i, j, v: f"{labels[i]}: recall of {classes[j]} "
                           + ("- (no test image)" if not np.isfinite(v) else f"{v:.3f}"),
           dark_high=False, top=1.0)  # viridis on 0..1: light at the top
    ax.set_xticks(range(m))
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("class")
    ax.set_title("Test recall per class and candidate", fontsize=9)
    fig.tight_layout()
    return fig



def plot_curve(path: Path, history: list, best_epoch: int, scoring: str) -> None:
    """Fine-tuning: training loss and validation score per epoch (epoch 0 = the linear
    probe before any step); the kept epoch is marked."""
    fig, ax = _figure((7, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:blue",
            label="training loss")
    ax.plot(epochs, [h["val_loss"] for h in history], "s--", color="tab:cyan",
            label="validation loss")
    ax.set_xlabel("epoch (0 = linear probe, before fine-tuning)")
    ax.set_ylabel("cross-entropy")
    ax.set_xticks(epochs)
    right = ax.twinx()
    right.plot(epochs, [h["val_score"] for h in history], "^-", color="tab:red",
               label=f"validation {scoring.replace('_', ' ')}")
    best = next(h for h in history if h["epoch"] == best_epoch)
    right.plot([best_epoch], [best["val_score"]], "*", ms=16, color="gold",
               markeredgecolor="black", label=f"kept: epoch {best_epoch}")
    right.set_ylabel(f"validation {scoring.replace('_', ' ')}")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")
    ax.set_title("LP-FT: loss and validation score per epoch")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
