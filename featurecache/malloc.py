"""glibc allocator settings for a process that runs many forward passes on the CPU.

Each batch's activations are large blocks (hundreds of KB to MB). With glibc's defaults they
are mapped with ``mmap`` and returned to the system when freed, so every batch faults its
memory in again; Dask's worker processes make it worse (their ``MALLOC_TRIM_THRESHOLD_=65536``
also switches off glibc's adaptive threshold). Keeping such blocks in the heap made the embed
1.35x faster on this project's 2-core CPU, and a clustered embed's workers 2.4x faster
(BENCHMARKS.md, "malloc"). Freed memory is kept for reuse (at most :data:`KEEP` bytes above
the top of the heap), so a process's resident size can stay higher after a run.

A forward pass run in a thread other than the main one (a Dask task) was 25-30% slower in
that thread's own malloc arena; ``tune(single_arena=True)`` makes later threads share the main
heap.

This changes the whole process, so featurecache applies it only where it owns the process:
the ``featurecache`` command and the tasks of a clustered embed (Dask worker processes). A
Python program can call :func:`tune` itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["tune", "KEEP", "MMAP_AT"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters
KEEP = 256 << 20      # freed memory kept at the top of the heap before it is trimmed
MMAP_AT = 32 << 20    # blocks from this size on are still mmapped (glibc's largest setting)


def tune(single_arena: bool = False) -> bool:
    """Apply the settings (glibc on Linux only); True when they were applied.

    ``single_arena``: threads made from now on share the main heap; for processes whose
    forward passes run in a worker thread (Dask tasks). Where the main thread runs them (the
    command) it costs 5-8% (the writer thread then contends for the one heap)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP)) and \
            bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_AT)) and \
            (not single_arena or bool(libc.mallopt(_M_ARENA_MAX, 1)))
    except (OSError, AttributeError):
        return False
