"""Crash-point sweep of the embed over a longer run: kill it, or fail a write with ENOSPC, at
the N-th write for N spread over the whole run; run the same command again; the file must be
identical, bit for bit, to an uninterrupted run's.

Segments are written with write(2) by the writer thread (one call per commit), the final file
with pwrite64(2) during the assembly; strace counts each syscall per thread, so the sweep hits
both phases. Needs strace.

    python benchmarks/crash_points.py [--data ../shared/data/clipart10] [--n 160] [--points 12]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = """
import dataclasses, sys
from featurecache import embed
from featurecache.backbones import Preprocess, load_backbone
bb = dataclasses.replace(load_backbone("efficientnet_lite0"), preprocess=Preprocess(resize=64, crop=64))
embed(sys.argv[1], sys.argv[2], backbone=bb, layers=["blocks.5", "head", "avgpool"],
      batch_size=8, commit_rows=16, num_workers=1, progress=False)
"""


def run(args, out: Path, env, strace=()):
    return subprocess.run([*strace, sys.executable, "-c", SCRIPT, str(args.manifest), str(out)],
                          env=env, capture_output=True, text=True, cwd=out.parent)


def count(args, out, env, syscall) -> int:
    res = run(args, out, env, ["strace", "-f", "--seccomp-bpf", "-c", "-o", "/dev/stderr",
                               "-e", f"trace={syscall}"])
    line = next(l for l in res.stderr.splitlines() if l.strip().endswith(syscall))
    return int(line.split()[3])


def spread(total: int, k: int) -> list:
    return sorted({max(1, round(total * (i + 1) / k)) for i in range(k)})


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/clipart10"))
    ap.add_argument("--n", type=int, default=160, help="images in the run")
    ap.add_argument("--points", type=int, default=12, help="crash points per syscall and fault")
    args = ap.parse_args()
    if shutil.which("strace") is None:
        sys.exit("needs strace")
    from featurecache.data import open_source

    src = open_source(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="fc-crash-"))
    args.manifest = tmp / "images.csv"
    with open(args.manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for r in src.records[:args.n]:
            w.writerow([r.path, src.classes[r.label], r.split])
    (tmp / "run").mkdir()
    out = tmp / "run" / "f.h5"
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    t0 = time.perf_counter()
    assert run(args, out, env).returncode == 0
    expected = out.read_bytes()
    out.unlink()
    totals = {}
    for syscall in ("write", "pwrite64"):
        totals[syscall] = count(args, out, env, syscall)
        out.unlink()
    failures, cases = [], 0
    for fault in ("signal=KILL", "error=ENOSPC"):
        for syscall, total in totals.items():
            for when in spread(total, args.points):
                cases += 1
                case = f"{fault} at {syscall} #{when}/{total}"
                res = run(args, out, env, ["strace", "-f", "--seccomp-bpf", "-o", "/dev/null",
                                           "-e", f"trace={syscall}", "-e",
                                           f"inject={syscall}:{fault}:when={when}"])
                problems = []
                if res.returncode == -11:
                    problems.append("segfault")
                if fault == "error=ENOSPC" and syscall == "pwrite64" and res.returncode and \
                        "no space left on device" not in res.stderr:  # the store's own write
                    problems.append(f"not reported as a full disk: {res.stderr.strip()[-300:]}")
                if out.exists() and out.read_bytes() != expected:
                    problems.append("a different file under the final name after the fault")
                again = run(args, out, env)
                if again.returncode != 0:
                    problems.append(f"resume failed: {again.stderr.strip()[-300:]}")
                elif out.read_bytes() != expected:
                    problems.append("resumed file differs from an uninterrupted run's")
                leftovers = sorted(p.name for p in out.parent.iterdir() if p.name != out.name)
                if leftovers:
                    problems.append(f"left behind: {leftovers}")
                print(f"{case:40s} rc={res.returncode:4d}  {'; '.join(problems) or 'ok'}",
                      flush=True)
                if problems:
                    failures.append(case)
                out.unlink(missing_ok=True)
    print(f"\n{args.n} images, {totals['write']} write + {totals['pwrite64']} pwrite64 calls per "
          f"run; {cases - len(failures)}/{cases} crash points resumed bit-identical "
          f"({time.perf_counter() - t0:.0f} s)")
    shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
