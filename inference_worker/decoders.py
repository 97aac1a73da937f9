"""Where a worker decodes patch payloads to pixels: threads, or child processes (``worker.decode_processes``).

Processes are for a busy worker, a GPU one above all: a decoder thread shares the GIL with the event
loop, and every Pillow or numpy call that releases it waits to take it back while the loop runs
(docs/benchmarks.md). A decoder process watches its parent and exits when the worker is gone: a
worker killed with SIGKILL cannot shut its pool down, and a pool process waits on a queue whose both
ends it holds itself, so it would never see an end of file and would live on as an orphan.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

from shared.config import WorkerConfig

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
    return ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="decode")
