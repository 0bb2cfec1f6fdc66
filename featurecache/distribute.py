"""Dask distributed, below both stages: a client for an address, and joblib's backend on it.

Nothing here knows what runs on the cluster. The sharded embed
(:mod:`featurecache.cluster`) and the head search (:func:`featurecache.heads.fit_heads`, whose
fits ``compare --cluster`` runs through :func:`joblib_on`) both stand on this module; it
imports neither. The caller chooses to distribute: the CLI and the pipeline pass a
``cluster`` address, and nothing below them opens a client on its own.

Addresses: ``local`` (one worker process per core), ``local:N``, ``local-cuda`` (dask-cuda's
``LocalCUDACluster``: one worker per visible GPU) or a scheduler address
(``tcp://host:8786``). Dask is imported only inside these functions (and the sharded embed's),
never when featurecache is imported.
"""

from __future__ import annotations

import contextlib
import os

from .errors import FeaturecacheError, option

__all__ = ["ClusterError", "connect", "check_address", "joblib_on", "workers", "CONNECT_TIMEOUT"]

CONNECT_TIMEOUT = "5s"


class ClusterError(FeaturecacheError):
    """The cluster cannot be reached or started, or a shard failed."""


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
    else:
        check_address(address)
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


def check_address(address: str) -> None:
    """Refuse a scheduler address Dask cannot parse before a Client is made (a Client that
    fails on it prints a traceback from its ``__del__`` at exit, after a 10 s timeout)."""
    if address in ("local", "local-cuda") or address.startswith("local:"):
        return
    try:
        from distributed.comm.addressing import parse_address, parse_host_port
    except ImportError:
        return  # connect() says how to install Dask
    try:
        scheme, location = parse_address(address)
        if scheme in ("tcp", "tls", "ws", "wss", "ucx"):
            parse_host_port(location)
    except ValueError as exc:
        raise ClusterError(f"{option('cluster', address)} is not a cluster address ({exc}); "
                           f"give local, local:N, local-cuda or a scheduler address such as "
                           f"tcp://HOST:8786.") from None


@contextlib.contextmanager
def joblib_on(client, arrays=()):
    """Run joblib's parallel calls in this block on ``client``'s workers, with ``arrays``
    scattered to them once (not once per task)."""
    import joblib

    with joblib.parallel_backend("dask", client=client, scatter=list(arrays)):
        yield


def workers(client) -> dict:
    """``{address: info}`` of every worker (recent versions list only a few by default)."""
    try:
        return client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:  # distributed before 2025
        return client.scheduler_info()["workers"]
