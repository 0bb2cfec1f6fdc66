"""The HDF5 feature file: the one contract between the embed stage and everything after it.

Only this module knows the layout; the schema is documented in ``docs/schema.md``::

    /                       attrs: format="featurecache", schema_version, fingerprint,
                            provenance (backbone, weights, weights_sha256, preprocess, pool,
                            token_pool, dtype, extraction_method, data_root, data_fingerprint,
                            split_origin, seed, shard_index, shard_count, versions, created),
                            progress (n_inputs, n_done, n_committed, n_skipped, complete)
    /layers/<name>          (N, dim) float16 (or float32), chunked; attrs = its LayerSpec
    /labels                 (N,) int32 class index
    /classes                (C,) str
    /paths                  (N,) str
    /splits                 (N,) str: train | test | val
    /skipped/paths          (K,) str   inputs that could not be decoded
    /skipped/reasons        (K,) str

Only the first ``n_committed`` rows count. While a run is going the file is ``NAME.partial``;
it is renamed to ``NAME`` once complete, so a file under the final name is always whole.

Example::

    >>> ff = open_features("feats.h5")                       # doctest: +SKIP
    >>> ff.X("avgpool", "train").shape, ff.y("train").shape  # doctest: +SKIP
    ((1258, 1280), (1258,))
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import queue
import threading
import warnings
from pathlib import Path

import h5py
import numpy as np

from .errors import StoreError, StoreMismatchError, UnknownLayerError, close_matches
from .layers import LayerSpec

__all__ = ["Writer", "FeatureFile", "open_features", "join_shards", "partial_path", "fingerprint",
           "SCHEMA_VERSION", "IDENTITY_KEYS"]

SCHEMA_VERSION = 1
FORMAT = "featurecache"
# provenance keys that define what a file holds: a resume must agree on all of them
IDENTITY_KEYS = ("backbone", "weights", "weights_sha256", "preprocess", "pool", "token_pool",
                 "dtype", "layers", "data_fingerprint", "shard_index", "shard_count")
_STR = h5py.string_dtype()
_F16_MAX = float(np.finfo(np.float16).max)
_F16_TINY = float(np.finfo(np.float16).tiny)  # below this float16 is subnormal: digits are lost


def partial_path(path) -> Path:
    """Where an unfinished run keeps its rows: ``NAME.partial`` beside ``NAME``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def fingerprint(meta: dict) -> str:
    """sha256 of the identity part of the provenance."""
    ident = {k: meta.get(k) for k in IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _encode(value):
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value) if isinstance(value, str) else value  # str subclasses (TorchVersion)


def _write_header(f, attrs: dict, classes: list) -> None:
    """Root attributes (format, schema version, creation time, then ``attrs``) and /classes."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for k, v in {"format": FORMAT, "schema_version": SCHEMA_VERSION, "created": now,
                 **attrs}.items():
        f.attrs[k] = _encode(v)
    f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=_STR)


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


class Writer:
    """Append rows to a feature file from a background thread; resume after committed rows.

    Use as a context manager. ``write`` queues a batch and returns at once; the thread
    appends rows and, every ``commit_rows`` rows and on :meth:`flush`, re-opens the file,
    writes, and only then advances the committed marker. :meth:`close` with
    ``complete=True`` renames ``NAME.partial`` to ``NAME``.

    Args:
        path: final file name.
        meta: provenance (see :data:`IDENTITY_KEYS`); must hold ``n_inputs``.
        specs: the stored layers.
        classes: class names.
        overwrite: delete an existing file (or partial file) instead of resuming/refusing.

    Raises:
        StoreMismatchError: an existing file was made with other settings (names the fields).
    """

    def __init__(self, path, meta: dict, specs: list, classes: list, overwrite: bool = False,
                 commit_rows: int = 512, queue_size: int = 8):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.meta = dict(meta)
        self.meta["fingerprint"] = fingerprint(self.meta)
        self.specs = list(specs)
        self.classes = list(classes)
        self.overwrite = overwrite
        self.commit_rows = commit_rows
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._buffer: list = []
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.n_done = self.n_committed = self.n_skipped = 0
        self.already_complete = False
        self._warned: set = set()

    # -- opening -------------------------------------------------------------------------
    def __enter__(self) -> "Writer":
        if self.overwrite:  # start over, but keep an old complete file until the new one is
            self.partial.unlink(missing_ok=True)  # complete and renamed over it
        elif self.path.exists():
            old = self._check_same(self.path)
            self.already_complete = True
            self.n_done, self.n_committed, self.n_skipped = (
                int(old[k]) for k in ("n_done", "n_committed", "n_skipped"))
            return self
        if self.partial.exists():
            self._check_same(self.partial)
            self._reopen()
        else:
            self._create()
        self._thread = threading.Thread(target=self._run, name="featurecache-writer", daemon=True)
        self._thread.start()
        return self

    def _check_same(self, path: Path) -> dict:
        try:
            with h5py.File(path, "r") as f:
                old = {k: _decode(v) for k, v in f.attrs.items()}
        except OSError as exc:
            raise StoreError(f"{path} exists but is not a readable HDF5 file ({exc}); "
                             f"remove it or pass --overwrite.") from None
        if old.get("format") != FORMAT:
            raise StoreMismatchError(f"{path} exists and is not a featurecache file; choose "
                                     f"another output or pass --overwrite.")
        if old.get("fingerprint") != self.meta["fingerprint"]:
            diff = [k for k in IDENTITY_KEYS if json.dumps(old.get(k), sort_keys=True, default=str)
                    != json.dumps(self.meta.get(k), sort_keys=True, default=str)]
            detail = "; ".join(f"{k}: file has {old.get(k)!r}, this run has {self.meta.get(k)!r}"
                               for k in diff[:3])
            raise StoreMismatchError(
                f"{path} was made with different settings ({detail}). Use the same settings "
                f"to resume, another output path, or --overwrite to start over.")
        return old

    def _create(self) -> None:
        with h5py.File(self.partial, "w") as f:
            _write_header(f, {**self.meta, "n_done": 0, "n_committed": 0, "n_skipped": 0,
                              "complete": False}, self.classes)
            grp = f.create_group("layers")
            dtype = np.dtype(self.meta["dtype"])
            for s in self.specs:
                rows = max(16, min(1024, (1 << 20) // (s.dim * dtype.itemsize)))
                d = grp.create_dataset(s.name, shape=(0, s.dim), maxshape=(None, s.dim),
                                       dtype=dtype, chunks=(rows, s.dim))
                for k, v in s.to_attrs().items():
                    d.attrs[k] = v
            for name, dt in (("labels", np.int32), ("paths", _STR), ("splits", _STR)):
                f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,))
            sk = f.create_group("skipped")
            for name in ("paths", "reasons"):
                sk.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_STR, chunks=(256,))

    def _reopen(self) -> None:
        with h5py.File(self.partial, "a") as f:
            self.n_done = int(f.attrs["n_done"])
            self.n_committed = n = int(f.attrs["n_committed"])
            self.n_skipped = k = int(f.attrs["n_skipped"])
            for d in list(f["layers"].values()) + [f["labels"], f["paths"], f["splits"]]:
                d.resize(n, axis=0)  # drop rows written after the last commit
            for d in f["skipped"].values():
                d.resize(k, axis=0)

    # -- writing -------------------------------------------------------------------------
    def write(self, features: dict, paths: list, labels: list, splits: list,
              n_inputs: int, skipped: list = ()) -> None:
        """Queue one batch: ``features[name]`` is ``(B, dim)``; ``n_inputs`` counts the
        inputs this batch consumed (rows + skipped); ``skipped`` is ``[(path, reason)]``."""
        self._raise()
        self._q.put((features, list(paths), list(labels), list(splits), n_inputs, list(skipped)))

    def flush(self) -> None:
        """Block until every queued row is written and committed."""
        self._q.put(_FLUSH)
        self._q.join()
        self._raise()

    def close(self, complete: bool = False) -> None:
        """Commit what is queued, stop the thread; if ``complete``, finalise the file."""
        if self._thread is not None:
            self._q.put(_STOP)
            self._thread.join()
            self._thread = None
        self._raise()
        if complete and not self.already_complete:
            with h5py.File(self.partial, "a") as f:
                f.attrs["complete"] = True
            os.replace(self.partial, self.path)
            self.already_complete = True

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close(complete=False)
        except BaseException:
            if exc_type is None:
                raise

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise StoreError(f"writing {self.partial} failed: {err}") from err

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is _STOP or item is _FLUSH:
                    self._commit()
                else:
                    self._buffer.append(item)
                    if sum(len(b[1]) for b in self._buffer) >= self.commit_rows:
                        self._commit()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self._error = exc
                self._buffer = []
            finally:
                self._q.task_done()
            if item is _STOP:
                return

    def _commit(self) -> None:
        if not self._buffer:
            return
        batches, self._buffer = self._buffer, []
        paths = [p for b in batches for p in b[1]]
        skipped = [s for b in batches for s in b[5]]
        n, k = self.n_committed, self.n_skipped
        m = len(paths)
        dtype = np.dtype(self.meta["dtype"])
        with h5py.File(self.partial, "a") as f:
            for s in self.specs:
                rows = np.concatenate([b[0][s.name] for b in batches if b[1]]) if m else None
                d = f["layers"][s.name]
                d.resize(n + m, axis=0)
                if m:
                    if dtype == np.float16:
                        rows = np.clip(rows, -_F16_MAX, _F16_MAX)
                        top = float(np.abs(rows).max())
                        if 0 < top < _F16_TINY and s.name not in self._warned:
                            self._warned.add(s.name)
                            warnings.warn(f"layer {s.name!r}: values reach only {top:.2g}, where "
                                          f"float16 loses precision or rounds to 0; use "
                                          f"--dtype float32 (typical of untrained weights).")
                    d[n:n + m] = rows.astype(dtype)
            for name, col in (("labels", 2), ("paths", 1), ("splits", 3)):
                d = f[name]
                d.resize(n + m, axis=0)
                if m:
                    d[n:n + m] = np.array([v for b in batches for v in b[col]],
                                          dtype=np.int32 if name == "labels" else object)
            if skipped:
                for j, name in enumerate(("paths", "reasons")):
                    d = f["skipped"][name]
                    d.resize(k + len(skipped), axis=0)
                    d[k:] = np.array([s[j] for s in skipped], dtype=object)
            f.flush()  # rows first, then the marker that makes them count
            self.n_committed, self.n_skipped = n + m, k + len(skipped)
            self.n_done += sum(b[4] for b in batches)
            f.attrs["n_committed"] = self.n_committed
            f.attrs["n_skipped"] = self.n_skipped
            f.attrs["n_done"] = self.n_done


_FLUSH, _STOP = object(), object()


class FeatureFile:
    """Read access to a feature file (committed rows only). Get one with :func:`open_features`.

    Attributes:
        path: the file read (``NAME`` or, for an unfinished run, ``NAME.partial``).
        provenance: root attributes, JSON values decoded.
        layers: ``{name: LayerSpec}`` in depth order.
        classes: class names; ``y`` holds indices into this list.
        n_rows: committed rows.
        complete: whether the run that made the file finished.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            with h5py.File(path, "r") as f:
                self.provenance = {k: _decode(v) for k, v in f.attrs.items()}
                if self.provenance.get("format") != FORMAT:
                    raise StoreError(f"{path} is an HDF5 file but not a featurecache feature file.")
                version = self.provenance.get("schema_version")
                if version != SCHEMA_VERSION:
                    raise StoreError(f"{path} has schema_version {version}; this featurecache "
                                     f"reads {SCHEMA_VERSION}. Re-run `featurecache embed`.")
                specs = [LayerSpec.from_attrs(d.attrs) for d in f["layers"].values()]
                missing = _missing_sources(path, f["layers"].values())
                self.classes = [_decode(c) for c in f["classes"][()]]
                self._splits = np.array([_decode(s) for s in f["splits"][: self.n_rows]])
        except OSError as exc:
            raise StoreError(f"cannot read {path} as HDF5 ({exc}).") from None
        if missing:
            raise StoreError(
                f"{path} is a joined file whose shard files are missing: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Its layers point "
                f"into them (paths relative to the joined file): put them back beside it, or "
                f"re-join with `featurecache join --copy` for one self-contained file.")
        self.layers = {s.name: s for s in sorted(specs, key=lambda s: (s.depth, s.name))}

    n_rows = property(lambda self: int(self.provenance["n_committed"]))
    complete = property(lambda self: bool(self.provenance["complete"]))

    def check_complete(self) -> None:
        """Refuse a file whose embed has not finished (heads and reports need every row).

        Raises:
            StoreError: naming how many inputs are done and how to resume.
        """
        if not self.complete:
            p = self.provenance
            raise StoreError(
                f"{self.path} is unfinished: {p.get('n_done')} of {p.get('n_inputs')} inputs "
                f"embedded. Re-run the same `featurecache embed` command to resume it"
                f"{' (' + p['rebuild'] + ')' if p.get('rebuild') else ''}, then try again.")

    def _mask(self, split):
        if split is None:
            return slice(None)
        if split not in set(self._splits.tolist()):
            raise StoreError(f"{self.path} has no rows in split {split!r}; splits present: "
                             f"{sorted(set(self._splits.tolist()))}.")
        return self._splits == split

    def check_layer(self, layer: str) -> list:
        """Split ``a+b`` into stored layer names, raising for any that is not stored."""
        parts = layer.split("+")
        for p in parts:
            if p not in self.layers:
                raise UnknownLayerError(
                    f"layer {p!r} is not stored in {self.path}; stored layers: "
                    f"{', '.join(self.layers)} (close: {close_matches(p, self.layers)}).")
        return parts

    def X(self, layer: str, split: str | None = None) -> np.ndarray:
        """Features ``(rows, dim)`` of a stored layer (as stored, e.g. float16).

        ``layer`` may join stored layers with ``+`` (``"blocks.5+avgpool"``): their columns
        are concatenated in that order.
        """
        parts = self.check_layer(layer)
        mask = self._mask(split)
        with h5py.File(self.path, "r") as f:
            cols = [f["layers"][p][: self.n_rows][mask] for p in parts]
        return cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1)

    def y(self, split: str | None = None) -> np.ndarray:
        """Class indices of the rows of ``split`` (all rows when None)."""
        return self._read("labels", split).astype(np.int64)

    def paths(self, split: str | None = None) -> list:
        return [_decode(p) for p in self._read("paths", split)]

    def splits(self) -> list:
        """Split of every row."""
        return self._splits.tolist()

    def skipped(self) -> list:
        """``[(path, reason)]`` of inputs that could not be decoded."""
        with h5py.File(self.path, "r") as f:
            k = int(self.provenance["n_skipped"])
            return [(_decode(p), _decode(r)) for p, r in
                    zip(f["skipped"]["paths"][:k], f["skipped"]["reasons"][:k])]

    def _read(self, name: str, split):
        with h5py.File(self.path, "r") as f:
            return f[name][: self.n_rows][self._mask(split)]

    def layer_provenance(self, layer: str) -> dict:
        """What a head needs to reproduce ``layer``'s features from images."""
        keys = ("backbone", "weights", "weights_sha256", "preprocess", "extraction_method",
                "fingerprint", "dtype")
        specs = [self.layers[p].to_attrs() for p in self.check_layer(layer)]
        return {**{k: self.provenance.get(k) for k in keys}, "layer": layer, "specs": specs}


def _missing_sources(path: Path, datasets) -> list:
    """Source files of virtual datasets that do not exist (resolved as HDF5 does: relative to
    the folder of the file that holds the virtual dataset)."""
    missing = []
    for d in datasets:
        if not d.is_virtual:
            continue
        for vs in d.virtual_sources():
            src = Path(vs.file_name)
            full = src if src.is_absolute() else path.parent / src
            if vs.file_name != "." and not full.is_file() and str(full) not in missing:
                missing.append(str(full))
    return missing


def open_features(path) -> FeatureFile:
    """Open a feature file for reading; falls back to ``NAME.partial`` for an unfinished run.

    Raises:
        StoreError: neither file exists, or the file is not a featurecache file.
    """
    path = Path(path)
    if not path.exists():
        if partial_path(path).exists():
            return FeatureFile(partial_path(path))
        raise StoreError(f"feature file {path} does not exist; make it with `featurecache embed`.")
    return FeatureFile(path)


def join_shards(shards, output, overwrite: bool = False, copy: bool = False) -> Path:
    """Join complete shard files (``embed --shard i/k``) into one file, in shard order.

    The layers become HDF5 virtual datasets that point into the shard files (kept beside the
    output; nothing is copied; a missing shard reads as NaN and opening the file refuses,
    naming it), or with ``copy=True`` real datasets in one self-contained file. Labels, paths
    and splits are copied. The output is written under a temporary name and renamed into place
    when complete. The result opens with :func:`open_features` like any other file.

    Raises:
        StoreError: a shard is missing, incomplete, from another run, the set is not whole, or
            the output is one of the inputs.
    """
    from .files import atomic_output, same_file

    output = Path(output)
    for s in shards:
        if same_file(s, output):
            raise StoreError(f"the output {output} is also an input shard; choose another name.")
    if output.exists() and not overwrite:
        raise StoreError(f"{output} exists; choose another name or pass overwrite=True.")
    if not output.parent.is_dir():
        raise StoreError(f"folder {output.parent} does not exist; create it first.")
    files = sorted((open_features(p) for p in shards), key=lambda f: f.provenance["shard_index"])
    if not files:
        raise StoreError("no shard files given.")
    first = files[0].provenance
    count = first["shard_count"]
    if [f.provenance["shard_index"] for f in files] != list(range(count)):
        raise StoreError(f"need shards 0..{count - 1} exactly once; got "
                         f"{[f.provenance['shard_index'] for f in files]}.")
    same = [k for k in IDENTITY_KEYS if k != "shard_index"]
    for f in files:
        if not f.complete:
            raise StoreError(f"{f.path} is not complete; finish it by re-running its embed.")
        diff = [k for k in same if f.provenance.get(k) != first.get(k)]
        if diff:
            raise StoreError(f"{f.path} differs from {files[0].path} in {diff}; not the same run.")
    sizes = [f.n_rows for f in files]
    total = sum(sizes)
    meta = {k: v for k, v in first.items() if k not in ("fingerprint", "created", "format",
                                                         "schema_version")}
    meta.update(shard_index=0, shard_count=1, shard_start=0,
                n_inputs=sum(f.provenance["n_inputs"] for f in files), joined_from=count)
    meta.update(n_done=meta["n_inputs"], n_committed=total, complete=True,
                n_skipped=sum(f.provenance["n_skipped"] for f in files))
    meta["fingerprint"] = fingerprint(meta)
    meta["joined_as"] = "copy" if copy else "virtual"
    with atomic_output(output) as tmp, h5py.File(tmp, "w") as out:
        _write_header(out, meta, files[0].classes)
        grp = out.create_group("layers")
        dtype = np.dtype(first["dtype"])
        for spec in files[0].layers.values():
            if copy:
                d = grp.create_dataset(spec.name, shape=(total, spec.dim), dtype=dtype,
                                       chunks=(max(1, min(total, (1 << 20) // (spec.dim * dtype.itemsize))), spec.dim))
                start = 0
                for f, n in zip(files, sizes):
                    with h5py.File(f.path, "r") as src_file:
                        for s in range(0, n, 4096):  # bounded memory
                            e = min(n, s + 4096)
                            d[start + s:start + e] = src_file["layers"][spec.name][s:e]
                    start += n
            else:
                layout = h5py.VirtualLayout(shape=(total, spec.dim), dtype=dtype)
                start = 0
                for f, n in zip(files, sizes):
                    rel = os.path.relpath(f.path, output.parent)
                    layout[start:start + n] = h5py.VirtualSource(rel, f"layers/{spec.name}",
                                                                 shape=(n, spec.dim))[:n]
                    start += n
                d = grp.create_virtual_dataset(spec.name, layout, fillvalue=np.nan)
            for k, v in spec.to_attrs().items():
                d.attrs[k] = v
        out.create_dataset("labels", data=np.concatenate([f.y() for f in files]).astype(np.int32))
        for name in ("paths", "splits"):
            col = [v for f in files for v in (f.paths() if name == "paths" else f.splits())]
            out.create_dataset(name, data=np.array(col, dtype=object), dtype=_STR)
        skipped = [s for f in files for s in f.skipped()]
        sk = out.create_group("skipped")
        for j, name in enumerate(("paths", "reasons")):
            sk.create_dataset(name, data=np.array([s[j] for s in skipped], dtype=object), dtype=_STR)
    return output
