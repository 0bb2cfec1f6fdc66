"""Frozen heads vs LP-FT of the top blocks, from the cache and from images, on one data set
(default ``clipart10``), whole commands, in one run.

Steps (each a ``featurecache`` command, timed from outside, peak RSS from ``/usr/bin/time``):

1. ``embed`` avgpool, keeping the maps of stage4 and stage5 (``--keep-map``);
2. ``fit-head logreg`` and ``fit-head mlp`` on avgpool (the frozen strategies);
3. ``finetune`` from the cached stage4 map, and from images with ``--augment`` (the loop a
   practitioner writes by hand: decode, augment, frozen bottom, trainable top), the same
   settings; then the same at stage5 (only the classifier above it: timing);
4. ``compare --finetuned`` for the one report: test scores, margins (paired bootstrap).

Reports test accuracy and wall time of every strategy, seconds per training epoch, and the
ratio images / cache per epoch at stage4 (target >= 2.5) and stage5; and the peak memory of
the cached fine-tune beside the size of the maps it reads (they are read one batch at a time,
never all at once).

    python benchmarks/finetune_speed.py [--data ../shared/data/clipart10] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path


def run(*args) -> tuple:
    """``(wall seconds, peak RSS MiB)`` of one featurecache command."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", "featurecache", *map(str, args)],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"featurecache {' '.join(map(str, args))} failed:\n{p.stderr[-2000:]}")
    return wall, int(p.stderr.strip().splitlines()[-1]) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/clipart10"))
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--stage5-epochs", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fc-finetune-"))
    feats = tmp / "feats.h5"
    out = {}
    out["embed"] = run("embed", args.data, "-o", feats, "--layer", "avgpool",
                       "--keep-map", "stage4,stage5", "-q")
    for kind in ("logreg", "mlp"):
        out[kind] = run("fit-head", kind, feats, "--layer", "avgpool", "-o",
                        tmp / f"{kind}.joblib", "-q")
    common = ["--epochs", args.epochs, "--patience", args.epochs, "-q"]
    out["ft-cache-stage4"] = run("finetune", feats, "--from", "stage4", "-o", tmp / "c4", *common)
    out["ft-images-stage4"] = run("finetune", args.data, "--from", "stage4", "--augment",
                                  "-o", tmp / "i4", *common)
    short = ["--epochs", args.stage5_epochs, "--patience", args.stage5_epochs, "-q"]
    out["ft-cache-stage5"] = run("finetune", feats, "--from", "stage5", "-o", tmp / "c5", *short)
    out["ft-images-stage5"] = run("finetune", args.data, "--from", "stage5", "--augment",
                                  "-o", tmp / "i5", *short)
    out["compare"] = run("compare", feats, "--heads", "logreg,mlp", "--layers", "avgpool",
                         "--finetuned", tmp / "c4", "--finetuned", tmp / "i4", "-o",
                         tmp / "report", "-q")
    report = json.loads((tmp / "report" / "results.json").read_text())
    info = json.loads(subprocess.run(["featurecache", "info", feats, "--json"], check=True,
                                     capture_output=True, text=True).stdout)
    summaries = {k: json.loads((tmp / k / "summary.json").read_text())
                 for k in ("c4", "i4", "c5", "i5")}

    print(f"# featurecache finetune benchmark, {time.strftime('%Y-%m-%d')}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"data {args.data}: {report['n_train']} train / {report['n_test']} test rows; "
          f"embed {out['embed'][0]:.0f} s (avgpool + maps of stage4, stage5)")
    print("\n| strategy | test accuracy | balanced accuracy | wall s | s per epoch | kept epoch "
          "| peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    by_head = {(r["strategy"], r["head"]): r for r in report["rows"]}
    for name, key, wall in (("frozen, logreg on avgpool", ("frozen", "logreg"), out["logreg"]),
                            ("frozen, mlp on avgpool", ("frozen", "mlp"), out["mlp"])):
        r = by_head[key]
        print(f"| {name} | {r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} | {wall[0]:.1f} "
              f"| - | - | {wall[1]:.0f} |")
    for name, k, step in (("LP-FT from cached stage4", "c4", "ft-cache-stage4"),
                          ("LP-FT from images (augmented), stage4", "i4", "ft-images-stage4"),
                          ("LP-FT from cached stage5", "c5", "ft-cache-stage5"),
                          ("LP-FT from images (augmented), stage5", "i5", "ft-images-stage5")):
        s = summaries[k]
        print(f"| {name} | {s['test']['accuracy']:.3f} | {s['test']['balanced_accuracy']:.3f} "
              f"| {out[step][0]:.1f} | {s['seconds_per_epoch']:.2f} | {s['best_epoch']} of "
              f"{len(s['history']) - 1} | {out[step][1]:.0f} |")
    for stage, c, i in (("stage4", "c4", "i4"), ("stage5", "c5", "i5")):
        ratio = summaries[i]["seconds_per_epoch"] / summaries[c]["seconds_per_epoch"]
        target = " (target >= 2.5)" if stage == "stage4" else ""
        print(f"\nepoch from images / epoch from the cache, {stage}: {ratio:.2f}x{target}")
    maps = {k: v["bytes"] / 2**20 for k, v in info["maps"].items()}
    print("\nstored maps: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in maps.items())
          + f"; the cached stage4 fine-tune peaked at {out['ft-cache-stage4'][1]:.0f} MiB RSS, "
          f"stage5 at {out['ft-cache-stage5'][1]:.0f} MiB")
    for r in report["rows"]:
        if "margin_over_frozen" in r:
            m = r["margin_over_frozen"]
            print(f"{r['strategy']}: {m['metric']} {m['difference']:+.3f} over {m['best_frozen']} "
                  f"(95% CI {m['lo']:+.3f} to {m['hi']:+.3f}, paired bootstrap)")
    print(f"\nverdict: {report['verdict']}")
    print(f"\nfiles in {tmp}")


if __name__ == "__main__":
    main()
