"""Where a worker decodes patch payloads to pixels: threads, or child processes (``worker.decode_processes``).

Processes are for a busy worker, a GPU one above all: a decoder thread shares the GIL with the event
loop, and every Pillow or numpy call that releases it waits to take it back while the loop runs
(docs/benchmarks.md). A decoder process watches its parent and exits when the worker is gone: a
worker killed with SIGKILL cannot shut its pool down, and a pool process waits on a queue whose both
ends it holds itself, so it would never see an end of file and would live on as an orphan.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any, TypeVar

from shared.config import WorkerConfig

T = TypeVar("T")

PARENT_CHECK_S = 1.0


def ignore_stop_signals() -> None:
    """For a worker's child process: Ctrl-C in a terminal and a service manager's SIGTERM reach the whole
    process group, but only the worker decides when its children stop (after it has drained its queue)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def watch_parent(parent: int) -> None:
    """Initializer of each decoder process: ignore stop signals (:func:`ignore_stop_signals`) and leave as
    soon as ``parent`` is no longer this process's parent."""
    ignore_stop_signals()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def new_decoder(config: WorkerConfig) -> Executor:
    """``decode_processes`` child processes (spawned: forking a process that runs threads is unsafe;
    they start on first use), else ``decode_threads`` threads."""
    if config.decode_processes:
        return ProcessPoolExecutor(max_workers=config.decode_processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=watch_parent, initargs=(os.getpid(),))
    return DecodeThreads(config.decode_threads)


class DecodeThreads(Executor):
    """``count`` decoder threads on one queue: a submit is a future and a put.

    ``ThreadPoolExecutor.submit`` also takes two locks and, to decide whether to start a thread, a
    semaphore built on a condition: ~5 % of a busy worker's event loop, per request (docs/benchmarks.md).
    The threads start at once and are daemons: a decode holds nothing that must outlive the process.
    """

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("a decoder needs at least one thread")
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue())
        self._closed = False
        self._threads = [threading.Thread(target=self._serve, name=f"decode_{i}", daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future: Future[T] = Future()
        self._queue.put((future, functools.partial(fn, **kwargs) if kwargs else fn, args))
        return future

    def _serve(self) -> None:
        get = self._queue.get
        while (work := get()) is not None:
            future, fn, args = work
            del work
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # the future carries it, as a pool's would
                future.set_exception(exc)
            else:
                future.set_result(result)
                del result
            del future, fn, args  # nothing of the last request stays referenced while the thread waits

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    work = self._queue.get_nowait()
                except queue.Empty:
                    break
                if work is not None:
                    work[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()
