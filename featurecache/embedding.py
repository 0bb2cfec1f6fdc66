"""Stage 1: images -> frozen backbone -> pooled features of several layers -> one HDF5 file.

The loop, top to bottom: read (DataLoader workers decode), map (one forward pass, pooled on
the device), write (a background thread appends and commits). Re-running the same call
resumes after the committed rows.

Example::

    >>> r = embed("builtin:digits", "feats.h5", layers=["blocks.5", "avgpool"])  # doctest: +SKIP
    >>> r.n_rows, r.n_skipped                                                      # doctest: +SKIP
    (1797, 0)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import versions
from .backbones import Backbone, load_backbone
from .data import Source, collate, open_source, shard_range
from .errors import DataError, OptionError, option
from .options import CLUSTER, DEFAULT_BACKBONE, DTYPES, ON_ERROR, SIGNATURES, validated
from .extract import FeatureExtractor, default_device, on_device, to_layout
from .files import require_folder
from .layers import resolve_layers, resolve_maps
from .store import Writer

__all__ = ["embed", "EmbedResult", "DTYPES", "ON_ERROR"]


@dataclass
class EmbedResult:
    """What :func:`embed` did."""

    path: Path
    n_rows: int           # rows committed in the file
    n_skipped: int        # inputs that could not be decoded
    resumed_from: int     # inputs already done when this call started
    seconds: float
    already_complete: bool
    layers: list          # LayerSpec of each stored layer
    ignored: dict = field(default_factory=dict)  # entries the folder listing left out: {why: n}
    maps: list = field(default_factory=list)     # LayerSpec of each stored unpooled map
    retries: int = 0      # transient store errors retried (URLs; see data.remote.retry)
    # embed --update: {new, changed, deleted, unchanged, relabelled, retried, embedded,
    # copied, ...} (see featurecache.update); None for a plain embed
    update: dict | None = None


@validated("embed")
def embed(source, output, *, backbone: str | Backbone = DEFAULT_BACKBONE, layers=("avgpool",),
          weights: str | None = "DEFAULT", weights_file=None, pool: str = "avg",
          token_pool: str = "cls", dtype: str = "float16", batch_size: int | None = None,
          num_workers: int | None = None, device: str | None = None, test_size: float = 0.3,
          seed: int = 0, max_per_class: int | None = None, on_error: str = "skip",
          shard: tuple = (0, 1), overwrite: bool = False, progress=True,
          commit_rows: int = 512, commit_every: float = 30.0, keep_map=(),
          map_size: int | None = None, storage_options: dict | None = None,
          label_field: str | None = None, update: bool = False,
          compile: bool = False) -> EmbedResult:  # noqa: A002 - the option's name
    """Embed a data set with a frozen backbone and store several layers in one HDF5 file.

    This is the loop in this process; ``featurecache.embed`` (:func:`featurecache.cluster.embed`)
    takes ``cluster``, ``shards`` and ``copy`` too, to run it in shards on a Dask cluster.

    Args:
        source: image folder (``DATA/<class>/…`` or ``DATA/<split>/<class>/…``), CSV
            manifest (``path,label[,split]``) or ``builtin:digits``; or a
            :class:`~featurecache.data.Source` opened with the same ``test_size``, ``seed``
            and ``max_per_class`` (so the data are listed once), possibly one shard of it
            (:meth:`~featurecache.data.Source.part_of`).
        output: the ``.h5`` file to write (its folder must exist).
        backbone: a name (see ``featurecache backbones``) or a loaded :class:`Backbone`.
        layers: layer names or aliases (see ``featurecache layers NAME``).
        weights, weights_file: see :func:`featurecache.backbones.load_backbone`.
        pool: ``avg``, ``max`` or ``avgmax`` for feature maps.
        keep_map, map_size: layers whose unpooled map ``(C, H, W)`` is stored too (under
            ``/maps``, pooled down to ``map_size`` x ``map_size`` when given).
        token_pool: ``cls`` or ``mean`` for token sequences.
        dtype: ``float16`` (default) or ``float32`` storage.
        batch_size: images per forward pass (default 16 on CPU, where larger batches run
            slower, and 64 on GPU).
        num_workers: DataLoader decode workers (default: CPU count, at most 8).
        device: ``cuda``/``cpu``; default cuda when present (with AMP). Both run in
            channels_last memory layout (faster on CPU too; see ``extract.on_device``).
        test_size, seed: the stratified split drawn when the source has none.
        max_per_class: keep at most this many images per class and split.
        storage_options: how a URL source reaches its store (fsspec options such as
            ``{"endpoint_url": "http://127.0.0.1:9000"}``; credentials from the environment);
            only their public keys are recorded (:func:`featurecache.data.remote.public_options`).
        label_field: tar shards: the field of a sample's ``KEY.json`` that holds its label
            (a string or an integer) when it has no ``KEY.cls`` or ``KEY.txt``.
        on_error: ``skip`` (log unreadable images in the file) or ``fail``.
        shard: ``(index, count)``: embed only this contiguous part of the records, into a
            self-contained file.
        overwrite: start over instead of resuming or refusing a different existing file.
        update: bring an existing complete ``output`` up to date with the data as they are
            now (:mod:`featurecache.update`): a new file in which unchanged rows are copied,
            new and changed images embedded, deleted ones dropped (the old file stays until
            the new one replaces it); its :attr:`EmbedResult.update` counts them.
        progress: print the phases and a progress bar on stderr; or a function called as
            ``progress(inputs_done, inputs_total)`` after every batch (no printing).
        commit_rows, commit_every: commit the rows done so far every ``commit_rows`` rows or
            ``commit_every`` seconds, whichever comes first (a kill loses at most that much).

        compile: ``torch.compile`` the backbone's forward first (its cost is reported; the
            features are the eager ones up to float rounding; see BENCHMARKS.md for when it
            pays on the CPU).

    Raises:
        FeaturecacheError: for any bad input; nothing is created before all inputs are checked.
    """
    t0 = time.perf_counter()
    kw = {"backbone": backbone, "layers": layers, "weights": weights,
          "weights_file": weights_file, "pool": pool, "token_pool": token_pool, "dtype": dtype,
          "batch_size": batch_size, "num_workers": num_workers, "device": device,
          "test_size": test_size, "seed": seed, "max_per_class": max_per_class,
          "on_error": on_error, "overwrite": overwrite, "commit_rows": commit_rows,
          "commit_every": commit_every, "keep_map": list(keep_map), "map_size": map_size,
          "storage_options": storage_options, "label_field": label_field}
    say = _Say(progress is True)  # (every option is checked already: options.validated)
    from .data import remote

    retried = remote.retries()  # (made before the decode workers fork: they add to it)
    if update:
        from .update import update_file

        return update_file(source, output, shard=shard, say=say, progress=progress, t0=t0,
                           retried=retried, **kw)
    job = prepare(source, output, shard=shard, say=say, **kw)
    dev, bb, specs, records = job.device, job.backbone, job.specs, job.records
    extractor = FeatureExtractor(bb.model, specs)  # shares the model's modules: moved below
    job.meta["extraction_method"] = extractor.method
    with contextlib.ExitStack() as stack:
        stack.enter_context(on_device(bb.model, dev))
        if compile:  # before the writer: a model that cannot be compiled leaves no file
            say(f"compiling the forward for batches of {job.batch_size} ...")
            seconds = extractor.compile(_example(bb, job.batch_size, dev), _amp(dev))
            say(f"compiled in {seconds:.1f} s (inductor's cache: a later run reuses it)")
        w = stack.enter_context(Writer(output, job.meta, specs, job.source.classes,
                                       overwrite=overwrite, commit_rows=commit_rows,
                                       commit_every=commit_every))
        resumed, was_complete = w.n_done, w.already_complete  # (a final file already there)
        if resumed and not w.already_complete:
            say(f"resuming after {resumed:,} of {len(records):,} inputs committed earlier")
        if not w.already_complete:
            _run(job.source, records[w.n_done:], w.n_done, bb, extractor, dev, w,
                 job.batch_size, num_workers, on_error, progress)
            w.close(complete=True)
        return EmbedResult(Path(output), w.n_committed, w.n_skipped, resumed,
                           time.perf_counter() - t0, was_complete,
                           [s for s in specs if s.group == "layers"], job.source.ignored,
                           [s for s in specs if s.is_map], remote.retries() - retried)


def check_options(kw: dict, **cluster) -> None:
    """Validate embed's keyword arguments (and the cluster's) against their declarations
    (``options.SIGNATURES["embed"]``, ``options.CLUSTER``), as :func:`embed` itself does."""
    given = {**kw, **cluster}
    for o in SIGNATURES["embed"].options + CLUSTER:
        if o.name in given:
            o.check(given[o.name])


@dataclass
class Job:
    """What an embed is about to do: the listed data (the records of its shard), the loaded
    backbone, the resolved layers and the provenance the file will hold."""

    source: Source
    records: list
    backbone: Backbone
    specs: list
    meta: dict
    device: object
    batch_size: int


def prepare(source, output, *, backbone, layers, weights, weights_file, pool, token_pool, dtype,
            batch_size, device, test_size, seed, max_per_class, shard=(0, 1), say=None,
            keep_map=(), map_size=None, storage_options=None, label_field=None, **_) -> Job:
    """List the data (unless given a :class:`Source`), load the backbone, resolve the
    layers and build the provenance: everything but the forward passes."""
    say = say or _Say(False)
    output = Path(output)
    dev = default_device(device)
    require_folder(output)
    if isinstance(source, Source):  # already opened (a pipeline checks it before the embed)
        src, source = source, source.root
    else:
        src = open_source(source, test_size=test_size, seed=seed, max_per_class=max_per_class,
                          storage_options=storage_options, label_field=label_field)
    if src.part is not None:  # one shard, cut by the cluster's client
        if tuple(shard) not in ((0, 1), src.part[:2]):
            raise OptionError(f"the source is shard {src.part[0]}/{src.part[1]} already; "
                              f"do not pass another shard.")
        shard, start, records = src.part[:2], src.part[2], src.records
    else:
        start, stop = shard_range(len(src.records), *shard)
        records = src.records[start:stop]
        say(src.summary())
    if not records:
        raise DataError(f"shard {shard[0]} of {shard[1]} of {source} holds no images.")
    if tuple(shard) != (0, 1):
        say(f"shard {shard[0]} of {shard[1]}: inputs {start:,} to {start + len(records) - 1:,}")
    if not isinstance(backbone, Backbone):
        say(f"loading {backbone} (weights {weights_file or weights}) ...")
    bb = backbone if isinstance(backbone, Backbone) else load_backbone(backbone, weights, weights_file)
    if src.dense:  # a mask describes every pixel: the whole image is resized, nothing cropped
        bb = dataclasses.replace(bb, preprocess=bb.preprocess.dense())
    specs = resolve_layers(bb, layers, pool=pool, token_pool=token_pool)
    maps = resolve_maps(bb, keep_map, map_size)
    targets = src.target_specs(bb.preprocess.crop) if src.dense else []
    say(f"{len(specs)} layer{'s' * (len(specs) > 1)}: "
        f"{', '.join(f'{s.name}[{s.dim}]' for s in specs)}, {dtype}, on {dev}"
        + "".join(f"; map {m.name}{list(m.shape)}" for m in maps)
        + "".join(f"; {t.name} {'x'.join(map(str, t.shape))}" if t.shape else f"; {t.name}"
                  for t in targets))
    v = versions("torch", "torchvision", "python")
    meta = {
        **bb.provenance(), "pool": pool, "token_pool": token_pool, "dtype": dtype,
        "layers": [s.name for s in specs], "extraction_method": "",
        "data_root": src.root, "data_kind": src.kind, "data_fingerprint": src.fingerprint(),
        "split_origin": src.split_origin, "seed": seed, "test_size": test_size,
        "max_per_class": -1 if max_per_class is None else max_per_class,
        "shard_index": shard[0], "shard_count": shard[1], "shard_start": start,
        "n_inputs": len(records), "torch_version": v["torch"],
        "torchvision_version": v["torchvision"], "featurecache_version": v["featurecache"],
        "python_version": v["python"], "device": str(dev),
        "rebuild": _rebuild_command(src.describe(), output, bb, specs, pool, token_pool, dtype,
                                    test_size, seed, max_per_class, shard, weights, weights_file,
                                    maps, map_size, src.storage_options, src.label_field),
    }
    if maps:  # part of the identity only when present (older files keep their fingerprint)
        meta.update(maps=[m.name for m in maps], map_size=map_size or 0)
    if targets:  # (the data fingerprint covers the masks' and boxes' content)
        meta["dense"] = {"targets": [t.name for t in targets], "ignore_index": src.ignore_index}
    return Job(src, records, bb, specs + maps + targets, meta, dev,
               batch_size or (64 if dev.type == "cuda" else 16))


class _Say:
    """Print a phase of the run on stderr (nothing when ``progress`` is off)."""

    def __init__(self, on: bool):
        self.on = on

    def __call__(self, message: str) -> None:
        if self.on:
            print(message, file=sys.stderr, flush=True)


def _run(source, records, offset, bb, extractor, dev, writer, batch_size, num_workers, on_error,
         progress):
    from tqdm.auto import tqdm

    report, done = (progress if callable(progress) else None), offset
    bar = tqdm(total=len(records) + offset, initial=offset, unit="img", disable=progress is not True,
               desc=f"embed {bb.name}", dynamic_ncols=True)
    with bar:
        for rows, feats, skipped, n_inputs in _embedded(source, records, bb, extractor, dev,
                                                        batch_size, num_workers, on_error,
                                                        writer.meta["dtype"]):
            writer.write(feats, [r.path for r in rows], [r.label for r in rows],
                         [r.split for r in rows], n_inputs, skipped, [r.stamp for r in rows])
            bar.update(n_inputs)
            done += n_inputs
            if report is not None:
                report(done, len(records) + offset)
            if skipped:
                bar.set_postfix(skipped=writer.n_skipped + len(skipped), refresh=False)
    writer.flush()


def _amp(dev):
    """The autocast the forward runs under: float16 on CUDA, none on the CPU."""
    return torch.autocast("cuda", dtype=torch.float16) if dev.type == "cuda" else nullcontext()


def _example(bb, batch_size: int, dev) -> torch.Tensor:
    """A batch shaped as the loop's (zeros, in its layout), to compile for."""
    crop = bb.preprocess.crop
    return to_layout(torch.zeros(batch_size, 3, crop, crop, device=dev))


def _embedded(source, records, bb, extractor, dev, batch_size, num_workers, on_error, dtype,
              batches=None):
    """The forward passes over ``records``, in order, one batch at a time: ``(rows, feats,
    skipped, n_inputs)``: the records whose features ``feats`` (``{LayerSpec.key: (B, ...)}``)
    are usable, the ``[(id, reason)]`` of the others, and how many records the batch took.
    ``batches``: the batches as lists of consecutive indices into ``records`` (an update
    cuts them itself), instead of ``batch_size``."""
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    data = source.dataset(records, bb.preprocess.transform(), bb.preprocess.exif)
    cut = {"batch_size": batch_size} if batches is None or isinstance(
        data, torch.utils.data.IterableDataset) else {"batch_sampler": batches}
    loader = torch.utils.data.DataLoader(
        data, **cut, num_workers=num_workers, collate_fn=collate, pin_memory=dev.type == "cuda",
        persistent_workers=False, timeout=_stall_seconds() if num_workers else 0)
    amp = _amp(dev)
    for batch in _delivered(loader, num_workers):
        if batch.fatal:  # a wrong mask or box: the data set needs fixing, not skipping
            i, reason = batch.fatal[0]
            raise DataError(f"{reason}. Fix the data and run the same command again (the rows "
                            f"committed so far are kept).")
        if batch.failed and on_error == "fail":
            i, reason = batch.failed[0]
            raise DataError(f"{records[i].path}: {reason}. Use {option('on_error', 'skip')} "
                            f"to log and skip unreadable images.")
        feats = {}
        if batch.images is not None:
            images = to_layout(batch.images.to(dev, non_blocking=True))
            with amp:
                out = extractor(images)
            feats = {k: v.cpu().numpy() for k, v in out.items()}
            bad = _unusable_rows(feats, dtype)
            feats.update({f"target:{k}": v for k, v in (batch.targets or {}).items()})
        else:
            bad = {}
        rows = [records[i] for i in batch.index]
        skipped = [(records[i].path, reason) for i, reason in batch.failed]
        if bad:
            j, reason = next(iter(bad.items()))
            if on_error == "fail":
                raise DataError(f"{rows[j].path}: {reason}. Use {option('on_error', 'skip')} to log and "
                                f"skip such images.")
            keep = [j for j in range(len(rows)) if j not in bad]
            skipped += [(rows[j].path, r) for j, r in bad.items()]
            feats = {k: v[keep] for k, v in feats.items()}
            rows = [rows[j] for j in keep]
        yield rows, feats, skipped, batch.n_inputs


STALL_SECONDS = 300  # no batch from the decode workers for this long: they cannot deliver


def _stall_seconds() -> float:
    return float(os.environ.get("FEATURECACHE_DECODE_TIMEOUT", STALL_SECONDS))


def _delivered(loader, num_workers):
    """The loader's batches; decode workers that died or stopped delivering (a full or small
    /dev/shm: torch hands batches over in shared memory) end the run with one line instead of
    a wait without end. What was committed stays, and the same command resumes."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as exc:
            text = str(exc)
            if "timed out" not in text and "exited unexpectedly" not in text \
                    and "is killed by signal" not in text:
                raise
            what = ("delivered no batch for "
                    f"{_stall_seconds():g} s" if "timed out" in text else "died")
            raise DataError(
                f"the {num_workers} image decode workers {what} ({text.splitlines()[0]}). They "
                f"hand batches over in shared memory: a full or small /dev/shm (a container's "
                f"default is 64 MB) is the usual cause; give it more room (docker run "
                f"--shm-size=1g) or decode in this process with {option('num_workers', 0)}. "
                f"The rows committed so far are kept: run the same command again to resume.") \
                from None
        yield batch


def _unusable_rows(feats: dict, dtype: str) -> dict:
    """Rows whose features are not finite, or do not fit the stored dtype (float16 overflow,
    e.g. under GPU autocast): ``{row: reason}``. Such values are never stored silently."""
    limit = float(np.finfo(np.float16).max) if dtype == "float16" else np.inf
    bad = {}
    for name, v in feats.items():
        for j in np.flatnonzero(~(np.abs(v.reshape(len(v), -1)) <= limit).all(axis=1)):  # NaN: False
            bad.setdefault(int(j), f"non-finite features (NaN/inf) in layer {name!r}"
                           if not np.isfinite(v[j]).all() else
                           f"features of layer {name!r} exceed the float16 range; use {option('dtype', 'float32')}")
    return dict(sorted(bad.items()))


def _rebuild_command(source, output, bb, specs, pool, token_pool, dtype, test_size, seed,
                     max_per_class, shard, weights, weights_file, maps=(), map_size=None,
                     storage_options=None, label_field=None) -> str:
    """``source``: the data's spec as the source describes itself (:meth:`Source.describe`);
    of ``storage_options`` only the public keys (an endpoint, never a key)."""
    parts = ["featurecache", "embed", source, "-o", os.path.abspath(output), "--backbone", bb.name]
    parts += (["--weights-file", os.path.abspath(weights_file)] if weights_file
              else ["--weights", str(weights)])
    for s in specs:
        parts += ["--layer", s.name]
    parts += ["--pool", pool, "--token-pool", token_pool, "--dtype", dtype,
              "--test-size", str(test_size), "--seed", str(seed)]
    if max_per_class is not None:
        parts += ["--max-per-class", str(max_per_class)]
    if tuple(shard) != (0, 1):
        parts += ["--shard", f"{shard[0]}/{shard[1]}"]
    if maps:
        parts += ["--keep-map", ",".join(m.name for m in maps)]
        parts += ["--map-size", str(map_size)] if map_size else []
    if storage_options:
        import json

        from .data.remote import public_options

        public = public_options(storage_options)
        parts += ["--storage-options", json.dumps(public, sort_keys=True)] if public else []
    if label_field:
        parts += ["--label-field", label_field]
    return shlex.join(parts)

