"""Names, attributes and datasets of a feature file (the schema of ``docs/schema.md``).

Only the store package touches h5py. A complete file::

    /                       attrs: format="featurecache", schema_version, fingerprint,
                            provenance (backbone, weights, weights_sha256, preprocess, pool,
                            token_pool, dtype, extraction_method, data_root, data_fingerprint,
                            split_origin, seed, shard_index, shard_count, versions, created,
                            creation_id), progress (n_inputs, n_done, n_committed, n_skipped, complete)
    /layers/<name>          (N, dim) float16 (or float32), chunked; attrs = its LayerSpec
    /maps/<name>            (N, C, S, S) unpooled maps (embed keep_map), one row per chunk
    /targets/mask           (N, H, W) uint8 a dense source's segmentation masks, at the input
                            size (class id per pixel, 255 = ignore), gzip, one row per chunk
    /targets/boxes          (N,) str  a dense source's boxes: JSON [[class, x, y, w, h], ...]
                            in input pixels
    /labels                 (N,) int32 class index
    /classes                (C,) str
    /paths                  (N,) str
    /splits                 (N,) str: train | test | val
    /stamps                 (N,) str: each row's content stamp when listed (embed --update
                            compares it; absent in files made before it)
    /skipped/paths          (K,) str   inputs that could not be used
    /skipped/reasons        (K,) str
    /joined_shards/<column> only in a joined file: what it joined, one row per shard (path,
                            fingerprint, creation_id, n_rows, n_skipped, created, rebuild)

While a run is going, its rows live in the folder ``NAME.partial/`` as committed segments
(see :mod:`featurecache.store.writer`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

__all__ = ["LayerSpec", "SCHEMA_VERSION", "FORMAT", "IDENTITY_KEYS", "partial_path", "fingerprint", "encode",
           "decode", "write_header", "create_row_datasets", "write_rows", "created_now",
           "new_creation_id", "check_structure", "JOINED_COLUMNS"]

SCHEMA_VERSION = 1
FORMAT = "featurecache"
# provenance keys that define what a file holds: a resume must agree on all of them
IDENTITY_KEYS = ("backbone", "weights", "weights_sha256", "preprocess", "pool", "token_pool",
                 "dtype", "layers", "data_fingerprint", "shard_index", "shard_count")
STR = h5py.string_dtype()
ROW_DATASETS = ("labels", "paths", "splits")
# /joined_shards/<column>: one row per joined shard (a joined file records what it joined)
JOINED_COLUMNS = ("path", "fingerprint", "creation_id", "n_rows", "n_skipped", "created",
                  "rebuild")


@dataclass(frozen=True)
class LayerSpec:
    """One stored layer: written as attributes of ``/layers/<name>`` and read by every stage."""

    name: str   # key under /layers in the file, as the user asked for it (may be an alias)
    node: str   # graph node / module name it is read from
    kind: str   # map | map-nhwc | tokens | vector
    pool: str   # avg | max | avgmax (maps), cls | mean (tokens), none (vectors)
    dim: int    # width after pooling
    depth: int  # depth index in the backbone's listing; the x-axis of the depth report
    shape: tuple = ()   # per-image output shape before pooling (C, H, W), (L, D) or (D,)
    reduction: int = 0  # input size / map height (timm's FeatureInfo); 0 for tokens, vectors

    @property
    def is_map(self) -> bool:
        """An unpooled feature map (``pool == "map"``), stored under ``/maps``."""
        return self.pool == "map"

    @property
    def is_target(self) -> bool:
        """A dense target stored beside the maps (``pool == "target"``): the segmentation
        mask (kind ``mask``, uint8 ``(H, W)``) or the boxes (kind ``boxes``, one JSON string
        per row), under ``/targets``."""
        return self.pool == "target"

    @property
    def group(self) -> str:
        """Its group in the file: ``layers``, ``maps`` or ``targets``."""
        return "targets" if self.is_target else "maps" if self.is_map else "layers"

    @property
    def key(self) -> str:
        """The name of its rows in a batch: a layer and a map of the same name differ."""
        return f"{self.group[:-1]}:{self.name}" if self.group != "layers" else self.name

    @property
    def path(self) -> str:
        """Its dataset in the file: ``maps/<name>``, ``targets/<name>`` or ``layers/<name>``."""
        return f"{self.group}/{self.name}"

    @property
    def row_shape(self) -> tuple:
        """The shape of one row as stored: ``(dim,)`` for a layer, ``shape`` for a map or a
        mask, ``()`` for the boxes."""
        return tuple(self.shape) if self.group != "layers" else (self.dim,)

    def stored_dtype(self, dtype):
        """The dtype of its dataset: the file's ``dtype`` for features, uint8 for a mask, a
        string for the boxes."""
        if self.kind == "mask":
            return np.dtype(np.uint8)
        return STR if self.kind == "boxes" else np.dtype(dtype)

    def to_attrs(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_attrs(cls, attrs) -> "LayerSpec":
        """From file attributes or JSON; files made before shape and reduction were recorded
        read as ``()`` and 0."""
        return cls(name=str(attrs["name"]), node=str(attrs["node"]), kind=str(attrs["kind"]),
                   pool=str(attrs["pool"]), dim=int(attrs["dim"]), depth=int(attrs["depth"]),
                   shape=tuple(int(v) for v in attrs.get("shape", ())),
                   reduction=int(attrs.get("reduction", 0)))


def partial_path(path) -> Path:
    """Where an unfinished run keeps its rows: the folder ``NAME.partial`` beside ``NAME``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def fingerprint(meta: dict) -> str:
    """sha256 of the identity part of the provenance."""
    ident = {k: meta.get(k) for k in IDENTITY_KEYS}
    if meta.get("maps"):  # files without stored maps keep the fingerprint they always had
        ident.update(maps=meta["maps"], map_size=meta.get("map_size", 0))
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def created_now() -> str:
    """UTC time of creation; ``SOURCE_DATE_EPOCH`` (reproducible builds) fixes it."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch
           else datetime.datetime.now(datetime.timezone.utc))
    return now.isoformat(timespec="seconds")


def new_creation_id(seed: str) -> str:
    """The id a new file carries from its creation on (``creation_id``): random, so a file
    made again with the same settings is told apart from the one it replaced (a joined file
    records its shards' ids and refuses a shard whose id changed). With
    ``SOURCE_DATE_EPOCH`` set (reproducible builds) it is derived from ``seed`` (the file's
    fingerprint and creation time), so the same run makes the same bytes."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return hashlib.sha256(f"featurecache-creation-id {seed}".encode()).hexdigest()[:32]
    return uuid.uuid4().hex


def encode(value):
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value) if isinstance(value, str) else value  # str subclasses (TorchVersion)


def decode(value):
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


def write_header(f, attrs: dict, classes: list) -> None:
    """Root attributes (format, schema version, creation time, then ``attrs``) and /classes."""
    for k, v in {"format": FORMAT, "schema_version": SCHEMA_VERSION, "created": created_now(),
                 **attrs}.items():
        f.attrs[k] = encode(v)
    f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=STR)


def create_row_datasets(f, specs, dtype, n: int, k: int) -> None:
    """The datasets of ``n`` rows and ``k`` skipped inputs (fixed size, chunked by rows)."""
    dtype = np.dtype(dtype)
    grp = f.create_group("layers")
    for s in specs:
        if s.is_target:  # one row per chunk, compressed (a mask is mostly runs of one id)
            d = f.require_group("targets").create_dataset(
                s.name, shape=(n, *s.row_shape), dtype=s.stored_dtype(dtype),
                chunks=(1, *s.row_shape) if n and s.row_shape else None,
                compression="gzip" if n and s.row_shape else None)
        elif s.is_map:  # one image per chunk: training reads maps in shuffled batches of rows
            d = f.require_group("maps").create_dataset(
                s.name, shape=(n, *s.shape), dtype=dtype, chunks=(1, *s.shape) if n else None)
        else:
            rows = max(1, min(n, max(16, min(1024, (1 << 20) // (s.dim * dtype.itemsize)))))
            d = grp.create_dataset(s.name, shape=(n, s.dim), dtype=dtype,
                                   chunks=(rows, s.dim) if n else None)
        for key, v in s.to_attrs().items():
            d.attrs[key] = v
    f.create_dataset("labels", shape=(n,), dtype=np.int32)
    for name in ("paths", "splits", "stamps"):
        f.create_dataset(name, shape=(n,), dtype=STR)
    sk = f.create_group("skipped")
    for name in ("paths", "reasons"):
        sk.create_dataset(name, shape=(k,), dtype=STR)


def write_rows(f, start: int, features: dict, labels, paths, splits, skip_start: int,
               skipped, stamps=None) -> None:
    """Write rows ``start..`` and skipped inputs ``skip_start..`` into datasets made by
    :func:`create_row_datasets` (``stamps``: the rows' content stamps, when known)."""
    m = len(labels)
    if m:
        for key, rows in features.items():  # LayerSpec.key: "name", "map:name", "target:name"
            group, _, name = key.rpartition(":")
            f[f"{group or 'layer'}s/{name}"][start:start + m] = rows
        f["labels"][start:start + m] = np.asarray(labels, dtype=np.int32)
        f["paths"][start:start + m] = np.array(paths, dtype=object)
        f["splits"][start:start + m] = np.array(splits, dtype=object)
        if stamps is not None and "stamps" in f:
            f["stamps"][start:start + m] = np.array(list(stamps), dtype=object)
    if len(skipped):
        for j, name in enumerate(("paths", "reasons")):
            f["skipped"][name][skip_start:skip_start + len(skipped)] = np.array(
                [s[j] for s in skipped], dtype=object)


def check_structure(f, path, n_rows: int, n_skipped: int) -> None:
    """Refuse a damaged file: missing datasets, or fewer rows than its counts claim."""
    from ..errors import StoreError, option

    need = ["layers", "classes", *ROW_DATASETS, "skipped/paths", "skipped/reasons"]
    missing = [name for name in need if name not in f]
    if missing:
        raise StoreError(f"{path} is damaged: {', '.join('/' + m for m in missing)} missing. "
                         f"Rebuild it with its embed command and {option('overwrite')}.")
    short = [f"/{name} has {f[name].shape[0]} rows" for name in ROW_DATASETS
             if f[name].shape[0] < n_rows]
    short += [f"/layers/{name} has {d.shape[0]} rows" for name, d in f["layers"].items()
              if d.shape[0] < n_rows]
    short += [f"/skipped/{name} has {f['skipped'][name].shape[0]} entries"
              for name in ("paths", "reasons") if f["skipped"][name].shape[0] < n_skipped]
    if short:
        raise StoreError(f"{path} is damaged: it claims {n_rows} rows and {n_skipped} skipped "
                         f"inputs, but {'; '.join(short)}. Rebuild it with {option('overwrite')}.")
