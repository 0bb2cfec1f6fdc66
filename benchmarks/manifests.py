"""A CSV manifest of ``n`` rows cycling over a data set's images, for the benchmarks."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path


def manifest(records, classes, n, path: Path, split=lambda i: "train") -> Path:
    """Rows ``path,label,split`` (``split(i)`` for row ``i``); beyond the data set's size the
    images are copied under new names (a manifest lists each file once)."""
    copies = path.with_suffix("")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for i in range(n):
            r = records[i % len(records)]
            p = r.path
            if i >= len(records):
                copies.mkdir(exist_ok=True)
                p = copies / f"{i}{Path(r.path).suffix}"
                shutil.copyfile(r.path, p)
            w.writerow([p, classes[r.label], split(i)])
    return path
