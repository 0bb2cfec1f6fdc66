"""Joining the shard files of one embed run (``embed --shard i/k``) into one file."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError, option
from ..options import validated
from .layout import IDENTITY_KEYS, JOINED_COLUMNS, STR, fingerprint, new_creation_id, write_header
from .reader import open_features

__all__ = ["join_shards"]


@validated("join")
def join_shards(shards, output, overwrite: bool = False, copy: bool = False,
                rebuild: str | None = None) -> Path:
    """Join complete shard files (``embed --shard i/k``) into one file, in shard order.

    The layers become HDF5 virtual datasets that point into the shard files (kept beside the
    output; nothing is copied; a missing shard reads as NaN and opening the file refuses,
    naming it), or with ``copy=True`` real datasets in one self-contained file. Labels, paths,
    splits and stamps are copied. The output records what it joined (``/joined_shards``: each
    shard's path, fingerprint, creation id and row count), so that opening a virtual one
    refuses a shard that was replaced since. The output is written under a temporary name and
    renamed into place when complete (one rename: the old output or the new one, whole). The
    result opens with :func:`open_features` like any other file.

    Raises:
        StoreError: a shard is missing, incomplete, from another run, the set is not whole, or
            the output is one of the inputs.
    """
    from ..files import same_file
    from .shield import hdf5_output

    output = Path(output)
    for s in shards:
        if same_file(s, output):
            raise StoreError(f"the output {output} is also an input shard; choose another name.")
    if output.exists() and not overwrite:
        raise StoreError(f"{output} exists; choose another name or pass {option('overwrite')}.")
    if not output.parent.is_dir():
        raise StoreError(f"folder {output.parent} does not exist; create it first.")
    files = sorted((open_features(p) for p in shards), key=lambda f: f.provenance["shard_index"])
    if not files:
        raise StoreError("no shard files given.")
    first = files[0].provenance
    count = first["shard_count"]
    counts = {f.provenance["shard_count"] for f in files}
    if len(counts) > 1:
        shown = ", ".join(f"{f.path} is {f.provenance['shard_index']}/{f.provenance['shard_count']}"
                          for f in files)
        raise StoreError(f"these shards come from runs cut into different numbers of shards "
                         f"({shown}); join the shards of one run (the same --shard I/K count).")
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
                                                         "schema_version", "creation_id")}
    meta.update(shard_index=0, shard_count=1, shard_start=0,
                n_inputs=sum(f.provenance["n_inputs"] for f in files), joined_from=count)
    meta.update(n_done=meta["n_inputs"], n_committed=total, complete=True,
                n_skipped=sum(f.provenance["n_skipped"] for f in files))
    meta["fingerprint"] = fingerprint(meta)
    meta["joined_as"] = "copy" if copy else "virtual"
    if rebuild:  # the one-process command that makes the same file (a clustered embed's)
        meta["rebuild"] = rebuild
    record = {"path": [os.path.relpath(f.path, output.parent) for f in files],
              "fingerprint": [f.provenance["fingerprint"] for f in files],
              "creation_id": [f.provenance.get("creation_id") or "" for f in files],
              "n_rows": sizes, "n_skipped": [f.provenance["n_skipped"] for f in files],
              "created": [f.provenance.get("created") or "" for f in files],
              "rebuild": [f.provenance.get("rebuild") or "" for f in files]}
    meta["creation_id"] = new_creation_id(f"{meta['fingerprint']} {record['creation_id']}")
    _remove_stale_temporaries(output)
    with hdf5_output(output) as out:
        write_header(out, meta, files[0].classes)
        joined = out.create_group("joined_shards")
        for name in JOINED_COLUMNS:
            col = record[name]
            if name in ("n_rows", "n_skipped"):
                joined.create_dataset(name, data=np.asarray(col, dtype=np.int64))
            else:
                joined.create_dataset(name, data=np.array(col, dtype=object), dtype=STR)
        grp = out.create_group("layers")
        dtype = np.dtype(first["dtype"])
        for spec in [*files[0].layers.values(), *files[0].maps.values(),
                     *files[0].targets.values()]:
            shape = (total, *spec.row_shape)
            dest = out.require_group(spec.group) if spec.group != "layers" else grp
            sdtype = spec.stored_dtype(dtype)
            if copy or spec.kind == "boxes":  # (strings are copied: no virtual fill value)
                chunk = (1, *spec.shape) if spec.group != "layers" else \
                    (max(1, min(total, (1 << 20) // (spec.dim * dtype.itemsize))), spec.dim)
                d = dest.create_dataset(spec.name, shape=shape, dtype=sdtype,
                                        chunks=chunk if total else None,
                                        compression="gzip" if spec.is_target and total else None)
                start = 0
                for f, n in zip(files, sizes):
                    with h5py.File(f.path, "r") as src_file:
                        step = 64 if spec.group != "layers" else 4096  # bounded memory
                        for s in range(0, n, step):
                            e = min(n, s + step)
                            d[start + s:start + e] = src_file[spec.path][s:e]
                    start += n
            else:
                layout = h5py.VirtualLayout(shape=shape, dtype=sdtype)
                start = 0
                for f, n in zip(files, sizes):
                    rel = os.path.relpath(f.path, output.parent)
                    layout[start:start + n] = h5py.VirtualSource(rel, spec.path,
                                                                 shape=(n, *shape[1:]))[:n]
                    start += n
                d = _virtual_dataset(dest, spec.name, layout,
                                     fillvalue=255 if spec.kind == "mask" else np.nan)
            for k, v in spec.to_attrs().items():
                d.attrs[k] = v
        out.create_dataset("labels", data=np.concatenate([f.y() for f in files]).astype(np.int32))
        for name in ("paths", "splits"):
            col = [v for f in files for v in (f.paths() if name == "paths" else f.splits())]
            out.create_dataset(name, data=np.array(col, dtype=object), dtype=STR)
        stamps = [f.stamps() for f in files]
        if any(st is not None for st in stamps):  # (shards made before stamps: none)
            col = [v for f, st in zip(files, stamps) for v in (st or [""] * f.n_rows)]
            out.create_dataset("stamps", data=np.array(col, dtype=object), dtype=STR)
        skipped = [s for f in files for s in f.skipped()]
        sk = out.create_group("skipped")
        for j, name in enumerate(("paths", "reasons")):
            sk.create_dataset(name, data=np.array([s[j] for s in skipped], dtype=object), dtype=STR)
    return output


def _remove_stale_temporaries(output: Path) -> None:
    """Temporary outputs (``.NAME.PID.tmp``) that a killed join of this output left behind,
    when their process is gone."""
    for tmp in output.parent.glob(f".{output.name}.*.tmp"):
        pid = tmp.name[len(output.name) + 2:-4]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _virtual_dataset(group, name: str, layout, fillvalue):
    """``group.create_virtual_dataset`` without the creation time in its object header, so
    that a join makes the same bytes each time (``SOURCE_DATE_EPOCH`` fixes the rest)."""
    from h5py import h5d, h5s, h5t

    dcpl = layout._get_dcpl(group.file.filename)
    dcpl.set_fill_value(np.array([fillvalue], dtype=layout.dtype))
    dcpl.set_obj_track_times(False)
    space = h5s.create_simple(layout.shape)
    tid = h5t.py_create(np.dtype(layout.dtype), logical=1)
    return h5py.Dataset(h5d.create(group.id, name=name.encode(), tid=tid, space=space,
                                   dcpl=dcpl))
