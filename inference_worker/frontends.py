"""Several worker processes sharing one engine process (``worker.frontends`` > 1).

One worker process tops out near 1,000 requests/s on its event loop (MQTT handling, validation,
replies in pure Python; docs/benchmarks.md), far below what a GPU serves. Several independent
worker processes per GPU split the stream into small batches, and a GPU is slow on small batches.
Here ``frontends`` worker processes (each a full :class:`~inference_worker.service.InferenceWorker`
with its own MQTT client, worker id ``<id>-f<i>``, queue and batcher) share one
:class:`~inference_worker.engine_process.SharedEngine`, which runs the batches that wait together
as one forward.

This process supervises them and holds no MQTT client itself. SIGTERM/SIGINT: each worker drains and
leaves (they also get the signal directly when it went to the process group); then the engine stops.
They live and die together: if a worker or the engine ends unexpectedly, the rest are stopped and the
command exits 1, for the supervisor above (``patchcast workers``, compose, systemd) to restart.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from inference_worker.engine_process import EngineClient, SharedEngine
from shared.config import Config
from shared.logs import configure, get_logger
from shared.models import LoadedModel
from shared.naming import default_worker_id

_POLL_S = 0.5
_EXTRA_JOIN_S = 30.0  # beyond the workers' own shutdown grace


def _frontend_main(config: Config, server: LoadedModel, conn: multiprocessing.connection.Connection, block: str,
                   info: dict[str, Any], worker_id: str, supervisor: int) -> None:
    """One worker process: an InferenceWorker whose engine is this process's link to the shared engine."""
    from inference_worker.service import run_worker

    configure(config.logging.format, config.logging.level)
    _stop_when_orphaned(supervisor)  # its pid from the supervisor: it may have died while this one started
    engine = EngineClient(server, config.batching, conn, block, info)
    asyncio.run(run_worker(config, server=server, worker_id=worker_id, engine=engine))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # drained and stopped: a late second SIGTERM changes nothing


def _stop_when_orphaned(parent: int) -> None:
    """If the supervising process dies (SIGKILL), stop this worker the graceful way: drain, then leave."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_frontends(config: Config, server: LoadedModel | None = None) -> int:
    """Start the shared engine and ``worker.frontends`` worker processes; supervise until a stop signal
    (exit 0 once all have drained) or until one of them ends unexpectedly (exit 1)."""
    stop_requested = False

    def request_stop(*_: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    # From the start: a stop while the engine and the workers start must stop them, not orphan them.
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _supervise(config, server, lambda: stop_requested)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(config: Config, server: LoadedModel | None, stop_requested: Callable[[], bool]) -> int:
    from inference_worker.service import load_server

    log = get_logger("patchcast.worker.frontends")
    w = config.worker
    server = server or load_server(config)
    base = w.worker_id or default_worker_id()
    engine = SharedEngine(server, config.batching, w.precision, clients=w.frontends, prepack=w.prepack_weights,
                          device=w.device, threads=w.threads)
    ctx = torch.multiprocessing.get_context("spawn")  # the model's weights travel as shared memory
    workers = [ctx.Process(target=_frontend_main, name=f"patchcast-frontend-{i}",
                           args=(config, server, conn, block, engine.info, f"{base}-f{i}", os.getpid()))
               for i, (conn, block) in enumerate(engine.endpoints, 1)]
    for proc in workers:
        proc.start()
    engine.release_endpoints()
    log.info("frontends_started", frontends=len(workers), engine_pid=engine.pid,
             worker_ids=[f"{base}-f{i}" for i in range(1, len(workers) + 1)])

    failed = False
    stopping_since: float | None = None
    try:
        while any(p.is_alive() for p in workers):
            multiprocessing.connection.wait([p.sentinel for p in workers if p.is_alive()] + [engine.sentinel],
                                            timeout=_POLL_S)
            if stopping_since is None:
                # A stop signal first: with one sent to the whole group the workers may already be leaving.
                ended = [] if stop_requested() else [p for p in workers if not p.is_alive()]
                engine_gone = not stop_requested() and not engine.alive()
                if ended or engine_gone:  # nobody asked: stop the rest, and say so in the exit code
                    failed = True
                    log.error("frontend_group_failed", workers_ended={p.name: p.exitcode for p in ended},
                              engine_ended=engine_gone)
                if failed or stop_requested():
                    stopping_since = time.monotonic()
                    for proc in workers:
                        if proc.is_alive():
                            proc.terminate()  # SIGTERM: drain and leave
            elif time.monotonic() - stopping_since > w.shutdown_grace_s + _EXTRA_JOIN_S:
                for proc in workers:
                    if proc.is_alive():
                        proc.kill()
                        failed = True
    finally:
        for proc in workers:
            proc.join(10)
        engine.close()
    # After a stop signal a worker may also end by SIGTERM: a second one (the group's and ours) that
    # arrives once it has drained and removed its handler. Nothing is lost then.
    clean = (0, -signal.SIGTERM) if stop_requested() else (0,)
    failed = failed or any(p.exitcode not in clean for p in workers)
    log.info("frontends_stopped", exit_codes={p.name: p.exitcode for p in workers}, failed=failed)
    return 1 if failed else 0

