"""The GPU path in one command (issue 27): model forwards, JPEG decode and the whole embed,
written to one JSON, in under 5 minutes on one GPU.

    python benchmarks/gpu.py [-o gpu.json] [--images 4096]
    python benchmarks/gpu.py --device cpu --quick      # a smoke run of this script, no GPU

Measured, each for a fixed time budget after a warm-up (``torch.cuda.synchronize`` around
every timed loop):

1. synthetic batch 256 (random input, weights none: speed does not depend on them) for
   ``resnet50`` and ``efficientnet_lite0``: eager fp32, AMP (float16 autocast), AMP +
   channels_last, and ``torch.compile`` of AMP + channels_last (its compile time reported
   apart); ``vit_b_16``: AMP;
2. ``torchvision.io.decode_jpeg`` over real JPEGs (the shared clipart10 images, re-encoded
   at 500x375 as photo-sized JPEGs) on the CPU (one core) vs ``device="cuda"`` in batches;
3. ``featurecache embed --device cuda`` end to end over those JPEGs (img/s, and the GPU's
   busy fraction sampled from ``nvidia-smi`` every 0.2 s) with 8 and 16 decode workers;
4. the GPU's name, clocks and memory, torch's and CUDA's versions.

The figures go into BENCHMARKS.md with the machine and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIP = HERE.parent.parent / "shared" / "data" / "clipart10"


def timed(step, sync, budget: float, warmup: int = 2) -> dict:
    """Run ``step()`` ``warmup`` times, then as often as fits in ``budget`` seconds."""
    for _ in range(warmup):
        step()
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        step()
        n += 1
        sync()
        if time.perf_counter() - t0 >= budget:
            break
    return {"iterations": n, "seconds": time.perf_counter() - t0}


def forwards(dev, batch: int, budget: float, quick: bool) -> list:
    import torch

    from featurecache.backbones import load_backbone

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if dev.type == "cuda" \
        else (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    plans = [("resnet50", ["fp32", "amp", "amp+cl", "compiled"]),
             ("efficientnet_lite0", ["fp32", "amp", "amp+cl", "compiled"]),
             ("vit_b_16", ["amp"])]
    if quick:
        plans = [("efficientnet_lite0", ["fp32", "amp+cl"])]
    rows = []
    for name, modes in plans:
        model = load_backbone(name, weights="none").model.eval().to(dev)
        size = 224
        for mode in modes:
            cl = mode in ("amp+cl", "compiled")
            m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            x = torch.randn(batch, 3, size, size, device=dev)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            compile_s = None
            if mode == "compiled":
                t0 = time.perf_counter()
                m = torch.compile(m)
                with torch.inference_mode(), autocast():
                    m(x)
                sync()
                compile_s = time.perf_counter() - t0

            def step(m=m, x=x, amp=mode != "fp32"):
                with torch.inference_mode():
                    if amp:
                        with autocast():
                            m(x)
                    else:
                        m(x)

            r = timed(step, sync, budget)
            rows.append({"model": name, "mode": mode, "batch": batch,
                         "img_per_s": round(batch * r["iterations"] / r["seconds"], 1),
                         "compile_s": None if compile_s is None else round(compile_s, 1)})
            print(json.dumps(rows[-1]), flush=True)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def make_jpegs(n: int, out: Path) -> list:
    """``n`` photo-sized JPEGs (500x375, quality 90) from the shared clipart10 PNGs, in an
    ImageFolder layout (``out/<class>/...``); their paths."""
    from PIL import Image

    pngs = sorted(CLIP.rglob("*.png"))
    paths = []
    for i in range(n):
        src = pngs[i % len(pngs)]
        cls = out / src.parent.name
        cls.mkdir(parents=True, exist_ok=True)
        p = cls / f"{src.stem}_{i}.jpg"
        Image.open(src).convert("RGB").resize((500, 375), Image.BILINEAR).save(p, quality=90)
        paths.append(p)
    return paths


def decode(paths, dev, budget: float) -> dict:
    import torch
    from torchvision.io import decode_jpeg, read_file

    data = [read_file(str(p)) for p in paths[:512]]
    torch.set_num_threads(1)  # one core, as one decode worker
    r = timed(lambda: [decode_jpeg(d) for d in data[:64]], lambda: None, budget, warmup=1)
    torch.set_num_threads(os.cpu_count() or 1)
    out = {"cpu_one_core_img_per_s": round(64 * r["iterations"] / r["seconds"], 1)}
    if dev.type == "cuda":
        sync = torch.cuda.synchronize
        for b in (64, 256):
            g = timed(lambda b=b: decode_jpeg(data[:b], device="cuda"), sync, budget)
            out[f"cuda_batch{b}_img_per_s"] = round(b * g["iterations"] / g["seconds"], 1)
    return out


class Busy:
    """The GPU's utilisation from ``nvidia-smi``, sampled every 0.2 s while open."""

    def __init__(self):
        self.samples, self._stop = [], threading.Event()
        self._cmd = shutil.which("nvidia-smi")

    def __enter__(self):
        def run():
            while not self._stop.is_set():
                try:
                    out = subprocess.run([self._cmd, "--query-gpu=utilization.gpu",
                                          "--format=csv,noheader,nounits", "-i", "0"],
                                         capture_output=True, text=True, timeout=5).stdout
                    self.samples.append(float(out.split()[0]))
                except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                    pass
                self._stop.wait(0.2)

        if self._cmd:
            self._thread = threading.Thread(target=run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def fraction(self):
        return round(sum(self.samples) / len(self.samples) / 100, 3) if self.samples else None


def embed_end_to_end(folder: Path, n: int, dev, workers) -> list:
    rows = []
    for w in workers:
        out = folder.parent / f"e{w}.h5"
        cmd = [sys.executable, "-m", "featurecache.cli", "embed", str(folder), "-o", str(out),
               "--device", dev.type, "--workers", str(w), "--layer", "stage4,avgpool",
               "--batch-size", "256" if dev.type == "cuda" else "16", "-q", "--overwrite"]
        with Busy() as busy:
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
        rows.append({"workers": w, "images": n, "wall_s": round(wall, 1),
                     "img_per_s": round(n / wall, 1), "gpu_busy": busy.fraction(),
                     "ok": res.returncode == 0,
                     "error": None if res.returncode == 0 else res.stderr.strip()[-500:]})
        print(json.dumps(rows[-1]), flush=True)
        out.unlink(missing_ok=True)
    return rows


def machine(dev) -> dict:
    import torch
    import torchvision

    info = {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        smi = shutil.which("nvidia-smi")
        if smi:
            q = "name,clocks.sm,clocks.max.sm,clocks.mem,memory.total,driver_version,power.limit"
            out = subprocess.run([smi, f"--query-gpu={q}", "--format=csv,noheader", "-i", "0"],
                                 capture_output=True, text=True).stdout.strip()
            info["nvidia_smi"] = dict(zip(q.split(","), [s.strip() for s in out.split(",")]))
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="gpu.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=4096, help="JPEGs for decode and embed")
    ap.add_argument("--budget", type=float, default=6.0, help="seconds per timed forward")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run of the script)")
    args = ap.parse_args(argv)
    import torch

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run on a GPU machine (or --device cpu --quick to try "
                 "the script).")
    t_start = time.perf_counter()
    result = {"machine": machine(dev)}
    n = 64 if args.quick else args.images
    budget = 1.0 if args.quick else args.budget
    result["forward"] = forwards(dev, 8 if args.quick else 256, budget, args.quick)
    with tempfile.TemporaryDirectory(prefix="fc-gpu-") as tmp:
        folder = Path(tmp) / "jpegs"
        paths = make_jpegs(n, folder)
        result["decode_jpeg"] = decode(paths, dev, budget / 2)
        print(json.dumps(result["decode_jpeg"]), flush=True)
        workers = [2] if args.quick else [8, 16]
        result["embed"] = embed_end_to_end(folder, n, dev, workers)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output} ({result['total_s']} s)")


if __name__ == "__main__":
    main()
