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
from concurrent.futures import CancelledError, Executor, Future, ProcessPoolExecutor
from typing import Any, Generic, Protocol, TypeVar, cast

from shared.config import WorkerConfig

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

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


def new_decoder(config: WorkerConfig) -> Executor | DecodeInBatch:
    """``decode_processes`` child processes (spawned: forking a process that runs threads is unsafe;
    they start on first use), else ``decode_threads`` threads, or none (``0``, ``auto`` on a CPU): the
    batch's own thread (:class:`DecodeInBatch`)."""
    if config.decode_processes:
        return ProcessPoolExecutor(max_workers=config.decode_processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=watch_parent, initargs=(os.getpid(),))
    if config.decoder_threads == 0:
        return DecodeInBatch()
    return DecodeThreads(config.decoder_threads)


class Pending(Protocol[T_co]):
    """A request's pixels on their way: a thread's or a process's ``Future``, or a :class:`Deferred`."""

    def result(self, timeout: float | None = None) -> T_co: ...

    def cancel(self) -> bool: ...


class Deferred(Generic[T]):
    """A decode not started yet: it runs on the thread that first asks for its :meth:`result` (the
    inference thread, as it assembles the batch), once; its outcome, value or exception, is then kept.

    Cheaper than a ``Future`` handed to a thread: no condition, no lock, no queue, no thread to wake (a
    ``Future``'s ``__init__`` alone builds a ``Condition``). Used from one thread at a time: the event loop
    makes it, the inference thread resolves it; :meth:`cancel` (the batcher refused its request before
    it was queued) only marks it."""

    __slots__ = ("_args", "_cancelled", "_error", "_fn", "_ran", "_value")

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...]) -> None:
        self._fn: Callable[..., T] | None = fn
        self._args = args
        self._ran = False
        self._cancelled = False
        self._value: T | None = None
        self._error: BaseException | None = None

    def result(self, timeout: float | None = None) -> T:
        """The decoded value, decoding it now on the first call (``timeout`` does not apply: the caller's
        own thread decodes); raises what the decode raised, or :class:`CancelledError`."""
        if self._cancelled:
            raise CancelledError()
        if not self._ran:
            fn, args = self._fn, self._args
            self._fn, self._args, self._ran = None, (), True  # nothing of the request kept once decoded
            try:
                assert fn is not None
                self._value = fn(*args)
            except BaseException as exc:  # the caller sees it, as a thread's future would show it
                self._error = exc
        if self._error is not None:
            raise self._error
        return cast(T, self._value)

    def cancel(self) -> bool:
        if self._ran:
            return False
        self._cancelled, self._fn, self._args = True, None, ()
        return True

    def __repr__(self) -> str:
        state = "cancelled" if self._cancelled else "done" if self._ran else "pending"
        return f"<Deferred {state}>"


class DecodeInBatch:
    """``decode_threads = 0`` (``auto`` on a CPU): no decoder thread; each request's pixels decode on the
    inference thread when its batch is assembled (:class:`Deferred`). For a worker whose model shares
    its core with everything else: there the hand-off to a decoder thread, its wake-up and its ``Future``
    cost more CPU than the overlap wins (docs/benchmarks.md). A GPU worker keeps a thread by default:
    there the decode overlaps the GPU's forward."""

    def __init__(self) -> None:
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: Any) -> Deferred[T]:
        if self._closed:
            raise RuntimeError("cannot schedule new decodes after shutdown")
        return Deferred(fn, args)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True


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
