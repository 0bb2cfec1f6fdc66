"""The report's figures: score vs depth, few-shot curve, confusion.

Figures are made with :class:`matplotlib.figure.Figure` directly (not pyplot), so nothing
global changes: no backend is selected for the caller, no figure is left registered."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_depth", "plot_few_shot", "plot_confusion", "plot_curve"]


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


def _save(fig, ax, path: Path, legend_size: int) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path)


def plot_depth(path: Path, rows, winner, metric: str) -> None:
    """Test score (95% CI) vs depth; one line per backbone x head. With several backbones the
    x axis is the relative depth (0..1) of the layer within its backbone's stored layers."""
    several = len({r["backbone"] for r in rows}) > 1
    xkey = "rel_depth" if several else "depth"
    fig, ax = _figure((8, 4.5))
    for (backbone, kind), rs in _lines(rows).items():
        rs = sorted(rs, key=lambda r: r[xkey])
        err = [[r[metric] - r[metric + "_lo"] for r in rs], [r[metric + "_hi"] - r[metric] for r in rs]]
        ax.errorbar([r[xkey] for r in rs], [r[metric] for r in rs], yerr=err, marker="o",
                    capsize=3, label=f"{backbone} {kind}" if several else kind)
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
    _save(fig, ax, path, legend_size=7)


def plot_few_shot(path: Path, rows, winner, metric: str, n_lines: int = 4) -> None:
    """Test score vs labelled images per class for the best rows by CV (mean ± std)."""
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
        ax.errorbar(xs, ys, yerr=sd, marker="o", capsize=3,
                    label=(f"{r['backbone']} " if several else "") + f"{r['layer']} ({r['head']})"
                    + (" *" if r is winner else ""))
        ax.set_xticks(xs)
        ax.set_xticklabels(numeric + (["all"] if "all" in shots else []))
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xlabel("labelled train images per class")
    ax.set_ylabel(f"test {metric.replace('_', ' ')} (mean ± std over draws)")
    ax.set_title("How many labels do I need?")
    _save(fig, ax, path, legend_size=8)


def plot_confusion(path: Path, cm, classes, winner) -> None:
    n = len(classes)
    fig, ax = _figure((1.2 + 0.5 * n, 1.0 + 0.5 * n))
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
