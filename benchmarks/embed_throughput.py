"""Embed-stage throughput and memory, measured in one run on the same images.

(a) pure model forward on pre-decoded tensors, the faster of NCHW and channels_last (the
    ceiling),
(b) ``featurecache.embed`` with 4 layers (decode in workers, one pass, background writer), in
    a fresh process with the allocator tuned as the command tunes it (see malloc.py),
(c) a naive script: DataLoader + one forward per layer + np.save,
and the peak RSS of (b) at N and 10*N images.

Targets (issue 3): b/a >= 0.9, b/c >= 2 for 4 layers, RSS(10N) / RSS(N) <= 1.2.

``--compile`` (issue 27) instead times ``embed`` eager (channels_last, the CPU default)
against ``embed(compile=True)`` at N and 10N images, each in a fresh process, end to end
(process start, backbone load, compile, decode, forward, file): compiled from an empty
inductor cache (a first run's cost), then again from the cache that run filled (a later
run's).

    python benchmarks/embed_throughput.py [--data ../shared/data/clipart10] [--n 200]
    python benchmarks/embed_throughput.py --compile --n 500
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from manifests import manifest  # benchmarks/manifests.py

from featurecache.backbones import load_backbone
from featurecache.data import ImageDataset, collate, open_source
from featurecache.extract import FeatureExtractor
from featurecache.layers import resolve_layers
from featurecache.malloc import tune

LAYERS = ["blocks.5", "blocks.10", "head", "avgpool"]
BATCH = 16  # embed's CPU default
TUNE = True


def pure_forward(bb, records, workers) -> dict:
    """img/s of the bare model on pre-decoded tensors, in each memory layout."""
    ds = ImageDataset(records, bb.preprocess.transform())
    x = torch.cat([b.images for b in torch.utils.data.DataLoader(
        ds, batch_size=BATCH, collate_fn=collate, num_workers=workers)])
    rates = {}
    for layout, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        model = bb.model.to(memory_format=fmt)
        xs = x.contiguous(memory_format=fmt)
        with torch.inference_mode():
            model(xs[:BATCH])  # warm-up
            t = time.perf_counter()
            for i in range(0, len(xs), BATCH):
                model(xs[i:i + BATCH])
            rates[layout] = len(x) / (time.perf_counter() - t)
    bb.model.to(memory_format=torch.contiguous_format)
    return rates


def naive(bb, records, workers, out: Path) -> float:
    t = time.perf_counter()
    loader = torch.utils.data.DataLoader(ImageDataset(records, bb.preprocess.transform()),
                                         batch_size=BATCH, collate_fn=collate, num_workers=workers)
    per_layer = {name: [] for name in LAYERS}
    specs = resolve_layers(bb, LAYERS)
    extractors = [FeatureExtractor(bb.model, [s]) for s in specs]  # one graph per layer
    for batch in loader:
        for s, ex in zip(specs, extractors):
            per_layer[s.name].append(ex(batch.images)[s.name].numpy())
    for name, parts in per_layer.items():
        np.save(out / f"{name.replace('.', '_')}.npy", np.concatenate(parts).astype(np.float16))
    return len(records) / (time.perf_counter() - t)


RSS_CHILD = """
import json, resource, sys, time
from featurecache import embed
from featurecache.malloc import tune
if sys.argv[4] == "1":
    tune()  # as the featurecache command does
r = embed(sys.argv[1], sys.argv[2], layers=%r, num_workers=int(sys.argv[3]), batch_size=%d,
          progress=False, overwrite=True, compile=sys.argv[5] == "1")
me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rows": r.n_rows, "rss_mib": me / 1024, "worker_rss_mib": kids / 1024,
                  "seconds": r.seconds}))
""" % (LAYERS, BATCH)


def peak_rss(src: Path, out: Path, workers: int, compiled: bool = False, env=None) -> dict:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", RSS_CHILD, str(src), str(out), str(workers),
                          "1" if TUNE else "0", "1" if compiled else "0"],
                         capture_output=True, text=True, check=True, env=env)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = time.perf_counter() - t
    return out


def compile_case(src, n: int, workers: int, tmp: Path) -> None:
    """Eager vs compiled embed at N and 10N, end to end, each in a fresh process: compiled
    from an empty inductor cache (a first run's cost), then again from the cache that run
    filled (a later run's)."""
    small = manifest(src.records, src.classes, n, tmp / "small.csv")
    big = manifest(src.records, src.classes, 10 * n, tmp / "big.csv")
    report = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} cores, torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d"), "layers": LAYERS, "batch": BATCH}
    for label, manifest_path in ((n, small), (10 * n, big)):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp / f"inductor-{label}"))  # empty
        row = {}
        for mode in ("eager", "compiled_cold", "compiled_warm"):
            out = tmp / ("eager.h5" if mode == "eager" else "compiled.h5")
            out.unlink(missing_ok=True)
            r = peak_rss(manifest_path, out, workers, mode != "eager", env)
            row[mode] = {"rows": r["rows"], "wall_s": round(r["wall_seconds"], 1),
                         "embed_s": round(r["seconds"], 1),
                         "img_s_end_to_end": round(r["rows"] / r["wall_seconds"], 1),
                         "rss_mib": round(r["rss_mib"])}
            print(label, mode, row[mode], flush=True)
        for mode in ("compiled_cold", "compiled_warm"):
            row[f"{mode}_over_eager_end_to_end"] = round(row["eager"]["wall_s"] /
                                                         row[mode]["wall_s"], 3)
        report[f"N={label}"] = row
    from featurecache import open_features

    a, b = open_features(tmp / "eager.h5"), open_features(tmp / "compiled.h5")
    report["max_abs_difference_10N"] = {
        name: float(np.abs(a.X(name).astype(np.float32) - b.X(name).astype(np.float32)).max())
        for name in LAYERS}
    print(json.dumps(report, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/clipart10"))
    ap.add_argument("--n", type=int, default=480, help="images for (a)-(c) and the small RSS run")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--no-tune", action="store_true",
                    help="keep glibc's malloc defaults (the command tunes them; see malloc.py)")
    ap.add_argument("--compile", action="store_true", help="eager vs compiled embed, N and 10N")
    args = ap.parse_args()
    global TUNE
    TUNE = not args.no_tune
    if TUNE:  # (a) and (c) run in this process, (b) in its own: all with the same allocator
        tune()
    src = open_source(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="fc-bench-"))
    if args.compile:
        return compile_case(src, args.n, args.workers, tmp)
    bb = load_backbone()
    small = manifest(src.records, src.classes, args.n, tmp / "small.csv")
    big = manifest(src.records, src.classes, 10 * args.n, tmp / "big.csv")
    records = open_source(small).records

    forward = pure_forward(bb, records, args.workers)
    a = max(forward.values())  # the fastest pure forward, either layout
    c = naive(bb, records, args.workers, tmp)
    # (b) in a fresh process, as the command runs it (the same run gives the peak RSS at N)
    rss_n = peak_rss(small, tmp / "rss_n.h5", args.workers)
    b = rss_n["rows"] / rss_n["seconds"]
    rss_10n = peak_rss(big, tmp / "rss_10n.h5", args.workers)
    report = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
        "date": time.strftime("%Y-%m-%d"), "images": args.n, "layers": LAYERS,
        "malloc_tuned": not args.no_tune,
        "a_pure_forward_img_s": round(a, 1),
        "a_by_layout_img_s": {k: round(v, 1) for k, v in forward.items()}, "b_embed_img_s": round(b, 1),
        "c_naive_img_s": round(c, 1), "b_over_a": round(b / a, 3), "b_over_c": round(b / c, 3),
        # at 10N the fixed costs of a call (backbone load, layer probe, file) are amortised
        "b_embed_img_s_10N": round(rss_10n["rows"] / rss_10n["seconds"], 1),
        "b_over_a_10N": round(rss_10n["rows"] / rss_10n["seconds"] / a, 3),
        "rss_N_mib": round(rss_n["rss_mib"], 1), "rss_10N_mib": round(rss_10n["rss_mib"], 1),
        "rss_ratio": round(rss_10n["rss_mib"] / rss_n["rss_mib"], 3),
        "rows_10N": rss_10n["rows"],
    }
    print(json.dumps(report, indent=1))
    print(f"\nb/a = {report['b_over_a']} (at 10N: {report['b_over_a_10N']}; target >= 0.9), b/c = {report['b_over_c']} (target >= 2), "
          f"RSS 10N/N = {report['rss_ratio']} (target <= 1.2)")


if __name__ == "__main__":
    main()
