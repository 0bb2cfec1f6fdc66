"""Joining the shard files of one embed run (``embed --shard i/k``) into one file."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError, option
from .layout import IDENTITY_KEYS, STR, fingerprint, write_header
from .reader import open_features

__all__ = ["join_shards"]


def join_shards(shards, output, overwrite: bool = False, copy: bool = False,
                rebuild: str | None = None) -> Path:
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
                                                         "schema_version")}
    meta.update(shard_index=0, shard_count=1, shard_start=0,
                n_inputs=sum(f.provenance["n_inputs"] for f in files), joined_from=count)
    meta.update(n_done=meta["n_inputs"], n_committed=total, complete=True,
                n_skipped=sum(f.provenance["n_skipped"] for f in files))
    meta["fingerprint"] = fingerprint(meta)
    meta["joined_as"] = "copy" if copy else "virtual"
    if rebuild:  # the one-process command that makes the same file (a clustered embed's)
        meta["rebuild"] = rebuild
    with hdf5_output(output) as out:
        write_header(out, meta, files[0].classes)
        grp = out.create_group("layers")
        dtype = np.dtype(first["dtype"])
        for spec in [*files[0].layers.values(), *files[0].maps.values()]:
            shape = (total, *spec.shape) if spec.is_map else (total, spec.dim)
            dest = out.require_group("maps") if spec.is_map else grp
            if copy:
                chunk = (1, *spec.shape) if spec.is_map else \
                    (max(1, min(total, (1 << 20) // (spec.dim * dtype.itemsize))), spec.dim)
                d = dest.create_dataset(spec.name, shape=shape, dtype=dtype, chunks=chunk)
                start = 0
                for f, n in zip(files, sizes):
                    with h5py.File(f.path, "r") as src_file:
                        step = 64 if spec.is_map else 4096  # bounded memory
                        for s in range(0, n, step):
                            e = min(n, s + step)
                            d[start + s:start + e] = src_file[spec.path][s:e]
                    start += n
            else:
                layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
                start = 0
                for f, n in zip(files, sizes):
                    rel = os.path.relpath(f.path, output.parent)
                    layout[start:start + n] = h5py.VirtualSource(rel, spec.path,
                                                                 shape=(n, *shape[1:]))[:n]
                    start += n
                d = dest.create_virtual_dataset(spec.name, layout, fillvalue=np.nan)
            for k, v in spec.to_attrs().items():
                d.attrs[k] = v
        out.create_dataset("labels", data=np.concatenate([f.y() for f in files]).astype(np.int32))
        for name in ("paths", "splits"):
            col = [v for f in files for v in (f.paths() if name == "paths" else f.splits())]
            out.create_dataset(name, data=np.array(col, dtype=object), dtype=STR)
        skipped = [s for f in files for s in f.skipped()]
        sk = out.create_group("skipped")
        for j, name in enumerate(("paths", "reasons")):
            sk.create_dataset(name, data=np.array([s[j] for s in skipped], dtype=object), dtype=STR)
    return output
