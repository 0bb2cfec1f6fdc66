"""The dense reports' files: ``results.json``, ``report.md``, ``layer_depth.png``, the
picture of predictions, ``heads/`` and ``best.joblib``, published as one unit
(:func:`featurecache.files.publish_folder`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .segment import CAVEAT

__all__ = ["publish", "mask_picture", "box_picture"]

METRIC = {"segment": ("miou", "mIoU"), "detect": ("map50", "mAP@0.5")}
HOW = {
    "segment": "each map cell is a sample labelled with the majority class of the mask pixels "
               "under it; test masks are predicted by upsampling the cell scores bilinearly "
               "to the mask size. mIoU is the mean IoU over the classes present in the truth "
               "or the prediction, background included (the mmseg definition).",
    "detect": "each map cell is labelled with the class of the box whose centre falls in it "
              "(else background) and regresses that box (centre offset, log size); a box is "
              "a cell whose class probability is a 3x3 local maximum, then non-maximum "
              "suppression (IoU 0.5); mAP@0.5 by pycocotools. The point is the depth "
              "comparison, not a state-of-the-art detector.",
}


def _row_name(r) -> str:
    return f"{r['layer']}-{r['head']}".replace("+", "_")


def publish(out, task: str, rows: list, winner: dict, info: dict, head_of, pictures) -> Path:
    """Write the report folder ``out`` (see the module); ``head_of(row)`` gives a row's
    :class:`~featurecache.dense.model.DenseHead`, ``pictures(path)`` draws the picture."""
    from ..files import publish_folder
    from . import heads as cell_heads

    metric, label = METRIC[task]

    def write(folder: Path):
        (folder / "heads").mkdir()
        saved = {}
        for r in rows:
            if cell_heads.get(r["head"]).compact or r is winner:
                name = f"heads/{_row_name(r)}.joblib"
                head_of(r).save(folder / name)
                saved[id(r)] = name
        head_of(winner).save(folder / "best.joblib")
        public = [{k: v for k, v in r.items() if k != "cv_results"} | {"head_file": saved.get(id(r))}
                  for r in rows]
        data = {"task": task, "metric": metric, "rows": public,
                "winner": public[rows.index(winner)], "info": info, "note": CAVEAT,
                "cv_results": {_row_name(r): r["cv_results"] for r in rows}}
        (folder / "results.json").write_text(json.dumps(data, indent=1, default=_plain))
        from ..plots import plot_depth

        # (a metric without an interval is drawn without error bars)
        drawn = [{**r, **{metric + e: r[metric] for e in ("_lo", "_hi")
                          if r.get(metric + e) is None}} for r in rows]
        plot_depth(folder / "layer_depth.png", drawn, drawn[rows.index(winner)], metric)
        picture = pictures(folder)
        (folder / "report.md").write_text(_markdown(task, rows, winner, info, picture))

    return publish_folder(out, write)


def _plain(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, tuple):
        return list(v)
    raise TypeError(type(v).__name__)


def _ci(r, key) -> str:
    lo, hi = r.get(key + "_lo"), r.get(key + "_hi")
    return f"{r[key]:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{r[key]:.3f}"


def _markdown(task, rows, winner, info, picture) -> str:
    metric, label = METRIC[task]
    what = "Segmentation" if task == "segment" else "Detection"
    lines = [f"# {what} probe: which depth of the maps?", "",
             f"Features: `{info['features']}`; {info['n_train_images']} training images "
             f"(about {rows[0]['n_cells']:,} cells sampled per probe, seed {info['seed']}), "
             f"{info['n_test_images']} test images; {len(info['classes'])} classes.", "",
             f"> {CAVEAT}", "", f"How: {HOW[task]} Parameters (and the winner) are chosen by "
             f"{info['cv']}-fold CV **grouped by image** on the training images (cells of one "
             f"image never on both sides of a fold); the test split is read only to report. "
             f"Intervals: 95% bootstrap over test images.", "",
             "## Verdict", "",
             f"**{winner['layer']} with {winner['head']}** (chosen by CV: "
             f"{winner['cv_score']:.3f}): test {label} {_ci(winner, metric)}.", ""]
    best_test = max(rows, key=lambda r: r[metric])
    if best_test is not winner:
        lines += [f"On test, {best_test['layer']} ({best_test['head']}) scores "
                  f"{best_test[metric]:.3f}; the choice is made by CV, not by the test split.", ""]
    extra = "| pixel acc. " if task == "segment" else ""
    lines += ["## Every probe", "",
              f"| layer | head | grid | dims | CV score | test {label} {extra}| params |",
              "|---|---|---|---|---|---|" + ("---|" if extra else "") + "---|"]
    for r in rows:
        star = " **(winner)**" if r is winner else ""
        pa = f"| {_ci(r, 'pixel_accuracy')} " if task == "segment" else ""
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"| {r['layer']}{star} | {r['head']} | {r['grid']}x{r['grid']} | {r['dim']} "
                     f"| {r['cv_score']:.3f} | {_ci(r, metric)} {pa}| {params} |")
    per = winner.get("per_class_iou") or winner.get("per_class_ap50")
    if per:
        name = "IoU" if task == "segment" else "AP@0.5"
        cis = winner.get("per_class_iou_ci", {})
        lines += ["", f"## Per class ({winner['layer']}, {winner['head']})", "",
                  f"| class | {name} |", "|---|---|"]
        for c, v in per.items():
            ci = cis.get(c)
            shown = "absent" if v is None else (f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
                                                if ci and ci[0] is not None else f"{v:.3f}")
            lines.append(f"| {c} | {shown} |")
    lines += ["", "## Figures", "", f"![{label} vs depth](layer_depth.png)", "",
              f"![test images, truth and prediction]({picture})", "",
              f"Heads: `best.joblib` (the winner) and `heads/` (every compact row; k-NN heads "
              f"keep their training cells and are saved only when they win). Predict new "
              f"images with `featurecache predict best.joblib IMAGES -o "
              f"{'masks/' if task == 'segment' else 'boxes.json'}`.", ""]
    return "\n".join(lines)


def _palette(n: int) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    pal = np.array([cmap(i % 20)[:3] for i in range(n)])
    pal[0] = (0.08, 0.08, 0.08)  # background dark
    return pal


def _image(ff, row: int, size: int):
    from PIL import Image

    from ..data.decode import read_file

    try:
        return np.asarray(read_file(ff.paths()[row]).resize((size, size), Image.BILINEAR))
    except Exception:  # noqa: BLE001 - the images may have moved since the embed
        return np.full((size, size, 3), 128, dtype=np.uint8)


def _colour(mask, pal, ignore):
    out = pal[np.minimum(mask, len(pal) - 1)]
    out[mask == ignore] = 1.0
    return out


def mask_picture(folder: Path, ff, rows, predicted: dict, classes, ignore, winner) -> str:
    """``predictions.png``: each shown test image, its true mask and the winner's mask."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    truth = ff.target_rows("mask", rows)
    pal = _palette(len(classes))
    fig = Figure(figsize=(9, 3 * len(rows) + 0.8), dpi=90)
    for i, r in enumerate(rows):
        panels = [(_image(ff, r, truth.shape[1]), "image"), (_colour(truth[i], pal, ignore), "truth"),
                  (_colour(predicted[r], pal, ignore), f"{winner['layer']} ({winner['head']})")]
        for j, (img, title) in enumerate(panels):
            ax = fig.add_subplot(len(rows), 3, 3 * i + j + 1)
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.legend(handles=[Patch(color=pal[k], label=c) for k, c in enumerate(classes)],
               loc="lower center", ncol=min(6, len(classes)), fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(folder / "predictions.png")
    return "predictions.png"


def box_picture(folder: Path, ff, rows, predicted: dict, classes, winner) -> str:
    """``predictions.png``: each shown test image with its true boxes (dashed) and the
    winner's boxes (solid, with scores)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    truth = ff.target_rows("boxes", rows)
    pal = _palette(len(classes))
    n = len(rows)
    fig = Figure(figsize=(3.2 * n, 3.6), dpi=90)
    size = int(ff.provenance["preprocess"]["crop"])
    for i, r in enumerate(rows):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(_image(ff, r, size))
        for c, x, y, w, h in truth[i]:
            ax.add_patch(Rectangle((x, y), w, h, fill=False, ls="--", lw=1, ec=pal[int(c)]))
        for c, x, y, w, h, s in predicted[r]:
            ax.add_patch(Rectangle((x, y), w, h, fill=False, lw=1.6, ec=pal[int(c)]))
            ax.text(x, y, f"{classes[int(c)]} {s:.2f}", fontsize=6, color="white",
                    bbox={"facecolor": pal[int(c)], "pad": 1, "lw": 0})
        ax.set_title(f"dashed: truth; solid: {winner['layer']}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(folder / "predictions.png")
    return "predictions.png"
