"""Scale-out on Dask distributed: a sharded embed, and the head search's fits on a cluster.

A clustered embed is the single-process embed run K times, each on a contiguous shard:

* the client lists the data set once, loads the backbone once (so a bad layer or weights file
  fails before any worker starts), and cuts the records into K contiguous shards;
* one task per shard runs :func:`featurecache.embed` on the records it receives into
  ``OUTPUT.shards/part-00007-of-00016.h5``: one writer per file; workers share only the file
  system. A shard whose file is complete and made with the same settings is not submitted
  again; a partial one resumes from its committed rows, also when Dask retries a task whose
  worker died;
* when every shard is complete they are joined into ``OUTPUT`` (virtual datasets, or one
  self-contained copy): the same rows, in the same order, with the same paths, labels and
  splits as one process would write; the values equal within float16 rounding (each
  shard's sums depend on its worker's thread count: :func:`same_within_rounding`).

``--overwrite`` of a joined output builds the new shards in the other of two folders
(``OUTPUT.shards/`` and ``OUTPUT.shards.2/``) while the old ``OUTPUT`` keeps reading its own;
the new ``OUTPUT`` replaces the old one by one rename, and only then are the old shards
removed. A re-run after a kill resumes the new shards (with or without ``--overwrite``:
``--overwrite`` starts them over).

A worker process runs one shard at a time, with all its threads (torch.fx patches
``torch.nn.Module.__call__`` process-wide while it traces a model, so no forward pass may
run in another thread meanwhile; and a shard sets torch's threads to the worker's).

Tasks ask for ``resources={"GPU": 1}`` when the workers advertise GPUs. ``compare`` runs its
fits through joblib's Dask backend with each layer's array scattered once.

Addresses: see :mod:`featurecache.distribute`, which holds the client and joblib's backend
(below both stages; this module stands above the embed loop and calls it). :func:`embed` is
``featurecache.embed``: the embed loop in this process, or with ``cluster`` the sharded embed.
Dask is imported only inside functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import threading
import time
import uuid
from pathlib import Path

from .distribute import CONNECT_TIMEOUT, ClusterError, check_address, connect, joblib_on
from .distribute import workers as _workers
from .errors import FeaturecacheError, OptionError, StoreMismatchError, option
from .options import validated

# connect, joblib_on, check_address and ClusterError live in .distribute (kept here by name)
__all__ = ["ClusterError", "connect", "embed", "embed_on_cluster", "joblib_on", "shard_paths",
           "shard_folders", "check_request", "check_address", "same_within_rounding",
           "CONNECT_TIMEOUT"]
RETRIES = 2              # task errors retried (a dead worker's task is rescheduled by Dask)
REPORT_EVERY = 0.5       # seconds between progress events of a shard
_PART = re.compile(r"part-(\d{5})-of-(\d{5})\.h5$")
SUPERSEDED = ".superseded.json"  # in an old output's shard folder, once its successor is built
# one shard task at a time in a worker process (see the module's docstring)
_SHARD_LOCK = threading.Lock()


def shard_folders(output) -> tuple[Path, Path]:
    """The two folders a clustered embed keeps its shards in: ``OUTPUT.shards`` and
    ``OUTPUT.shards.2`` (an ``--overwrite`` builds in the one the old output does not use)."""
    output = Path(output)
    return output.with_name(output.name + ".shards"), output.with_name(output.name + ".shards.2")


def shard_paths(output, count: int, folder=None) -> list[Path]:
    """``FOLDER/part-IIIII-of-KKKKK.h5`` for every shard (default ``OUTPUT.shards``)."""
    folder = Path(folder) if folder is not None else shard_folders(output)[0]
    return [folder / f"part-{i:05d}-of-{count:05d}.h5" for i in range(count)]


def check_request(cluster, *, shards=None, copy=False, shard=(0, 1)) -> None:
    """Refuse options that would be silently ignored: ``shard`` with a cluster (the cluster
    cuts the shards itself), ``shards`` or ``copy`` without one.

    Raises:
        OptionError: naming the option to use instead.
    """
    if cluster is not None and tuple(shard) != (0, 1):
        raise OptionError(
            f"{option('shard', f'{shard[0]}/{shard[1]}')} does not go with "
            f"{option('cluster', cluster)}: a clustered embed cuts the data into shards itself; "
            f"choose how many with {option('shards', shard[1])}, or drop {option('cluster', cluster)} "
            f"to embed this one shard here.")
    if cluster is None and shards is not None:
        raise OptionError(
            f"{option('shards', shards)} applies to a clustered embed only: add "
            f"{option('cluster', 'local')} (or a scheduler address) to run {shards} shards, or "
            f"embed one part here with {option('shard', f'0/{shards}')}.")
    if cluster is None and copy:
        raise OptionError(
            f"{option('copy')} applies to a clustered embed only (it joins the shards into one "
            f"self-contained file); add {option('cluster', 'local')}, or join shard files with "
            f"`featurecache join --copy`.")


def same_within_rounding(a, b):
    """Whether two arrays of stored values agree as a clustered embed promises to agree with
    a one-process one: each value within one float16 step of the other (2**-10 of the larger
    magnitude), or, for values near zero, within 2**-16 of their row's largest magnitude
    (float32 sums in another order, then rounded). Returns the boolean mask per value."""
    import numpy as np

    a = np.asarray(a, dtype=np.float32).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float32).reshape(len(b), -1)
    scale = np.maximum(np.abs(a).max(axis=1, keepdims=True), np.abs(b).max(axis=1, keepdims=True))
    return np.abs(a - b) <= 2.0 ** -10 * np.maximum(np.abs(a), np.abs(b)) + 2.0 ** -16 * scale


def _existing_count(folder: Path | None) -> int | None:
    """The shard count of the part files in ``folder`` (None: none, or several counts)."""
    counts = {int(m.group(2)) for p in (folder.iterdir() if folder and folder.is_dir() else ())
              if (m := _PART.match(p.name.replace(".partial", "")))}
    return counts.pop() if len(counts) == 1 else None


def _used_folder(output: Path) -> Path | None:
    """Which of the two shard folders the existing ``output`` reads (or was joined from)."""
    from .store.reader import joined_sources

    sources = joined_sources(output) if output.is_file() else []
    folders = {p.parent.resolve() for p in sources}
    for folder in shard_folders(output):
        if folders == {folder.resolve()}:
            return folder
    return None


def _started(folder: Path, meta: dict, shards: int | None) -> bool:
    """Whether ``folder`` holds a shard (complete or partial) of this very run: a run that
    was stopped, to be resumed."""
    from .store import open_features
    from .store.layout import fingerprint

    count = shards or _existing_count(folder)
    if not count:
        return False
    for i, path in enumerate(shard_paths(None, count, folder)):
        try:
            ff = open_features(path)
        except FeaturecacheError:
            continue
        if ff.provenance.get("fingerprint") == fingerprint(
                {**meta, "shard_index": i, "shard_count": count}):
            return True
    return False


@validated("embed_anywhere")  # the cluster's options, and embed's (the **kw) by name
def embed(source, output, *, cluster: str | None = None, shards: int | None = None,
          copy: bool = False, **kw):
    """``featurecache.embed``: :func:`featurecache.embedding.embed` in this process, or with
    ``cluster`` (``local``, ``local:N``, ``local-cuda`` or a scheduler address) in ``shards``
    shard files on a Dask cluster, joined into ``output`` (virtual datasets, or with ``copy``
    one self-contained file): :func:`embed_on_cluster`.

    Takes embed's options. The caller chooses to distribute (the CLI's ``--cluster``, a
    pipeline's ``[cluster]`` table); the embed loop itself never dispatches to a cluster.

    Raises:
        OptionError: ``shards`` or ``copy`` without a cluster, ``shard`` with one, or any bad
            option of embed (nothing is created before all are checked).
    """
    if cluster is not None:
        return embed_on_cluster(source, output, cluster=cluster, shards=shards, copy=copy, **kw)
    from .embedding import embed as embed_here

    _checked(source, output, kw, cluster=None, shards=shards, copy=copy)
    return embed_here(source, output, **kw)


def _checked(source, output, kw: dict, **cluster) -> dict:
    """Embed's keyword arguments with its defaults filled in, checked with the cluster's
    options in the order a one-process embed checks them (its own first, then the mix)."""
    import inspect

    from .embedding import check_options, embed as embed_here

    args = inspect.signature(embed_here).bind(source, output, **kw)  # TypeError: unknown name
    args.apply_defaults()
    kw = {k: v for k, v in args.arguments.items() if k not in ("source", "output")}
    kw["keep_map"] = list(kw["keep_map"])
    check_options({k: v for k, v in kw.items() if k not in ("shard", "progress")}, **cluster)
    check_request(cluster["cluster"], shards=cluster["shards"], copy=cluster["copy"],
                  shard=kw["shard"])  # nothing silently ignored
    return kw


def embed_on_cluster(source, output, *, cluster: str, shards: int | None = None,
                     copy: bool = False, **kw):
    """:func:`featurecache.embedding.embed` in shards on a Dask cluster, joined into ``output``.

    Takes embed's options (the backbone by name). Returns an
    :class:`~featurecache.embedding.EmbedResult` for the joined file. An existing ``output``
    stays readable until the new one replaces it (see the module's docstring).

    Raises:
        ClusterError: the cluster cannot be reached, or a shard failed (named, with its
            first failing input when the data caused it).
        FeaturecacheError: any bad input, before a task is submitted.
    """
    from .embedding import EmbedResult, _Say, prepare
    from .store import join_shards, open_features
    from .store.layout import fingerprint
    from .store.reader import is_hdf5

    t0 = time.perf_counter()
    kw = _checked(source, output, kw, cluster=cluster, shards=shards, copy=copy)
    progress, overwrite = kw.pop("progress"), kw.pop("overwrite")
    if kw.pop("update", False):  # (the copy is local I/O; only the new images are embedded)
        raise OptionError(f"{option('update')} runs in this process (it embeds only the new "
                          f"and changed images and copies the rest): drop "
                          f"{option('cluster', cluster)}.")
    del kw["shard"]  # (0, 1): the cluster cuts the shards itself
    output = Path(output)
    if not isinstance(kw["backbone"], str):
        raise ClusterError("a clustered embed takes the backbone by name (workers load it).")
    check_address(cluster)  # before the data are listed and the backbone loaded
    say = _Say(progress is True)
    job = prepare(source, output, say=say, **kw)  # lists the data, loads the backbone
    # the whole data set's fingerprint, computed once: every shard's file records it
    src = dataclasses.replace(job.source, whole_fingerprint=job.source.fingerprint())
    n = len(job.records)
    layers = [s for s in job.specs if s.group == "layers"]
    maps = [s for s in job.specs if s.is_map]
    if output.exists() and not (output.is_file() and is_hdf5(output)):
        raise StoreMismatchError(f"{output} exists and is not a feature file; choose another "
                                 f"output (it is never replaced).")
    natural = src.natural_shards()  # a tar source: one shard per tar, so a task streams whole tars
    if natural is not None:
        if shards is not None and shards != len(natural):
            raise OptionError(f"{job.source.root} is embedded one shard per tar shard "
                              f"({len(natural)} of them), not {option('shards', shards)}; "
                              f"drop {option('shards', shards)}.")
        shards = len(natural)
        say(f"one task per tar shard: {shards} shards")
    if shards is not None and shards > n:  # before any cluster is started
        raise ClusterError(f"{option('shards', shards)} is more shards than the {n:,} images; "
                           f"use at most {n:,}.")
    used = _used_folder(output)  # the old output's shards: never touched before the swap
    other = next(f for f in shard_folders(output) if f != used)
    if output.exists() and not overwrite:
        try:
            ff, problem = open_features(output), None
        except FeaturecacheError as exc:
            ff, problem = None, exc
        if ff is not None and ff.complete and \
                ff.provenance.get("fingerprint") == fingerprint(job.meta):
            say(f"{output} is complete; nothing to do.")
            if _superseded(other, output) and _remove_folder(other):  # a kill cut it short
                say(f"removed the shards of an earlier {output.name} left in {other}")
            return EmbedResult(output, ff.n_rows, len(ff.skipped()), n,
                               time.perf_counter() - t0, True, layers, job.source.ignored, maps)
        if not _started(other, job.meta, shards):  # no stopped --overwrite of this run
            raise problem or StoreMismatchError(
                f"{output} exists and was made with other settings or is unfinished; use "
                f"another output path or {option('overwrite')} to start over.")
        folder = other  # an --overwrite that was stopped: resume its shards
        say(f"resuming the new shards in {folder}; {output} stays as it is until they are "
            f"joined")
    elif output.exists():
        folder = other
    else:
        folder = next((f for f in shard_folders(output) if _started(f, job.meta, shards)),
                      other)
    with connect(cluster) as client:
        workers = _workers(client)
        client.run(_tune_worker)  # before any task thread exists on a fresh worker
        count = shards or _existing_count(folder) or _existing_count(used) or \
            min(n, 4 * max(1, len(workers)))
        parts = shard_paths(output, count, folder)
        folder.mkdir(exist_ok=True)
        if overwrite:
            _remove_parts(folder)  # not the old output's (that is in `used`)
        todo = [i for i in range(count) if not _complete(
            parts[i], fingerprint({**job.meta, "shard_index": i, "shard_count": count}))]
        say(f"{count} shards on {len(workers)} workers ({cluster}): {count - len(todo)} "
            f"complete, {len(todo)} to run; shard files in {folder}")
        task_kw = {**kw, "backbone": job.backbone.name,
                   "layers": [s.name for s in layers],
                   "weights_file": os.path.abspath(kw["weights_file"]) if kw["weights_file"]
                   else None, "overwrite": False}
        gpu = any("GPU" in w.get("resources", {}) for w in workers.values())
        _run_shards(client, src, parts, todo, task_kw, gpu, progress, n)
    say(f"joining {count} shards into {output}{' (copy)' if copy else ''}")
    # one rename replaces the old output; only then are its shards removed
    if used is not None and used != folder:
        _mark_superseded(used, parts)
    join_shards(parts, output, overwrite=True, copy=copy, rebuild=job.meta["rebuild"])
    if used is not None and used != folder:
        _remove_folder(used)
    ff = open_features(output)
    return EmbedResult(output, ff.n_rows, len(ff.skipped()), 0, time.perf_counter() - t0,
                       False, layers, job.source.ignored, maps)


def _complete(path: Path, fp: str) -> bool:
    """Whether a shard file is complete and made with these settings (then it is kept)."""
    from .store import open_features

    try:
        ff = open_features(path)
    except FeaturecacheError:
        return False
    return ff.complete and ff.provenance.get("fingerprint") == fp


def _remove_parts(folder: Path) -> int:
    """Remove the shard files in ``folder`` (not a shard a live writer holds); returns how
    many were removed."""
    import shutil

    from filelock import FileLock, Timeout

    removed = 0
    for p in sorted(folder.iterdir() if folder.is_dir() else ()):
        if not _PART.match(p.name.replace(".partial", "").replace(".lock", "")):
            continue
        if p.is_dir():
            lock = FileLock(str(p / ".lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # a task of another run is writing it
            try:
                shutil.rmtree(p)
            finally:
                lock.release()
        else:
            p.unlink(missing_ok=True)
        removed += 1
    return removed


def _remove_folder(folder: Path) -> int:
    """Remove the shards of ``folder``, then its mark and the folder if nothing else is in it."""
    removed = _remove_parts(folder)
    for mark in folder.glob(f".{SUPERSEDED}.*"):  # a mark a kill cut while it was written
        mark.unlink(missing_ok=True)
    (folder / SUPERSEDED).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()
    return removed


def _mark_superseded(old: Path, parts) -> None:
    """Write into the old output's shard folder which shards replace it (their creation ids):
    once an output that joined exactly those is in place, the folder is known to be unused,
    also when a kill cut its removal short."""
    import json

    from .files import atomic_output
    from .store import open_features

    ids = [open_features(p).provenance.get("creation_id") for p in parts]
    with atomic_output(old / SUPERSEDED) as tmp:
        tmp.write_text(json.dumps(ids))


def _superseded(folder: Path, output: Path) -> bool:
    """Whether ``folder`` is marked as replaced by the shards ``output`` joined."""
    import json

    from .store.reader import joined_ids

    try:
        ids = json.loads((folder / SUPERSEDED).read_text())
    except (OSError, ValueError):
        return False
    return bool(ids) and ids == joined_ids(output)


def _run_shards(client, source, parts, todo, task_kw, gpu, progress, n_total) -> None:
    """Submit one task per shard in ``todo``; show one bar over all images; raise on the
    first failed shard, naming it."""
    from distributed import KilledWorker
    from tqdm.auto import tqdm

    count = len(parts)
    sizes = [b - a for a, b in source.shard_ranges(count)]
    topic = f"featurecache-{uuid.uuid4().hex}"
    seen = {"done": {}, "starts": {}}

    def on_event(event):
        i, done = event[1]
        if done < 0:
            seen["starts"][i] = seen["starts"].get(i, 0) + 1
        else:
            seen["done"][i] = done

    client.subscribe_topic(topic, on_event)
    futures = {}
    for i in todo:
        futures[i] = client.submit(
            _embed_shard, source.part_of(i, count), str(parts[i]), task_kw, topic, i,
            key=f"featurecache-embed-{parts[i].stem}-{topic[-8:]}", retries=RETRIES,
            resources={"GPU": 1} if gpu else None, pure=False)
    base = n_total - sum(sizes[i] for i in todo)
    bar = tqdm(total=n_total, initial=base, unit="img", disable=progress is not True,
               desc="embed (cluster)", dynamic_ncols=True)
    try:
        pending = dict(futures)
        while pending:
            time.sleep(0.2)
            for i, f in list(pending.items()):
                if f.status == "finished":
                    del pending[i]
                    seen["done"][i] = sizes[i]
                elif f.status in ("error", "cancelled"):
                    exc = f.exception()
                    for g in pending.values():
                        g.cancel()
                    raise _shard_error(i, count, parts[i], exc) from None
            bar.n = base + sum(seen["done"].get(i, 0) for i in todo)
            running = sum(1 for i in pending if i in seen["starts"])
            retried = sum(1 for v in seen["starts"].values() if v > 1)
            bar.set_postfix_str(f"shards {count - len(pending)}/{count} done, {running} running"
                                + (f", {retried} retried" if retried else ""), refresh=False)
            bar.refresh()
            if callable(progress):
                progress(bar.n, n_total)
    except KilledWorker as exc:  # raised by f.exception() for a task whose workers kept dying
        raise ClusterError(f"{exc}") from None
    finally:
        bar.close()
        client.unsubscribe_topic(topic)


def _shard_error(i, count, path, exc) -> ClusterError:
    if type(exc).__name__ == "KilledWorker":
        why = ("its worker died each time it ran (out of memory, or a crash in a native "
               "library); the committed rows are kept: run the same command again to resume")
    elif isinstance(exc, FeaturecacheError):
        why = exc.args[0] if exc.args else str(exc)
    else:
        why = f"{type(exc).__name__}: {exc}"
    return ClusterError(f"shard {i} of {count} ({path.name}) failed: {why}")


def _tune_worker() -> bool:
    from .malloc import tune

    return tune(single_arena=True)


def decode_workers(threads: int, device: str | None) -> int:
    """Decode processes for one task. On CPU none: the cluster's worker processes already use
    every core, and a Dask worker starts DataLoader processes by spawning fresh interpreters
    (seconds each shard: measured, the clustered embed ran 2x slower with them). On a GPU,
    as many as the worker's threads (at most 8), so that decoding keeps the GPU busy."""
    import multiprocessing

    from .extract import default_device

    if multiprocessing.current_process().daemon or default_device(device).type != "cuda":
        return 0
    return min(8, threads)


def _embed_shard(part, path: str, kw: dict, topic: str, index: int):
    """The task: embed one shard's records into its own file (resuming what is committed)."""
    import torch
    from distributed import get_worker

    from .embedding import embed

    from .malloc import tune

    tune(single_arena=True)  # Dask workers trim memory after every free (malloc.py)
    worker = get_worker()
    threads = max(1, worker.state.nthreads)
    last = [0.0]

    def report(done, total):
        now = time.monotonic()
        if now - last[0] >= REPORT_EVERY or done == total:
            last[0] = now
            worker.log_event(topic, (index, done))

    # one shard at a time per worker process, with all of the worker's threads: torch.fx
    # patches torch.nn.Module.__call__ process-wide while it traces, so another thread's
    # forward pass meanwhile fails ("module is not installed as a submodule")
    with _SHARD_LOCK:
        torch.set_num_threads(threads)  # the worker's share of the machine, not all its cores
        if kw.get("num_workers") is None:
            kw = {**kw, "num_workers": decode_workers(threads, kw.get("device"))}
        worker.log_event(topic, (index, -1))
        r = embed(part, path, progress=report, **kw)
    return r.n_rows
