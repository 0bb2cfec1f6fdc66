"""Exported model benchmark (issue 26): images/s of a head exported with ``featurecache
export`` under onnxruntime against ``featurecache predict`` on the same images, and the
model alone (onnxruntime's session vs torch's eager forward of the very graph that was
exported, same uint8 batches), in one run on one machine.

    python benchmarks/export.py [HEAD.joblib] [--images DIR] [--batch 32]

Without HEAD, ``../shared/data/clipart10`` is embedded (avgpool, Lite0, 8 images a class
and split) and a logreg head fitted on it (not timed). Printed: the wall time and images/s
of each contender, their ratios, and whether the exported model's classes equal predict's
on every image (and the largest probability difference).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CLIP = HERE.parent.parent / "shared" / "data" / "clipart10"
CLI = [sys.executable, "-m", "featurecache.cli"]


def load(path, pre):
    """The README's onnxruntime preprocessing: PIL, torchvision's Resize + CenterCrop rule."""
    from PIL import Image, ImageOps

    size, crop = pre["resize_size"], pre["crop_size"]
    im = ImageOps.exif_transpose(Image.open(path)).convert("RGBA")
    im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im).convert("RGB")
    w, h = im.size
    im = im.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size),
                   getattr(Image.Resampling, pre["interpolation"].upper()))
    x, y = int(round((im.width - crop) / 2)), int(round((im.height - crop) / 2))
    return np.asarray(im.crop((x, y, x + crop, y + crop)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("head", nargs="?")
    ap.add_argument("--images", default=str(CLIP))
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    import onnxruntime as ort
    import torch

    work = Path(tempfile.mkdtemp(prefix="fc-export-bench-"))
    head = args.head
    if head is None:
        subprocess.run([*CLI, "embed", str(CLIP), "-o", str(work / "f.h5"), "--max-per-class",
                        "8", "-q"], check=True)
        head = str(work / "best.joblib")
        subprocess.run([*CLI, "fit-head", "logreg", str(work / "f.h5"), "--layer", "avgpool",
                        "-o", head, "-q"], check=True)
    model = work / "m.onnx"
    t0 = time.perf_counter()
    subprocess.run([*CLI, "export", head, "-o", str(model)], check=True, stdout=subprocess.DEVNULL)
    export_s = time.perf_counter() - t0

    # 1. featurecache predict, the whole command
    t0 = time.perf_counter()
    subprocess.run([*CLI, "predict", head, args.images, "-o", str(work / "p.csv"),
                    "--batch-size", str(args.batch)], check=True, stdout=subprocess.DEVNULL)
    predict_s = time.perf_counter() - t0
    rows = {r["path"]: r for r in csv.DictReader(open(work / "p.csv"))}
    paths = sorted(rows)
    n = len(paths)

    # 2. onnxruntime: decode as the README does + the session, batched
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    classes, pre = json.loads(meta["classes"]), json.loads(meta["preprocess"])
    t0 = time.perf_counter()
    arrays = [load(p, pre) for p in paths]
    decode_s = time.perf_counter() - t0
    batches = [np.stack(arrays[i:i + args.batch]) for i in range(0, n, args.batch)]
    t0 = time.perf_counter()
    probs = np.concatenate([sess.run(None, {"images": b})[-1] for b in batches])
    ort_s = time.perf_counter() - t0

    # 3. torch's eager forward of the same graph (what export traced), same batches
    from featurecache.export import ImageGraph
    from featurecache.saved import load_model

    from featurecache.malloc import tune

    tune()  # the allocator settings the featurecache command runs with
    ex = load_model(head).exportable()
    graph = ImageGraph(ex.module, ex.backbone.preprocess.mean, ex.backbone.preprocess.std).eval()
    with torch.inference_mode():
        graph(torch.from_numpy(batches[0]))  # warm-up, as onnxruntime's session creation is
        t0 = time.perf_counter()
        eager = np.concatenate([graph(torch.from_numpy(b))[-1].numpy() for b in batches])
        eager_s = time.perf_counter() - t0
        graph = graph.to(memory_format=torch.channels_last)  # the layout embed runs in
        graph(torch.from_numpy(batches[0]))
        t0 = time.perf_counter()
        last = np.concatenate([graph(torch.from_numpy(b))[-1].numpy() for b in batches])
        last_s = time.perf_counter() - t0

    same = sum(classes[int(p.argmax())] == rows[q]["predicted"] for p, q in zip(probs, paths))
    diff = max(abs(float(p.max()) - float(rows[q]["probability"])) for p, q in zip(probs, paths))
    print(f"# {platform.node()} {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), onnxruntime {ort.__version__}; {n} images of "
          f"{args.images}, batch {args.batch}; export took {export_s:.1f} s")
    print(f"| contender | wall s | img/s |\n| --- | ---: | ---: |")
    print(f"| `featurecache predict` (whole command: start, decode, forward, head, CSV) "
          f"| {predict_s:.2f} | {n / predict_s:.1f} |")
    print(f"| onnxruntime: README decode + session | {decode_s + ort_s:.2f} | "
          f"{n / (decode_s + ort_s):.1f} |")
    print(f"| onnxruntime session only | {ort_s:.2f} | {n / ort_s:.1f} |")
    print(f"| torch eager forward of the exported graph | {eager_s:.2f} | {n / eager_s:.1f} |")
    print(f"| the same, channels_last (embed's layout) | {last_s:.2f} | {n / last_s:.1f} |")
    print(f"onnxruntime (decode + session) / predict: {predict_s / (decode_s + ort_s):.2f}x; "
          f"session / torch eager: {eager_s / ort_s:.2f}x (channels_last "
          f"{last_s / ort_s:.2f}x); classes equal on {same} of {n}; "
          f"largest probability difference {diff:.1e} (predict's CSV rounds to 1e-6)")
    np.testing.assert_allclose(eager, probs, atol=1e-4)
    np.testing.assert_allclose(last, probs, atol=1e-4)


if __name__ == "__main__":
    main()
