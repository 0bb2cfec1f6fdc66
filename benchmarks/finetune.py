"""Does LP-FT beat (or at least match) its own probe? The fine-tune vs the frozen logistic
head on the same test rows, on three sets, in one run (issue 22, item 10).

Sets:

* ``clipart10`` (457 train / 196 test);
* ``clipart10`` capped at 40 images per class and split (``--max-per-class 40``: the first
  40 train images of each class in path order; the test split keeps its <= 40 per class);
* ``shapes``: a synthetic 10-class silhouette set rendered here with PIL, deterministic
  (seeded), 210 train + 90 test images per class (2,100 / 900): filled shapes (circle,
  square, triangle, star, cross, ring, ellipse, pentagon, hexagon, crescent) of random size,
  position, rotation and colours, on a noisy background with distractor blobs. Embedded at
  128 px (``Preprocess(resize=128, crop=128)``, through the Python API: the CLI has no size
  option) so that the 2,100-row fine-tune fits the 2-core machine.

For each set: ``embed`` avgpool with the map of stage4 kept, ``finetune FEATS --from
stage4`` (from the cache; defaults but ``--epochs``), and ``compare FEATS --heads logreg
--layers avgpool --finetuned FT`` for the test scores of both on the same rows, the paired
bootstrap of the difference, and the selection on the same validation rows. It prints the
curves (training / validation loss and score per epoch, margin over the probe), the kept
epoch, the fold size, and the table of test scores with the targets:
fine-tune >= probe - 0.01 (clipart10, 40 per class), >= best frozen + 0.005 (shapes).

    python benchmarks/finetune.py [--work DIR] [--epochs 4] [--sets clipart10,clip40,shapes]

``--work`` keeps the embeds between runs (an embed of a complete file is a no-op).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clipart10"


def fc(*args) -> float:
    t = time.perf_counter()
    p = subprocess.run(["featurecache", *map(str, args)], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"featurecache {' '.join(map(str, args))} failed:\n{p.stderr[-2000:]}")
    return time.perf_counter() - t


def render_shapes(root: Path, train: int = 210, test: int = 90, size: int = 96) -> Path:
    """The synthetic silhouette set (deterministic: one seed per image)."""
    import numpy as np
    from PIL import Image, ImageDraw

    classes = ["circle", "square", "triangle", "star", "cross", "ring", "ellipse", "pentagon",
               "hexagon", "crescent"]
    if (root / "done").is_file():
        return root

    def polygon(n, r, cx, cy, rot, inner=None):
        pts = []
        for k in range(n * (2 if inner else 1)):
            rad = (inner if inner and k % 2 else r)
            a = rot + 2 * math.pi * k / (n * (2 if inner else 1))
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts

    for split, count in (("train", train), ("test", test)):
        for ci, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([ci, i, split == "test"])
                bg = rng.integers(0, 256, 3)
                arr = np.clip(bg + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(arr)
                d = ImageDraw.Draw(img)
                for _ in range(3):  # distractor blobs
                    x, y, s = rng.uniform(0, size, 2).tolist() + [rng.uniform(3, 9)]
                    d.ellipse([x - s, y - s, x + s, y + s], fill=tuple(rng.integers(0, 256, 3).tolist()))
                r = rng.uniform(0.18, 0.38) * size
                cx, cy = rng.uniform(r, size - r, 2)
                rot = rng.uniform(0, 2 * math.pi)
                col = tuple(rng.integers(0, 256, 3).tolist())
                if name == "circle":
                    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
                elif name == "ellipse":
                    d.polygon([(cx + r * math.cos(a) * math.cos(rot) - 0.5 * r * math.sin(a) * math.sin(rot),
                                cy + r * math.cos(a) * math.sin(rot) + 0.5 * r * math.sin(a) * math.cos(rot))
                               for a in np.linspace(0, 2 * math.pi, 40)], fill=col)
                elif name == "ring":
                    d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=col, width=max(3, int(r / 3)))
                elif name == "crescent":
                    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
                    ox, oy = cx + 0.5 * r * math.cos(rot), cy + 0.5 * r * math.sin(rot)
                    d.ellipse([ox - r, oy - r, ox + r, oy + r], fill=tuple(bg.tolist()))
                elif name == "cross":
                    for a in (rot, rot + math.pi / 2):
                        w = r / 3
                        dx, dy, px, py = r * math.cos(a), r * math.sin(a), w * -math.sin(a), w * math.cos(a)
                        d.polygon([(cx - dx - px, cy - dy - py), (cx + dx - px, cy + dy - py),
                                   (cx + dx + px, cy + dy + py), (cx - dx + px, cy - dy + py)], fill=col)
                else:
                    n = {"square": 4, "triangle": 3, "pentagon": 5, "hexagon": 6, "star": 5}[name]
                    d.polygon(polygon(n, r, cx, cy, rot, inner=r * 0.4 if name == "star" else None),
                              fill=col)
                img.save(root / split / name / f"{i:03d}.png")
    (root / "done").write_text("ok")
    return root


def embed_small(data: Path, out: Path) -> float:
    """The shapes set at 128 px, through the Python API (same layers and map as the CLI)."""
    import dataclasses

    from featurecache import embed
    from featurecache.backbones import Preprocess, load_backbone

    t = time.perf_counter()
    bb = load_backbone("efficientnet_lite0")
    bb = dataclasses.replace(bb, preprocess=Preprocess(resize=128, crop=128))
    embed(data, out, backbone=bb, layers=["avgpool"], keep_map=["stage4"], progress=False)
    return time.perf_counter() - t


def one_set(name, work: Path, epochs: int) -> dict:
    feats = work / f"{name}.h5"
    if name == "shapes":
        data = render_shapes(work / "shapes-data")
        t_embed = embed_small(data, feats)
    else:
        cap = ["--max-per-class", "40"] if name == "clip40" else []
        t_embed = fc("embed", DATA, "-o", feats, "--layer", "avgpool", "--keep-map", "stage4",
                     *cap, "-q")
    ft = work / f"ft-{name}"
    t_ft = fc("finetune", feats, "--from", "stage4", "-o", ft, "--epochs", epochs,
              "--patience", epochs, "--overwrite", "-q")
    rep = work / f"report-{name}"
    fc("compare", feats, "--heads", "logreg", "--layers", "avgpool", "--finetuned", ft, "-o",
       rep, "--overwrite", "-q")
    report = json.loads((rep / "results.json").read_text())
    summary = json.loads((ft / "summary.json").read_text())
    return {"name": name, "embed_s": t_embed, "ft_s": t_ft, "report": report,
            "summary": summary}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--sets", default="clipart10,clip40,shapes")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fc-finetune-"))
    work.mkdir(parents=True, exist_ok=True)
    results = [one_set(n, work, args.epochs) for n in args.sets.split(",")]
    print(f"# featurecache finetune benchmark, {time.strftime('%Y-%m-%d')}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"EfficientNet-Lite0, --from stage4 (cache), --epochs {args.epochs}")
    table = []
    for res in results:
        s, rep = res["summary"], res["report"]
        print(f"\n## {res['name']}: {rep['n_train']} train / {rep['n_test']} test; fold "
              f"{s['n_val']} validation rows of {s['n_train'] + s['n_val']}; embed "
              f"{res['embed_s']:.0f} s, finetune {res['ft_s']:.0f} s")
        print("| epoch | train loss | train score | val loss | val score | margin over probe "
              "(± se) |")
        print("|---|---|---|---|---|---|")
        for h in s["history"]:
            ts = "-" if h.get("train_score") is None else f"{h['train_score']:.3f}"
            print(f"| {h['epoch']} | {h['train_loss']:.4f} | {ts} | {h['val_loss']:.3f} | "
                  f"{h['val_score']:.3f} | {h.get('margin', 0):+.3f} ± {h.get('margin_se', 0):.3f} |")
        f = s["final_fit"]
        print(f"kept epoch {s['best_epoch']}; final model: refit on {f.get('n', '-')} rows "
              f"({f.get('epochs', '-')} epoch(s))")
        frozen = next(r for r in rep["rows"] if r["strategy"] == "frozen")
        tuned = next(r for r in rep["rows"] if r["strategy"] != "frozen")
        m = tuned["margin_over_frozen"]
        target = 0.005 if res["name"] == "shapes" else -0.01
        table.append((res["name"], frozen, tuned, m, target, rep["winner"]))
        print(f"selection ({tuned['selected_on']}): frozen {frozen['select_score']:.3f}, "
              f"fine-tune {tuned['select_score']:.3f}; winner {rep['winner']['strategy']} "
              f"{rep['winner']['layer']}")
    print("\n| set | frozen logreg avgpool: test acc / bal acc | LP-FT: test acc / bal acc "
          "| difference (bal acc, 95% CI) | target | met |")
    print("|---|---|---|---|---|---|")
    for name, fr, tu, m, target, _ in table:
        print(f"| {name} | {fr['accuracy']:.3f} / {fr['balanced_accuracy']:.3f} | "
              f"{tu['accuracy']:.3f} / {tu['balanced_accuracy']:.3f} | {m['difference']:+.3f} "
              f"({m['lo']:+.3f} to {m['hi']:+.3f}) | {'>=' if target > 0 else '>='} "
              f"{target:+.3f} | {'yes' if m['difference'] >= target else 'NO'} |")
    print(f"\nfiles in {work}")


if __name__ == "__main__":
    main()
