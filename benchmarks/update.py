"""``embed --update`` with 1% new images vs a full re-embed of the same data (one run, one
machine, the same backbone at its real input size).

Steps, on a generated folder of N JPEGs (256x256, K classes) or ``--data`` (copied):

1. a full embed of the N images (the file to update);
2. 1% new images are added; ``--update`` runs (times: the update);
3. a full embed of the N + 1% images into another file (the full re-embed);
4. one image is deleted and ``--update`` runs again: nothing to embed, every row copied (the
   copy alone, and the fixed costs: listing, loading the backbone).

Target (issue 24): update <= 5% of the full re-embed + the copy.

    python benchmarks/update.py [--n 400] [--backbone efficientnet_lite0] [--layer avgpool]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(root: Path, n: int, classes: int, start: int = 0, size: int = 256) -> list:
    rng = np.random.default_rng(start)
    out = []
    for i in range(start, start + n):
        c = i % classes
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(40 + 70 * c) % 256, (200 - 30 * c) % 256, (90 + 50 * c) % 256])
        arr = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img{i:06d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        out.append(path)
    return out


def timed(fn):
    t = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="images before the update")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--new", type=float, default=0.01, help="share of new images")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--layer", action="append", default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--keep", default=None, help="keep the work folder here")
    args = ap.parse_args()
    layers = args.layer or ["avgpool"]

    from featurecache import embed
    from featurecache.store import open_features

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fc-update-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)
    make_images(data, args.n, args.classes)
    kw = {"backbone": args.backbone, "layers": layers, "num_workers": args.workers,
          "progress": False}
    out, fresh = work / "f.h5", work / "fresh.h5"
    for p in (out, fresh):
        p.unlink(missing_ok=True)
    _, t_first = timed(lambda: embed(data, out, **kw))
    n_new = max(1, round(args.n * args.new))
    added = make_images(data, n_new, args.classes, start=args.n)
    r_up, t_up = timed(lambda: embed(data, out, update=True, **kw))
    assert r_up.update["new"] == n_new and r_up.update["embedded"] == n_new, r_up.update
    r_full, t_full = timed(lambda: embed(data, fresh, **kw))
    a, b = open_features(out), open_features(fresh)
    assert sorted(a.paths()) == sorted(b.paths())
    added[0].unlink()  # nothing new: the update is the copy and the fixed costs
    r_copy, t_copy = timed(lambda: embed(data, out, update=True, **kw))
    assert r_copy.update["embedded"] == 0 and r_copy.update["deleted"] == 1, r_copy.update
    budget = 0.05 * t_full + t_copy
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "backbone": args.backbone, "layers": layers, "n_before": args.n, "n_new": n_new,
        "first_embed_s": round(t_first, 2), "update_s": round(t_up, 2),
        "full_reembed_s": round(t_full, 2), "copy_only_update_s": round(t_copy, 2),
        "update_over_full": round(t_up / t_full, 4),
        "target_s": round(budget, 2), "meets_target": t_up <= budget,
        "full_images_per_s": round(r_full.n_rows / t_full, 1),
        "update_summary": {k: r_up.update[k] for k in ("new", "changed", "deleted", "unchanged",
                                                      "embedded", "copied")},
    }
    print(json.dumps(res, indent=1))
    print(f"update of {n_new} new images among {args.n}: {t_up:.2f}s vs a full re-embed "
          f"{t_full:.2f}s: ratio {t_up / t_full:.3f} (target <= 0.05 x full + copy = "
          f"{budget:.2f}s: {'met' if t_up <= budget else 'NOT met'}; copy-only update "
          f"{t_copy:.2f}s)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
