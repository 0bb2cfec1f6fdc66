"""The writer: rows are committed as immutable segment files, the final file is assembled once.

HDF5 keeps no journal, so a file changed in place can be broken by a crash in the middle of a
metadata update. Here no committed byte is ever modified again:

* ``NAME.partial/header.json`` holds the provenance, classes and layers of the run (written
  once, atomically);
* every commit writes its rows to a new segment ``NAME.partial/seg-000042.h5``: written under a
  temporary name, fsynced, renamed, then the folder is fsynced. A segment exists whole or not
  at all; its attributes say which inputs (``input_start .. input_end``) and rows it holds;
* a resume lists the committed segments (a contiguous run of inputs from 0) and goes on after
  the last; a temporary segment left by a crash is deleted;
* at the end the segments are copied, in order, into ``NAME`` under a temporary name, which is
  fsynced and renamed into place; then the folder is removed. The final file is the same, byte
  for byte, however many times the run was interrupted (with ``SOURCE_DATE_EPOCH`` fixing the
  creation time).

A lock (``NAME.partial/.lock``, the ``filelock`` package) lets one writer at a time use the
output; a second embed to the same file stops at once, naming the first. Readers never open a
segment that is being written, so they cannot disturb the writer. After the first failed
commit (a full disk, say) nothing more is committed in that run, so a resume starts at the
right input.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import DataWarning, StoreError, StoreMismatchError, option
from ..files import atomic_output, fsync_dir
from .layout import (FORMAT, IDENTITY_KEYS, create_row_datasets, created_now, decode,
                     fingerprint, new_creation_id, partial_path, write_rows)
from .segments import assemble, list_segments, no_space

__all__ = ["Writer", "Batch", "settings_differ"]

_F16_TINY = float(np.finfo(np.float16).tiny)  # below this float16 is subnormal: digits are lost
_FLUSH, _STOP, _FINISH = object(), object(), object()


@dataclass
class Batch:
    """One queued batch: ``features[name]`` is ``(B, dim)``; ``n_inputs`` counts the inputs it
    consumed (rows + skipped); ``skipped`` is ``[(path, reason)]``; ``stamps`` the rows'
    content stamps (``[]``: unknown, stored as ``""``)."""

    features: dict
    paths: list
    labels: list
    splits: list
    n_inputs: int
    skipped: list
    stamps: list = field(default_factory=list)


class Writer:
    """Commit rows of a feature file from a background thread; resume after committed rows.

    Use as a context manager. ``write`` queues a batch and returns at once; the thread commits
    a segment every ``commit_rows`` rows or ``commit_every`` seconds (whichever comes first)
    and on :meth:`flush`. :meth:`close` with
    ``complete=True`` assembles ``NAME`` from the segments.

    Args:
        path: final file name.
        meta: provenance (see :data:`~featurecache.store.layout.IDENTITY_KEYS`); must hold
            ``n_inputs``.
        specs: the stored layers.
        classes: class names.
        overwrite: discard committed segments and start over (an existing complete ``NAME``
            stays until the new one replaces it).
        update: build a new ``NAME`` beside an existing one (``embed --update``): the old file
            stays, readable, until the new one replaces it by the final rename; committed
            segments of this same update (same fingerprint and ``meta["update_of"]``) are
            resumed, those of any other run are discarded (:attr:`restarted`).

    Raises:
        StoreMismatchError: an existing file was made with other settings (names the fields).
        StoreError: another process is writing the same output, or the folder is unusable.
    """

    def __init__(self, path, meta: dict, specs: list, classes: list, overwrite: bool = False,
                 commit_rows: int = 512, queue_size: int = 8, commit_every: float = 30.0,
                 update: bool = False):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.meta = dict(meta)
        self.meta["fingerprint"] = fingerprint(self.meta)
        self.specs = list(specs)
        self.classes = list(classes)
        self.overwrite = overwrite
        self.update = update
        self.restarted = False  # update: the segments of another run were discarded
        self.commit_rows = commit_rows
        self.commit_every = commit_every
        self._last_commit = time.monotonic()
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._buffer: list = []
        self._error: BaseException | None = None
        self._failed = False
        self._thread: threading.Thread | None = None
        self._lock = None
        self.n_done = self.n_committed = self.n_skipped = 0
        self._segments = 0
        self.already_complete = False
        self._warned: set = set()

    # -- opening -------------------------------------------------------------------------
    def __enter__(self) -> "Writer":
        if self.path.exists() and not self._is_feature_file():
            raise StoreError(f"{self.path} exists and is not an HDF5 feature file; it is never "
                             f"replaced (not even with {option('overwrite')}): choose another "
                             f"output name.")
        if not self.overwrite and not self.update and self.path.exists():
            old = self._check_same(self._final_attrs(), self.path)
            self.already_complete = True
            self.n_done, self.n_committed, self.n_skipped = (
                int(old[k]) for k in ("n_done", "n_committed", "n_skipped"))
            return self
        if self.partial.is_file():  # NAME.partial of featurecache 0.1's in-place writer
            if not self.overwrite:
                raise StoreError(f"{self.partial} was written by an older featurecache and "
                                 f"cannot be resumed; pass {option('overwrite')} to start over.")
            self.partial.unlink()
        self.partial.mkdir(exist_ok=True)
        self._acquire()
        try:
            self._open_partial()
        except BaseException:
            self._release()
            raise
        self._thread = threading.Thread(target=self._run, name="featurecache-writer", daemon=True)
        self._thread.start()
        return self

    def _acquire(self) -> None:
        from filelock import FileLock, Timeout

        owner = self.partial / "writer.json"
        lock = FileLock(str(self.partial / ".lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            try:
                who = json.loads(owner.read_text())
                who = f"process {who['pid']} on {who['host']}, started {who['started']}"
            except (OSError, ValueError, KeyError):
                who = "another process"
            raise StoreError(f"{self.path} is being written by {who}; wait for that embed to "
                             f"finish (or stop it) before starting another.") from None
        self._lock = lock
        with atomic_output(owner) as tmp:
            tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                       "started": created_now()}))

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _open_partial(self) -> None:
        header = self.partial / "header.json"
        for stale in self.partial.glob(".seg-*"):  # a segment a crash left half written
            stale.unlink()
        if self.overwrite:
            for p in self.partial.glob("seg-*.h5"):
                p.unlink()
            header.unlink(missing_ok=True)
        if header.exists():
            try:
                saved = json.loads(header.read_text())
            except (OSError, ValueError) as exc:
                raise StoreError(f"{header} is unreadable ({exc}); pass {option('overwrite')} to start "
                                 f"over.") from None
            if self.update and (saved["meta"].get("fingerprint") != self.meta["fingerprint"]
                                or saved["meta"].get("update_of") != self.meta.get("update_of")):
                self._discard(header)  # another run's rows (another update, or an embed)
                return self._open_partial()
            self._check_same(saved["meta"], self.partial)
            self.meta["created"] = saved["meta"].get("created")
            # a header written before files had an id: one derived from it, the same on
            # every resume
            self.meta["creation_id"] = saved["meta"].get("creation_id") or hashlib.sha256(
                header.read_bytes()).hexdigest()[:32]
        else:
            self.meta["created"] = created_now()
            self.meta["creation_id"] = new_creation_id(
                f"{self.meta['fingerprint']} {self.meta['created']}")
            with atomic_output(header) as tmp:
                tmp.write_text(json.dumps({"meta": self.meta, "classes": self.classes,
                                           "specs": [s.to_attrs() for s in self.specs]},
                                          default=str))
        segments = list_segments(self.partial)
        for p in sorted(self.partial.glob("seg-*.h5"))[len(segments):]:
            p.unlink()  # after a gap or an unreadable segment: not part of the run
        for _, a in segments:
            self.n_committed += int(a["n_rows"])
            self.n_skipped += int(a["n_skipped"])
        self.n_done = int(segments[-1][1]["input_end"]) if segments else 0
        self._segments = len(segments)
        fsync_dir(self.partial)

    def _discard(self, header: Path) -> None:
        for p in self.partial.glob("seg-*.h5"):
            p.unlink()
        header.unlink()
        fsync_dir(self.partial)
        self.restarted = True

    def _is_feature_file(self) -> bool:
        """An HDF5 file (a feature file, or a damaged one that --overwrite may replace); never
        a manifest, an image or a head given as the output by mistake."""
        from .reader import is_hdf5

        return self.path.is_file() and is_hdf5(self.path)

    def _final_attrs(self) -> dict:
        try:
            with h5py.File(self.path, "r") as f:
                return {k: decode(v) for k, v in f.attrs.items()}
        except OSError as exc:
            raise StoreError(f"{self.path} exists but is not a readable HDF5 file ({exc}); "
                             f"remove it or pass {option('overwrite')}.") from None

    def _check_same(self, old: dict, path: Path) -> dict:
        if old.get("format", FORMAT) != FORMAT:
            raise StoreMismatchError(f"{path} exists and is not a featurecache file; choose "
                                     f"another output or pass {option('overwrite')}.")
        if old.get("fingerprint") != self.meta["fingerprint"]:
            diff = settings_differ(old, self.meta)
            detail = "; ".join(
                f"the images differ (files added, removed, relabelled or rewritten since; "
                f"{option('update')} embeds only those)"
                if k == "data_fingerprint" else
                f"{k}: file has {old.get(k)!r}, this run has {self.meta.get(k)!r}" for k in diff[:3])
            raise StoreMismatchError(
                f"{path} was made with different settings ({detail}). Use the same settings "
                f"to resume, another output path, or {option('overwrite')} to start over.")
        return old

    # -- writing -------------------------------------------------------------------------
    def write(self, features: dict, paths: list, labels: list, splits: list,
              n_inputs: int, skipped: list = (), stamps=None) -> None:
        """Queue one batch (see :class:`Batch`)."""
        self._raise()
        self._q.put(Batch(features, list(paths), list(labels), list(splits), n_inputs,
                          list(skipped), list(stamps) if stamps is not None else []))

    def flush(self) -> None:
        """Block until every queued row is committed."""
        self._q.put(_FLUSH)
        self._q.join()
        self._raise()

    def close(self, complete: bool = False) -> None:
        """Commit what is queued, stop the thread; if ``complete``, assemble the final file
        (in the writer thread too: every byte of the store is written by that one thread)."""
        try:
            if self._thread is not None:
                self._q.put(_FINISH if complete else _STOP)
                self._thread.join()
                self._thread = None
            self._raise()
            if complete:
                self.already_complete = True
        finally:
            self._release()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close(complete=False)
        except BaseException:
            if exc_type is None:
                raise

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, StoreError):
                raise err
            if no_space(err):
                raise StoreError(f"no space left on device while writing {self.partial}; the "
                                 f"{self.n_committed} committed rows are kept: free some space "
                                 f"and run the same command again to resume.") from None
            raise StoreError(f"writing {self.partial} failed: {err}") from err

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if self._failed:
                    pass  # after a failed commit nothing more is committed in this run
                elif item is _STOP or item is _FLUSH:
                    self._commit()
                elif item is _FINISH:
                    self._commit()
                    self._assemble()
                else:
                    self._buffer.append(item)
                    if sum(len(b.paths) for b in self._buffer) >= self.commit_rows or \
                            time.monotonic() - self._last_commit >= self.commit_every:
                        self._commit()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self._error, self._failed, self._buffer = exc, True, []
            finally:
                self._q.task_done()
            if item is _STOP or item is _FINISH:
                return

    def _commit(self) -> None:
        self._last_commit = time.monotonic()
        if not self._buffer:
            return
        batches, self._buffer = self._buffer, []
        features = {s.key: self._rows(s, batches) for s in self.specs}
        paths = [p for b in batches for p in b.paths]
        labels = [v for b in batches for v in b.labels]
        splits = [v for b in batches for v in b.splits]
        stamps = [v for b in batches for v in (b.stamps or [""] * len(b.paths))]
        skipped = [s for b in batches for s in b.skipped]
        n_inputs = sum(b.n_inputs for b in batches)
        seg = self.partial / f"seg-{self._segments:06d}.h5"
        tmp = self.partial / f".{seg.name}.tmp"
        image = io.BytesIO()  # HDF5 never writes to disk itself, so a full disk cannot
        with h5py.File(image, "w") as f:  # leave it half-flushed: the OS write below fails cleanly
            create_row_datasets(f, self.specs, self.meta["dtype"], len(paths), len(skipped))
            write_rows(f, 0, features, labels, paths, splits, 0, skipped, stamps)
            for k, v in {"input_start": self.n_done, "input_end": self.n_done + n_inputs,
                         "row_start": self.n_committed, "n_rows": len(paths),
                         "skip_start": self.n_skipped, "n_skipped": len(skipped)}.items():
                f.attrs[k] = v
        try:
            with open(tmp, "wb") as fh:
                fh.write(image.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, seg)
            fsync_dir(self.partial)
        finally:
            tmp.unlink(missing_ok=True)
        self._segments += 1
        self.n_committed += len(paths)
        self.n_skipped += len(skipped)
        self.n_done += n_inputs

    def _rows(self, spec, batches) -> np.ndarray:
        name, dtype = spec.key, spec.stored_dtype(self.meta["dtype"])
        parts = [b.features[name] for b in batches if b.paths]
        rows = np.concatenate(parts) if parts else np.zeros((0, *spec.row_shape))
        if spec.is_target:
            return rows.astype(object) if spec.kind == "boxes" else rows.astype(dtype)
        if dtype == np.float16 and rows.size:
            top = float(np.abs(rows).max())
            if 0 < top < _F16_TINY and name not in self._warned:
                self._warned.add(name)
                warnings.warn(DataWarning(
                    f"layer {name!r}: values reach only {top:.2g}, where float16 loses "
                    f"precision or rounds to 0; use {option('dtype', 'float32')} (typical of "
                    f"untrained weights)."))
        return rows.astype(dtype)

    def _assemble(self) -> None:
        assemble(self.path, self.partial, {**self.meta, "n_done": self.n_done}, self.specs,
                 self.classes)


def settings_differ(old: dict, new: dict, ignore=()) -> list:
    """The identity keys (and ``maps``, ``map_size``) on which two provenances differ, in
    :data:`~featurecache.store.layout.IDENTITY_KEYS` order, less ``ignore``."""
    return [k for k in (*IDENTITY_KEYS, "maps", "map_size")  # (the maps count too)
            if k not in ignore and json.dumps(old.get(k) or None, sort_keys=True, default=str)
            != json.dumps(new.get(k) or None, sort_keys=True, default=str)]


def remove_finished_partial(path) -> bool:
    """Remove ``NAME.partial/`` when it is what is left of the run that made the complete
    ``NAME`` (a kill between the final rename and the folder's removal): its header carries
    ``NAME``'s creation id. Returns whether it was removed; any other partial stays."""
    import shutil

    path = Path(path)
    partial = partial_path(path)
    try:
        saved = json.loads((partial / "header.json").read_text())["meta"]
        with h5py.File(path, "r") as f:
            made = decode(f.attrs.get("creation_id", ""))
    except (OSError, ValueError, KeyError):
        return False
    if not made or saved.get("creation_id") != made:
        return False
    shutil.rmtree(partial, ignore_errors=True)
    fsync_dir(path.parent)
    return True
