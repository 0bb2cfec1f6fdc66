"""Committed segments of an unfinished run, and the one assembly of the final file.

A segment ``NAME.partial/seg-000042.h5`` holds the rows of one commit (see
:mod:`featurecache.store.writer`). :func:`list_segments` finds the committed ones;
:func:`assemble` copies their rows into ``NAME`` in blocks of a fixed number of rows, so the
final file's bytes do not depend on where the segments were cut.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError
from ..files import fsync_dir
from .layout import create_row_datasets, decode, write_header, write_rows

__all__ = ["list_segments", "assemble", "no_space"]


def list_segments(folder: Path) -> list:
    """Committed segments of a partial folder, in order, as ``(path, attrs)``; stops at the
    first gap or unreadable segment (nothing after it can be trusted)."""
    out, expected = [], 0
    for p in sorted(folder.glob("seg-*.h5")):
        try:
            with h5py.File(p, "r") as f:
                attrs = {k: decode(v) for k, v in f.attrs.items()}
        except OSError:
            break
        if attrs.get("input_start") != expected:
            break
        out.append((p, attrs))
        expected = attrs["input_end"]
    return out


def no_space(exc: BaseException) -> bool:
    """Whether an error (OS or HDF5) means the disk is full."""
    return getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc) \
        or "errno = 28" in str(exc)


def assemble(path: Path, partial: Path, meta: dict, specs, classes) -> None:
    """Copy the segments of ``partial``, in order, into the final file ``path`` (written
    through a :class:`~featurecache.store.shield.Shield`: complete and renamed, or an
    error), then remove the partial folder. ``meta`` is the run's provenance with
    ``n_done``."""
    from .shield import hdf5_output

    for stale in path.parent.glob(f".{path.name}.*"):  # an assembly a crash cut
        stale.unlink(missing_ok=True)  # short (we hold the output's lock)
    segments = list_segments(partial)
    n = sum(int(a["n_rows"]) for _, a in segments)
    k = sum(int(a["n_skipped"]) for _, a in segments)
    attrs = {**meta, "n_committed": n, "n_skipped": k, "complete": True}
    try:
        with hdf5_output(path) as out:
            write_header(out, attrs, classes)  # attrs carry the run's "created"
            create_row_datasets(out, specs, meta["dtype"], n, k)
            row_bytes = sum(s.dim for s in specs if not s.is_target) * np.dtype(
                meta["dtype"]).itemsize + sum(s.dim for s in specs if s.is_target)
            size = max(1, min(4096, (64 << 20) // row_bytes))  # rows per copy: <= 64 MiB
            for start, block in _blocks(segments, specs, size):
                write_rows(out, start, block["features"], block["labels"], block["paths"],
                           block["splits"], 0, [], block["stamps"])
            write_rows(out, 0, {}, [], [], [], 0, _skipped(segments))
    except OSError as exc:
        if no_space(exc):
            raise StoreError(f"no space left on device while writing {path}; the "
                             f"committed rows are kept in {partial}: free some space "
                             f"and run the same command again to finish.") from None
        raise
    shutil.rmtree(partial, ignore_errors=True)
    fsync_dir(path.parent)


def _blocks(segments, specs, size: int):
    """The committed rows as ``(start, block)`` in blocks of ``size`` rows, whatever the
    segments' sizes: the final file's bytes (HDF5 allocates string heap space per write) must
    not depend on where a run was interrupted."""
    pending, start, done = [], 0, 0
    for p, a in segments:
        m = int(a["n_rows"])
        if not m:
            continue
        with h5py.File(p, "r") as seg:
            pending.append({"features": {s.key: seg[s.path][:m] for s in specs},  # (boxes:
                            # bytes, as h5py reads strings; written back the same)
                            "labels": seg["labels"][:m],
                            "paths": [decode(v) for v in seg["paths"][:m]],
                            "splits": [decode(v) for v in seg["splits"][:m]],
                            "stamps": [decode(v) for v in seg["stamps"][:m]] if "stamps" in seg
                            else [""] * m})  # a segment of featurecache before stamps
        done += m
        while done - start >= size:
            block, pending = _take(pending, size)
            yield start, block
            start += size
    if done > start:
        yield start, _take(pending, done - start)[0]


def _take(parts: list, size: int):
    """The first ``size`` rows of a list of row blocks, and the rest."""
    taken, rest, need = [], [], size
    for part in parts:
        m = len(part["labels"])
        if need >= m:
            taken.append(part)
            need -= m
        elif need > 0:
            taken.append(_slice(part, 0, need))
            rest.append(_slice(part, need, m))
            need = 0
        else:
            rest.append(part)
    block = {"features": {name: np.concatenate([t["features"][name] for t in taken])
                          for name in taken[0]["features"]},
             "labels": np.concatenate([t["labels"] for t in taken]),
             "paths": [v for t in taken for v in t["paths"]],
             "splits": [v for t in taken for v in t["splits"]],
             "stamps": [v for t in taken for v in t["stamps"]]}
    return block, rest


def _slice(part: dict, i: int, j: int) -> dict:
    return {"features": {k: v[i:j] for k, v in part["features"].items()},
            "labels": part["labels"][i:j], "paths": part["paths"][i:j],
            "splits": part["splits"][i:j], "stamps": part["stamps"][i:j]}


def _skipped(segments) -> list:
    out = []
    for p, a in segments:
        if int(a["n_skipped"]):
            with h5py.File(p, "r") as seg:
                out += zip((decode(v) for v in seg["skipped/paths"][()]),
                           (decode(v) for v in seg["skipped/reasons"][()]))
    return out
