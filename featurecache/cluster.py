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
  self-contained copy): the same rows, in the same order, as one process would write.

Tasks ask for ``resources={"GPU": 1}`` when the workers advertise GPUs. ``compare`` runs its
fits through joblib's Dask backend with each layer's array scattered once.

Addresses: ``local`` (one worker process per core), ``local:N``, ``local-cuda`` (dask-cuda's
``LocalCUDACluster``: one worker per visible GPU) or a scheduler address
(``tcp://host:8786``). Dask is imported only here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
import uuid
from pathlib import Path

from .errors import FeaturecacheError, StoreMismatchError, option

__all__ = ["ClusterError", "connect", "embed_on_cluster", "joblib_on", "shard_paths"]

CONNECT_TIMEOUT = "5s"
RETRIES = 2              # task errors retried (a dead worker's task is rescheduled by Dask)
REPORT_EVERY = 0.5       # seconds between progress events of a shard
_PART = re.compile(r"part-(\d{5})-of-(\d{5})\.h5$")


class ClusterError(FeaturecacheError):
    """The cluster cannot be reached or started, or a shard failed."""


def shard_paths(output, count: int) -> list[Path]:
    """``OUTPUT.shards/part-IIIII-of-KKKKK.h5`` for every shard."""
    folder = Path(output).with_name(Path(output).name + ".shards")
    return [folder / f"part-{i:05d}-of-{count:05d}.h5" for i in range(count)]


@contextlib.contextmanager
def connect(address: str):
    """A ``distributed.Client`` for ``address``; a local cluster is started and closed here."""
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        raise ClusterError(f"{option('cluster', address)} needs Dask distributed: "
                           f"pip install 'featurecache[cluster]'.") from None
    cluster = None
    if address == "local" or address.startswith("local:"):
        n = address.partition(":")[2] or str(os.cpu_count() or 1)
        if not n.isdigit() or int(n) < 1:
            raise ClusterError(f"{option('cluster', address)}: give local:N with N >= 1 "
                               f"worker processes.")
        n = int(n)
        # worker processes that may start DataLoader decode processes of their own, with one
        # malloc arena from the start (the task threads' own arenas are slower: malloc.py)
        with dask.config.set({"distributed.worker.daemon": False,
                              "distributed.nanny.pre-spawn-environ.MALLOC_ARENA_MAX": 1}):
            cluster = LocalCluster(n_workers=n, processes=True, dashboard_address=None,
                                   threads_per_worker=max(1, (os.cpu_count() or 1) // n))
    elif address == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise ClusterError(f"{option('cluster', 'local-cuda')} needs dask-cuda: pip install "
                               f"dask-cuda (one worker per visible GPU).") from None
        cluster = LocalCUDACluster(dashboard_address=None)
    try:
        try:
            client = Client(cluster if cluster is not None else address,
                            timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {address} ({exc}). Start "
                               f"one (`dask scheduler`, then `dask worker {address}` on each "
                               f"machine), or use {option('cluster', 'local')}.") from None
        try:
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


@contextlib.contextmanager
def joblib_on(client, arrays=()):
    """Run joblib's parallel calls in this block on ``client``'s workers, with ``arrays``
    scattered to them once (not once per task)."""
    import joblib

    with joblib.parallel_backend("dask", client=client, scatter=list(arrays)):
        yield


def _workers(client) -> dict:
    """``{address: info}`` of every worker (recent versions list only a few by default)."""
    try:
        return client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:  # distributed before 2025
        return client.scheduler_info()["workers"]


def _existing_count(output) -> int | None:
    folder = Path(output).with_name(Path(output).name + ".shards")
    counts = {int(m.group(2)) for p in (folder.iterdir() if folder.is_dir() else ())
              if (m := _PART.match(p.name.replace(".partial", "")))}
    return counts.pop() if len(counts) == 1 else None


def embed_on_cluster(source, output, *, cluster: str, shards: int | None = None,
                     copy: bool = False, progress=True, overwrite: bool = False, **kw):
    """:func:`featurecache.embed` in shards on a Dask cluster, joined into ``output``.

    Takes embed's options (the backbone by name). Returns an
    :class:`~featurecache.embedding.EmbedResult` for the joined file.

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
    output = Path(output)
    if not isinstance(kw["backbone"], str):
        raise ClusterError("a clustered embed takes the backbone by name (workers load it).")
    say = _Say(progress is True)
    job = prepare(source, output, say=say, **kw)  # lists the data, loads the backbone
    # the whole data set's fingerprint, computed once: every shard's file records it
    src = dataclasses.replace(job.source, whole_fingerprint=job.source.fingerprint())
    n = len(job.records)
    layers = [s for s in job.specs if not s.is_map]
    maps = [s for s in job.specs if s.is_map]
    if output.exists() and not (output.is_file() and is_hdf5(output)):
        raise StoreMismatchError(f"{output} exists and is not a feature file; choose another "
                                 f"output (it is never replaced).")
    if output.exists() and not overwrite:
        ff = open_features(output)
        if not (ff.complete and ff.provenance.get("fingerprint") == fingerprint(job.meta)):
            raise StoreMismatchError(
                f"{output} exists and was made with other settings or is unfinished; use "
                f"another output path or {option('overwrite')} to start over.")
        say(f"{output} is complete; nothing to do.")
        return EmbedResult(output, ff.n_rows, len(ff.skipped()), n, time.perf_counter() - t0,
                           True, layers, job.source.ignored, maps)
    if shards is not None and shards > n:  # before any cluster is started
        raise ClusterError(f"{option('shards', shards)} is more shards than the {n:,} images; "
                           f"use at most {n:,}.")
    with connect(cluster) as client:
        workers = _workers(client)
        client.run(_tune_worker)  # before any task thread exists on a fresh worker
        count = shards or _existing_count(output) or min(n, 4 * max(1, len(workers)))
        parts = shard_paths(output, count)
        parts[0].parent.mkdir(exist_ok=True)
        if overwrite:
            _remove_parts(parts[0].parent)
        todo = [i for i in range(count) if not _complete(
            parts[i], fingerprint({**job.meta, "shard_index": i, "shard_count": count}))]
        say(f"{count} shards on {len(workers)} workers ({cluster}): {count - len(todo)} "
            f"complete, {len(todo)} to run; shard files in {parts[0].parent}")
        task_kw = {**kw, "backbone": job.backbone.name,
                   "layers": [s.name for s in layers],
                   "weights_file": os.path.abspath(kw["weights_file"]) if kw["weights_file"]
                   else None, "overwrite": False}
        gpu = any("GPU" in w.get("resources", {}) for w in workers.values())
        _run_shards(client, src, parts, todo, task_kw, gpu, progress, n)
    say(f"joining {count} shards into {output}{' (copy)' if copy else ''}")
    join_shards(parts, output, overwrite=True, copy=copy, rebuild=job.meta["rebuild"])
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


def _remove_parts(folder: Path) -> None:
    import shutil

    for p in folder.iterdir():
        if _PART.match(p.name.replace(".partial", "").replace(".lock", "")):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _run_shards(client, source, parts, todo, task_kw, gpu, progress, n_total) -> None:
    """Submit one task per shard in ``todo``; show one bar over all images; raise on the
    first failed shard, naming it."""
    from distributed import KilledWorker
    from tqdm.auto import tqdm

    from .data import shard_range

    count = len(parts)
    sizes = [b - a for a, b in (shard_range(len(source.records), i, count) for i in range(count))]
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
    torch.set_num_threads(threads)  # the worker's share of the machine, not all its cores
    if kw.get("num_workers") is None:
        kw = {**kw, "num_workers": decode_workers(threads, kw.get("device"))}
    worker.log_event(topic, (index, -1))
    last = [0.0]

    def report(done, total):
        now = time.monotonic()
        if now - last[0] >= REPORT_EVERY or done == total:
            last[0] = now
            worker.log_event(topic, (index, done))

    r = embed(part, path, progress=report, **kw)
    return r.n_rows
