"""Reading feature files: a complete ``NAME``, a joined file, or the committed rows of a run
still going (the segments in ``NAME.partial/``). Readers only open whole files, so reading
never disturbs a writer."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError, UnknownLayerError, close_matches, option
from .layout import (FORMAT, JOINED_COLUMNS, LayerSpec, SCHEMA_VERSION, check_structure, decode,
                     partial_path)

__all__ = ["FeatureFile", "open_features", "joined_sources", "joined_ids"]


class FeatureFile:
    """Read access to a feature file (committed rows only). Get one with :func:`open_features`.

    Attributes:
        path: the file read (``NAME``, or the folder ``NAME.partial`` of an unfinished run).
        provenance: root attributes, JSON values decoded.
        layers: ``{name: LayerSpec}`` in depth order.
        classes: class names; ``y`` holds indices into this list.
        n_rows: committed rows.
        complete: whether the run that made the file finished.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            if self.path.is_dir():
                self._open_partial()
            else:
                self._open_file()
        except (OSError, KeyError, ValueError) as exc:
            if not is_hdf5(self.path):
                raise StoreError(f"{self.path} is not a feature file (not HDF5 at all); give the "
                                 f".h5 file that `featurecache embed` wrote.") from None
            raise StoreError(f"cannot read {self.path} as a feature file ({exc}); it may be "
                             f"damaged: rebuild it with its embed command and {option('overwrite')}.") from None
        ordered = sorted(self._specs, key=lambda s: (s.depth, s.name))
        self.layers = {s.name: s for s in ordered if s.group == "layers"}
        self.maps = {s.name: s for s in ordered if s.is_map}
        self.targets = {s.name: s for s in ordered if s.is_target}
        self._splits = np.array(self._column("splits", decode_strings=True), dtype=object)

    def _open_file(self) -> None:
        with h5py.File(self.path, "r") as f:
            self.provenance = {k: decode(v) for k, v in f.attrs.items()}
            if self.provenance.get("format") != FORMAT:
                raise StoreError(f"{self.path} is an HDF5 file but not a featurecache feature file.")
            version = self.provenance.get("schema_version")
            if version != SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema_version {version}; this featurecache "
                                 f"reads {SCHEMA_VERSION}. Re-run `featurecache embed`.")
            n, k = int(self.provenance["n_committed"]), int(self.provenance["n_skipped"])
            check_structure(f, self.path, n, k)
            self._specs = [LayerSpec.from_attrs(d.attrs) for d in f["layers"].values()] + \
                [LayerSpec.from_attrs(d.attrs) for d in f.get("maps", {}).values()] + \
                [LayerSpec.from_attrs(d.attrs) for d in f.get("targets", {}).values()]
            self._map_bytes = {name: int(d.id.get_storage_size())
                               for name, d in f.get("maps", {}).items()}
            missing = _missing_sources(self.path, [*f["layers"].values(),
                                                   *f.get("maps", {}).values(),
                                                   *f.get("targets", {}).values()])
            self.classes = [decode(c) for c in f["classes"][()]]
            record = _joined_record(f)
        if missing:
            raise StoreError(
                f"{self.path} is a joined file whose shard files are missing: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Its layers point "
                f"into them (paths relative to the joined file): put them back beside it, or "
                f"re-join with `featurecache join --copy` for one self-contained file.")
        if record is not None and self.provenance.get("joined_as") != "copy":
            _check_joined(self.path, record)  # a --copy join reads nothing else
        self._parts = [(self.path, 0, n, 0, k)]

    def _open_partial(self) -> None:
        from .segments import list_segments

        try:
            header = json.loads((self.path / "header.json").read_text())
        except (OSError, ValueError):
            raise StoreError(f"{self.path} holds no run header yet (the embed is starting, or "
                             f"was stopped before its first commit).") from None
        segments = list_segments(self.path)
        n = sum(int(a["n_rows"]) for _, a in segments)
        k = sum(int(a["n_skipped"]) for _, a in segments)
        done = int(segments[-1][1]["input_end"]) if segments else 0
        self.provenance = {**header["meta"], "n_committed": n, "n_skipped": k, "n_done": done,
                           "complete": False}
        self.classes = list(header["classes"])
        self._specs = [LayerSpec.from_attrs(s) for s in header["specs"]]
        self._map_bytes = {}
        self._parts = [(p, int(a["row_start"]), int(a["n_rows"]), int(a["skip_start"]),
                        int(a["n_skipped"])) for p, a in segments]

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

    def _column(self, name: str, decode_strings: bool = False, skipped: bool = False) -> list | np.ndarray:
        """A dataset's committed rows across the file's parts."""
        out = []
        try:
            for path, _, n, _, k in self._parts:
                with h5py.File(path, "r") as f:
                    out.append(f[name][: (k if skipped else n)])
        except OSError as exc:
            raise StoreError(f"{self.path} changed while being read ({exc}); open it again.") from None
        if not out:
            return [] if decode_strings else np.zeros((0,), dtype=np.int32)
        col = np.concatenate(out)
        return [decode(v) for v in col] if decode_strings else col

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
        names = self.check_layer(layer)
        mask = self._mask(split)
        cols = []
        for p in names:
            col = self._column(f"layers/{p}")
            cols.append(col[mask] if len(col) else np.zeros((0, self.layers[p].dim), np.float32))
        return cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1)

    def check_map(self, name: str) -> LayerSpec:
        """The stored map ``name``, or an error that says how to store one."""
        if name not in self.maps:
            kept = f"stored maps: {', '.join(self.maps)}" if self.maps else "it stores no maps"
            raise UnknownLayerError(
                f"the feature map of {name!r} is not stored in {self.path} ({kept}); re-embed "
                f"with {option('keep_map', [name])} to keep it.")
        return self.maps[name]

    def map_rows(self, name: str, rows) -> np.ndarray:
        """The stored maps ``(len(rows), C, S, S)`` of the given row indices (read one
        chunk per row: memory holds only these rows)."""
        spec = self.check_map(name)
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *spec.shape), dtype=np.dtype(self.provenance["dtype"]))
        order = np.argsort(rows, kind="stable")
        for path, start, n, _, _ in self._parts:
            sel = order[(rows[order] >= start) & (rows[order] < start + n)]
            if len(sel):
                with h5py.File(path, "r") as f:
                    out[sel] = f[spec.path][rows[sel] - start]
        return out

    def target_rows(self, name: str, rows) -> np.ndarray | list:
        """A dense target of the given rows: ``mask`` as uint8 ``(len(rows), H, W)``, or
        ``boxes`` as a list of ``[[class, x, y, w, h], ...]`` (input pixels) per row.

        Raises:
            StoreError: the file stores no such target (not made from dense data).
        """
        spec = self.targets.get(name)
        if spec is None:
            have = f"it stores {', '.join(self.targets)}" if self.targets else \
                "it was not embedded from dense data (a folder with <split>/images/, " \
                "<split>/masks/ or <split>/annotations.json, and classes.txt)"
            raise StoreError(f"{self.path} holds no {name} targets ({have}).")
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *spec.row_shape),
                       dtype=np.uint8 if spec.kind == "mask" else object)
        order = np.argsort(rows, kind="stable")
        for path, start, n, _, _ in self._parts:
            sel = order[(rows[order] >= start) & (rows[order] < start + n)]
            if len(sel):
                with h5py.File(path, "r") as f:
                    out[sel] = f[spec.path][rows[sel] - start]
        if spec.kind == "boxes":
            return [b if isinstance(b := decode(v), list) else json.loads(b) for v in out]
        return out

    def y(self, split: str | None = None) -> np.ndarray:
        """Class indices of the rows of ``split`` (all rows when None)."""
        return np.asarray(self._column("labels"))[self._mask(split)].astype(np.int64)

    def paths(self, split: str | None = None) -> list:
        return np.array(self._column("paths", decode_strings=True), dtype=object)[
            self._mask(split)].tolist()

    def splits(self) -> list:
        """Split of every row."""
        return self._splits.tolist()

    def stamps(self) -> list | None:
        """Every row's content stamp as listed when it was embedded (``""`` where unknown),
        or None for a file made before rows kept their stamps (``/stamps``)."""
        out, known = [], False
        try:
            for path, _, n, _, _ in self._parts:
                with h5py.File(path, "r") as f:
                    if "stamps" in f:
                        known = True
                        out += [decode(v) for v in f["stamps"][:n]]
                    else:
                        out += [""] * n
        except OSError as exc:
            raise StoreError(f"{self.path} changed while being read ({exc}); open it again.") from None
        return out if known else None

    def read_rows(self, rows) -> dict:
        """The stored values of the given row indices, for every layer and map, as stored
        (the same dtype, so copied values are the same bytes): ``{LayerSpec.key: array}``.
        Contiguous runs of rows are read as slices (an update copies long runs)."""
        rows = np.asarray(rows, dtype=np.int64)
        specs = [*self.layers.values(), *self.maps.values(), *self.targets.values()]
        dtype = self.provenance["dtype"]
        out = {s.key: np.empty((len(rows), *s.row_shape), dtype=s.stored_dtype(dtype)
                               if s.kind != "boxes" else object) for s in specs}
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        cuts = np.flatnonzero(np.diff(srt) != 1) + 1  # runs of consecutive rows
        for path, start, n, _, _ in self._parts:
            with h5py.File(path, "r") as f:
                for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(srt)]):
                    lo, hi = int(srt[a]), int(srt[b - 1]) + 1
                    lo_, hi_ = max(lo, start), min(hi, start + n)
                    if lo_ >= hi_:
                        continue
                    sel = order[a + (lo_ - lo):a + (hi_ - lo)]
                    for s in specs:
                        out[s.key][sel] = f[s.path][lo_ - start:hi_ - start]
        return out

    def skipped(self) -> list:
        """``[(path, reason)]`` of inputs that could not be used."""
        return list(zip(self._column("skipped/paths", True, skipped=True),
                        self._column("skipped/reasons", True, skipped=True)))

    def describe(self, skipped: bool = False) -> dict:
        """What the file holds, as plain data (``info`` prints it as text or JSON): path,
        state, rows per split, classes, layers, provenance, and the skipped inputs (their
        count, or the list with ``skipped=True``)."""
        from collections import Counter

        p = self.provenance
        return {"path": str(self.path), "complete": self.complete, "rows": self.n_rows,
                "n_done": p["n_done"], "n_inputs": p["n_inputs"],
                "splits": dict(sorted(Counter(self.splits()).items())), "classes": self.classes,
                "layers": {k: v.to_attrs() for k, v in self.layers.items()}, "provenance": p,
                "maps": {k: {**v.to_attrs(), "bytes": self._map_bytes.get(k)}
                         for k, v in self.maps.items()},
                "targets": {k: v.to_attrs() for k, v in self.targets.items()},
                "skipped": self.skipped() if skipped else p["n_skipped"]}

    def layer_provenance(self, layer: str) -> dict:
        """What a head needs to reproduce ``layer``'s features from images."""
        keys = ("backbone", "weights", "weights_sha256", "preprocess", "extraction_method",
                "fingerprint", "dtype")
        specs = [self.layers[p].to_attrs() for p in self.check_layer(layer)]
        return {**{k: self.provenance.get(k) for k in keys}, "layer": layer, "specs": specs}


def _joined_record(f) -> list | None:
    """``[{column: value}]`` of ``/joined_shards`` (what a joined file joined), or None for
    a file that is not joined or was joined before files recorded it."""
    if "joined_shards" not in f:
        return None
    g = f["joined_shards"]
    cols = {name: [decode(v) for v in g[name][()]] for name in JOINED_COLUMNS if name in g}
    return [dict(zip(cols, row)) for row in zip(*cols.values())]


def _check_joined(path: Path, record: list) -> None:
    """Refuse a joined file one of whose shards is not the file it joined (replaced or
    re-embedded since): its rows would be served under the joined file's paths and labels."""
    for i, shard in enumerate(record):
        src = Path(shard["path"])
        full = src if src.is_absolute() else path.parent / src
        try:
            with h5py.File(full, "r") as f:
                now = {k: decode(f.attrs[k]) for k in ("fingerprint", "creation_id", "n_committed",
                                                       "complete", "created") if k in f.attrs}
        except OSError as exc:
            why = f"it cannot be read ({exc})"
        else:
            why = None
            if now.get("fingerprint") != shard["fingerprint"]:
                why = "it was made with other settings or other images"
            elif (now.get("creation_id") or "") != shard["creation_id"] or \
                    (now.get("created") or "") != shard["created"]:
                why = "it was embedded again since (another creation id)"
            elif not now.get("complete") or int(now.get("n_committed", -1)) != shard["n_rows"]:
                why = (f"it holds {now.get('n_committed')} rows"
                       f"{'' if now.get('complete') else ' and is unfinished'}, the join took "
                       f"{shard['n_rows']}")
        if why:
            again = f" (`{shard['rebuild']}`)" if shard.get("rebuild") else ""
            raise StoreError(
                f"{path} is a joined file, but its shard {i} ({full}) is not the file it "
                f"joined: {why}, so its rows would not match the joined paths and labels. Join "
                f"the shards again with {option('overwrite')} (for a clustered embed: its embed "
                f"command with {option('overwrite')}), or, if that shard was replaced by "
                f"mistake, re-run its embed{again} with {option('overwrite')}, then join again.")


def joined_sources(path) -> list:
    """The shard files a joined file points into (its record, or its virtual datasets'
    sources for a file joined before the record existed), as absolute paths; ``[]`` for a
    file that is not joined or cannot be read. Reads nothing else (no checks)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            record = _joined_record(f)
            if record is not None:
                names = [r["path"] for r in record]
            else:
                names = list(dict.fromkeys(
                    vs.file_name for d in [*f.get("layers", {}).values(),
                                           *f.get("maps", {}).values()] if d.is_virtual
                    for vs in d.virtual_sources() if vs.file_name != "."))
    except (OSError, KeyError, ValueError):
        return []
    return [Path(n) if Path(n).is_absolute() else path.parent / n for n in names]


def joined_ids(path) -> list:
    """The creation ids of the shards a joined file joined (its record), ``[]`` without one."""
    try:
        with h5py.File(path, "r") as f:
            record = _joined_record(f)
    except (OSError, KeyError, ValueError):
        return []
    return [r["creation_id"] for r in record or ()]


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


def is_hdf5(path) -> bool:
    """Whether ``path`` is a file that starts with HDF5's signature."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def open_features(path) -> FeatureFile:
    """Open a feature file for reading; falls back to the committed rows in ``NAME.partial``
    for an unfinished run.

    Raises:
        StoreError: neither exists, or the file is damaged or not a featurecache file.
    """
    path = Path(path)
    if not path.exists():
        if partial_path(path).exists():
            return FeatureFile(partial_path(path))
        raise StoreError(f"feature file {path} does not exist; make it with `featurecache embed`.")
    if path.is_dir() and not path.name.endswith(".partial"):
        raise StoreError(f"{path} is a folder, not a feature file; give the .h5 file (or the "
                         f"NAME.h5.partial folder of an unfinished embed).")
    return FeatureFile(path)
