"""Keep freed tensor memory in the process instead of handing it back to the OS after every batch.

Why: glibc's malloc serves a large block (above its *mmap threshold*, 128 KiB at start, raised
dynamically) with a fresh ``mmap`` and unmaps it on ``free``; it also trims the top of a heap once
more than its *trim threshold* is free there. A packed DeiT-Base batch allocates and frees
activations of several MiB per layer (2,048 tokens × 3,072 hidden × bf16 = 12 MiB), so with the
defaults every batch page-faults its activations in again: the kernel zeroes each 4 KiB page on
first touch. Measured on a 2-core AMX Xeon: GELU over a fresh 12 MiB output took 8.8 ms instead of
1.0 ms, and the worker's packed bf16 forward ran 1.37–1.40× faster with the settings below
(``bench/heap.py``; docs/benchmarks.md).

The settings are glibc's documented ``mallopt`` parameters: large blocks up to 32 MiB (glibc's
maximum mmap threshold on 64-bit) come from the heap, freed memory stays there until 1 GiB is free
at the heap's top, and every thread allocates from the main arena (a per-thread arena unmaps a
heap as soon as it is empty, whatever the trim threshold: the worker's activations live on its
inference thread). Call it before other threads allocate: a thread keeps the arena it started
with. Cost: the process keeps its peak working set (one batch's activations) mapped, and threads
share one malloc lock (the worker's few threads allocate rarely; tensors are large). Where the C
library is not glibc, nothing changes and the reason says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import platform
from dataclasses import dataclass

# glibc <malloc.h> parameter numbers for mallopt(3).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024


@dataclass(frozen=True)
class HeapSettings:
    """What :func:`retain_freed_memory` did: ``applied`` and, either way, why."""

    applied: bool
    reason: str


def describe_support() -> str:
    """What :func:`retain_freed_memory` would do in this process, without doing it (for ``patchcast info``)."""
    libc_name, version = platform.libc_ver()
    if libc_name != "glibc":
        return f"left as it is (C library {libc_name or 'unknown'}, not glibc)"
    return (f"glibc {version}: the worker retains freed memory (blocks ≤ {MMAP_THRESHOLD_BYTES >> 20} MiB, "
            "one arena; worker.retain_heap)")


@functools.cache
def retain_freed_memory() -> HeapSettings:
    """Raise glibc's mmap and trim thresholds and use one arena (idempotent; the first call decides).

    Call it once at start-up of a process that runs model inference or training, before the first
    forward. It never raises: an unsupported C library is reported in the returned settings.
    """
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return HeapSettings(False, f"C library is {libc_name or 'unknown'}, not glibc: allocator left as it is")
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:
        return HeapSettings(False, f"glibc mallopt not reachable ({exc})")
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error (e.g. a value out of range).
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        return HeapSettings(False, "mallopt(M_MMAP_THRESHOLD) refused")
    if mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) != 1:
        return HeapSettings(False, "mallopt(M_TRIM_THRESHOLD) refused")
    # One arena: a thread's own arena gives a whole heap back to the OS as soon as it is empty,
    # whatever the trim threshold, and the worker allocates its activations on its inference thread.
    if mallopt(_M_ARENA_MAX, 1) != 1:
        return HeapSettings(False, "mallopt(M_ARENA_MAX) refused")
    return HeapSettings(True, f"glibc: blocks ≤ {MMAP_THRESHOLD_BYTES >> 20} MiB from the heap, "
                              f"trim above {TRIM_THRESHOLD_BYTES >> 30} GiB free, one arena")


GC_GEN0_THRESHOLD = 20_000  # allocations between young-generation collections (CPython's default: 700)


def settle_gc(gen0_threshold: int = GC_GEN0_THRESHOLD) -> tuple[int, int, int]:
    """For a long-lived service, once its start-up is over: collect, then move every object alive now
    (imports, the model, its modules) out of the cyclic collector's sight (:func:`gc.freeze`), and run
    young-generation collections every ``gen0_threshold`` allocations instead of 700. A request's
    objects are short-lived and freed by reference counting; the collector's passes over the long-lived
    heap were ~5 % of a worker's event-loop CPU per request (docs/benchmarks.md). Returns the previous
    thresholds."""
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(gen0_threshold, previous[1], previous[2])
    return previous
