"""The server engine in a process of its own (``worker.engine_process``; on by default for a GPU).

Why: on a GPU the forward is bound by the host issuing it, hundreds of small torch calls per batch,
and each call releases and re-takes the GIL. Inside the worker's process the event loop (MQTT,
validation, replies) holds the GIL much of the time at several hundred requests per second, and a
re-take may wait for it. Through the broker on an H100 host, one worker served 965–1,000 replies/s
with the engine in its own process against 842–967 in the worker's (docs/benchmarks.md). On a CPU
the forward is long matrix products with few calls, so the engine stays in the worker (no copies).

Shape: :class:`EngineProcess` has :class:`~inference_worker.engine.ServerEngine`'s interface. Each
call writes the batch's uint8 patches into one shared-memory block sized for the largest batch the
caps allow and sends the layout (patches per set, their grid indices) over a pipe; the child runs
``ServerEngine.logits_checked`` on views of the block and sends the logits back. One batch at a time,
as the batcher runs them. The pipe only ever carries this project's own messages between a parent
and the child it started (requests from the wire never cross it as bytes to unpickle: they were
validated and decoded to pixel arrays in the worker).

:class:`SharedEngine` is the same child serving several worker processes (``worker.frontends``,
:mod:`inference_worker.frontends`), each through its own pipe and block (:class:`EngineClient`): the
batches that are waiting together run as one forward, and each worker gets its own rows back.

Failure: a batch whose forward fails comes back as that batch's :class:`InferenceError`. If the child
dies (killed, out of memory, a crash in a kernel), the batch in flight fails and the next batch
starts a new child, at most ``MAX_RESTARTS`` times per ``RESTART_WINDOW_S``; past that every batch
fails until the window has passed, so a crash loop cannot spin. A batch that takes longer than
``batch_timeout_s`` fails and the child is replaced. A shared engine is not restarted: the process
that owns it stops its workers when it dies, for the supervisor above to start the group again.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing
import multiprocessing.connection
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from multiprocessing.shared_memory import SharedMemory
from typing import Any, cast

import numpy as np
import torch

from inference_worker.decoders import ignore_stop_signals
from inference_worker.engine import PatchSet, ServerEngine, configure_threads
from shared.config import BatchingConfig
from shared.errors import InferenceError, ModelError, PatchCastError
from shared.logs import get_logger
from shared.models import LoadedModel
from shared.precision import resolve

MAX_RESTARTS = 3
RESTART_WINDOW_S = 60.0
_log = get_logger("patchcast.worker.engine")


def _child_main(conns: list[multiprocessing.connection.Connection], loaded: LoadedModel,
                batching: BatchingConfig, precision_setting: str, device: str, prepack: bool, threads: int,
                blocks: list[str]) -> None:
    """The engine process: build the engine, say ``ready`` (or why not) on every connection, then serve
    batches until every connection has closed or said ``stop``. Each connection is one worker process
    with its own shared-memory block; batches that are waiting together run as one forward."""
    ignore_stop_signals()  # the worker stops this process once it has drained (close)
    configure_threads(threads)
    try:
        engine = ServerEngine(loaded, batching, resolve(precision_setting, device), prepack=prepack,
                              device=device)
    except PatchCastError as exc:
        for conn in conns:
            conn.send(("failed", exc.code, exc.message))
        return
    except Exception as exc:  # a broken model must reach the parent as a message, not a traceback
        for conn in conns:
            conn.send(("failed", "model", f"{type(exc).__name__}: {exc}"))
        return
    live = {conn: SharedMemory(name=block) for conn, block in zip(conns, blocks, strict=True)}
    try:
        for conn in conns:
            conn.send(("ready", {"precision": engine.precision, "attention": engine.attention,
                                 "device": str(engine.device), "prepacked": engine.prepacked,
                                 "maps": engine.maps_available}))
        while live:
            jobs = []
            for ready in multiprocessing.connection.wait(list(live)):
                conn = cast(multiprocessing.connection.Connection, ready)
                try:
                    message = conn.recv()
                except EOFError:  # that worker is gone
                    message = ("stop",)
                if message[0] != "batch":
                    live.pop(conn).close()
                    continue
                jobs.append((conn, message[1], message[2], len(message) > 3 and bool(message[3])))
            if jobs:
                _serve(engine, [(conn, live[conn], counts, indices, maps) for conn, counts, indices, maps in jobs])
    finally:
        for shm in live.values():
            shm.close()


def _serve(engine: ServerEngine, jobs: list[tuple[Any, SharedMemory, np.ndarray, np.ndarray, bool]]) -> None:
    """One forward over every waiting batch; each connection gets its own rows (or its error), and
    the CLS attention of its sets (concatenated, float32) when it asked for them."""
    p = engine.patch_size
    answers: dict[Any, tuple[Any, ...]] = {}
    parts: list[tuple[Any, list[PatchSet], bool]] = []
    for conn, shm, counts, indices, wants_maps in jobs:
        try:
            pixels = np.ndarray((int(counts.sum()), p, p, 3), dtype=np.uint8, buffer=shm.buf)
            bounds = np.concatenate([[0], np.cumsum(counts)])
            parts.append((conn, [PatchSet(pixels[a:b], indices[a:b]) for a, b in itertools.pairwise(bounds)],
                          wants_maps))
        except Exception as exc:  # a malformed layout: this batch's error, not the process's end
            answers[conn] = ("error", "inference", f"batch layout: {type(exc).__name__}: {exc}")
    merged = [s for _, sets, _ in parts for s in sets]
    maps: list[np.ndarray] | None = [] if any(wants for _, _, wants in parts) else None
    try:
        logits = engine.logits_checked(merged, maps).numpy() if merged else None
        row = 0
        for conn, sets, wants_maps in parts:
            flat = np.concatenate(maps[row:row + len(sets)]) if wants_maps and maps is not None else None
            answers[conn] = ("logits", logits[row:row + len(sets)], len(parts), flat)  # type: ignore[index]
            row += len(sets)
    except InferenceError as exc:
        for conn, _, _ in parts:
            answers[conn] = ("error", exc.code, exc.message)
    parts.clear()
    merged.clear()  # no view may outlive its block
    for conn, answer in answers.items():
        with contextlib.suppress(OSError):  # that worker died during the batch
            conn.send(answer)


def batch_capacity(loaded: LoadedModel, batching: BatchingConfig) -> int:
    """Patches in the largest batch: the token cap (each set also has a CLS token, so its patches fit),
    or one whole image when a single request alone exceeds the cap."""
    return max(batching.max_tokens, loaded.num_patches)


def _read_ready(conn: multiprocessing.connection.Connection, timeout_s: float, exitcode: Any) -> dict[str, Any]:
    """The child's first message: its engine's settings, or why it could not build one (ModelError)."""
    if not conn.poll(timeout_s):
        raise ModelError(f"engine process did not start within {timeout_s:.0f} s")
    try:
        message = conn.recv()
    except EOFError as exc:
        raise ModelError(f"engine process exited while starting (exit code {exitcode()})") from exc
    if message[0] != "ready":
        raise ModelError(f"engine process could not build the model: {message[2]}")
    return dict(message[1])


class _EngineLink(ABC):
    """The worker's side of an engine in another process: one shared-memory block and one pipe.
    :class:`ServerEngine`'s interface (``logits_checked``, geometry, settings, ``close``)."""

    batch_timeout_s: float
    _block: SharedMemory | None

    def _init_common(self, loaded: LoadedModel, batching: BatchingConfig, batch_timeout_s: float) -> None:
        self.loaded = loaded
        self.batching = batching
        self.patch_size = loaded.patch_size
        self.num_patches = loaded.num_patches
        self.input_size = loaded.preprocess.input_size
        self.capacity = batch_capacity(loaded, batching)
        self.batch_timeout_s = batch_timeout_s
        self.restarts = 0  # children started after the first (for metrics, logs and tests)
        self.last_merged = 0  # how many workers' batches the last forward served (a shared engine: > 1)

    def _settings_from(self, info: dict[str, Any]) -> None:
        self.precision: str = info["precision"]
        self.attention: str = info["attention"]
        self.device = torch.device(info["device"])
        self.prepacked: bool = info["prepacked"]
        self.maps_available: bool = info["maps"]

    @abstractmethod
    def _connection(self) -> multiprocessing.connection.Connection:
        """The pipe to the engine (an engine process of our own starts its child here when needed)."""

    def _lost(self, reason: str) -> InferenceError:
        """The engine stopped answering (died or timed out): forget it; the error for the batch."""
        return InferenceError(reason)

    def logits(self, sets: Sequence[PatchSet], cls_attention: list[np.ndarray] | None = None) -> torch.Tensor:
        return self.logits_checked(sets, cls_attention)

    def logits_checked(self, sets: Sequence[PatchSet], cls_attention: list[np.ndarray] | None = None
                       ) -> torch.Tensor:
        """Float32 logits (B, C) for B patch sets, in input order; any failure as :class:`InferenceError`.
        ``cls_attention``: as :meth:`ServerEngine.logits`."""
        if not sets:
            return torch.zeros(0, self.loaded.num_classes)
        counts = np.fromiter((s.patches.shape[0] for s in sets), dtype=np.int64, count=len(sets))
        total = int(counts.sum())
        if total > self.capacity:
            raise InferenceError(f"batch of {total} patches exceeds the engine's {self.capacity}")
        conn = self._connection()
        if self._block is None:
            raise InferenceError("engine process is closed")
        view = np.ndarray((total, self.patch_size, self.patch_size, 3), dtype=np.uint8, buffer=self._block.buf)
        np.concatenate([s.patches for s in sets], axis=0, out=view)
        del view
        indices = np.concatenate([s.indices for s in sets]).astype(np.int64, copy=False)
        try:
            conn.send(("batch", counts, indices, cls_attention is not None))
            if not conn.poll(self.batch_timeout_s):
                raise self._lost(f"engine process took over {self.batch_timeout_s:.0f} s on a batch of "
                                 f"{len(sets)}; replaced")
            message = conn.recv()
        except (EOFError, OSError) as exc:
            raise self._lost(f"engine process died during a batch of {len(sets)}") from exc
        if message[0] == "error":
            raise InferenceError(message[2])
        logits = torch.from_numpy(message[1])
        self.last_merged = int(message[2])
        if logits.shape != (len(sets), self.loaded.num_classes):
            raise InferenceError(f"engine process returned logits of shape {tuple(logits.shape)}")
        if cls_attention is not None:
            flat = message[3]
            if flat is None or flat.shape != (total,):
                raise InferenceError("engine process returned no attention maps for this batch")
            cls_attention.extend(np.split(flat, np.cumsum(counts)[:-1]))
        return logits


class EngineClient(_EngineLink):
    """One worker process's link to a :class:`SharedEngine` (``worker.frontends`` > 1). No restarts: the
    process that owns the shared engine stops every worker when it dies."""

    def __init__(self, loaded: LoadedModel, batching: BatchingConfig, conn: multiprocessing.connection.Connection,
                 block: str, info: dict[str, Any], *, batch_timeout_s: float = 120.0) -> None:
        self._init_common(loaded, batching, batch_timeout_s)
        self._conn: multiprocessing.connection.Connection | None = conn
        self._block = SharedMemory(name=block)
        self.block_name = block
        self._settings_from(info)

    def _connection(self) -> multiprocessing.connection.Connection:
        if self._conn is None:
            raise InferenceError("the shared engine is gone")
        return self._conn

    def _lost(self, reason: str) -> InferenceError:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        return InferenceError(reason.replace("; replaced", ""))

    def close(self) -> None:
        """Say goodbye to the shared engine and let go of this worker's block (its owner frees it)."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(("stop",))
            self._conn.close()
            self._conn = None
        if self._block is not None:
            self._block.close()
            self._block = None


class SharedEngine:
    """One engine process serving ``clients`` worker processes (``worker.frontends``): each gets a pipe and
    a shared-memory block (:attr:`endpoints`, for :class:`EngineClient`); batches that wait together run
    as one forward, so the GPU sees one large batch instead of several small ones."""

    def __init__(self, loaded: LoadedModel, batching: BatchingConfig, precision: str = "auto", *, clients: int,
                 prepack: bool = False, device: str = "cpu", threads: int = 1, start_timeout_s: float = 300.0) -> None:
        size = batch_capacity(loaded, batching) * loaded.patch_size * loaded.patch_size * 3
        self._blocks = [SharedMemory(create=True, size=size) for _ in range(clients)]
        ctx = torch.multiprocessing.get_context("spawn")
        pipes = [ctx.Pipe() for _ in range(clients)]
        self._proc: Any = ctx.Process(
            target=_child_main, name="patchcast-engine", daemon=True,
            args=([child for _, child in pipes], loaded, batching, precision, device, prepack, threads,
                  [b.name for b in self._blocks]))
        self._proc.start()
        for _, child in pipes:
            child.close()
        self.endpoints = [(parent, block.name) for (parent, _), block in zip(pipes, self._blocks, strict=True)]
        try:
            infos = [_read_ready(conn, start_timeout_s, lambda: self._proc.exitcode) for conn, _ in self.endpoints]
        except BaseException:
            self.close(0)
            raise
        self.info = infos[0]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return bool(self._proc is not None and self._proc.is_alive())

    @property
    def sentinel(self) -> int:
        """Ready (for ``multiprocessing.connection.wait``) once the engine process has ended."""
        return int(self._proc.sentinel)

    def release_endpoints(self) -> None:
        """This process's copies of the pipes, once the workers hold theirs: a worker that dies must
        close its connection for the engine to notice."""
        for conn, _ in self.endpoints:
            conn.close()

    def close(self, timeout_s: float = 10.0) -> None:
        """Wait for the engine to end (it does once every worker has left), kill it after ``timeout_s``,
        free the blocks."""
        if self._proc is not None:
            self._proc.join(timeout_s)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(10)
            self._proc = None
        for conn, _ in self.endpoints:
            conn.close()
        for block in self._blocks:
            block.close()
            with contextlib.suppress(FileNotFoundError):
                block.unlink()
        self._blocks = []


class EngineProcess(_EngineLink):
    """:class:`ServerEngine` in a child process of this worker alone, restarted when it dies."""

    def __init__(self, loaded: LoadedModel, batching: BatchingConfig, precision: str = "auto", *,
                 prepack: bool = False, device: str = "cpu", threads: int = 1,
                 start_timeout_s: float = 300.0, batch_timeout_s: float = 120.0) -> None:
        self._init_common(loaded, batching, batch_timeout_s)
        self._settings = (precision, device, prepack, threads)
        self.start_timeout_s = start_timeout_s
        self._block = SharedMemory(create=True, size=self.capacity * self.patch_size * self.patch_size * 3)
        self.block_name = self._block.name
        self._restarts: collections.deque[float] = collections.deque()
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        try:
            info = self._start()
        except BaseException:
            self.close()
            raise
        self._settings_from(info)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> dict[str, Any]:
        precision, device, prepack, threads = self._settings
        # spawn: a fork of a process with threads (and perhaps CUDA) is not safe; torch's reductions
        # hand the model's weights over through shared memory instead of copying them.
        ctx = torch.multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child_main, name="patchcast-engine", daemon=True,
                           args=([child], self.loaded, self.batching, precision, device, prepack, threads,
                                 [self.block_name]))
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        try:
            return _read_ready(parent, self.start_timeout_s, lambda: proc.exitcode)
        except ModelError:
            self._kill()
            raise

    def _kill(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(10)
            self._proc = None

    def _lost(self, reason: str) -> InferenceError:
        code = self._proc.exitcode if self._proc is not None else None
        self._kill()
        return InferenceError(reason if "took over" in reason else f"{reason} (exit code {code})")

    def _connection(self) -> multiprocessing.connection.Connection:
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            return self._conn
        self._kill()
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        if len(self._restarts) >= MAX_RESTARTS:
            raise InferenceError(f"engine process failed {MAX_RESTARTS} times within {RESTART_WINDOW_S:.0f} s; "
                                 "not restarting it yet")
        self._restarts.append(now)
        self.restarts += 1
        _log.warning("engine_process_restarting", restarts=self.restarts)
        try:
            self._start()
        except ModelError as exc:
            raise InferenceError(f"engine process could not be restarted: {exc.message}") from exc
        return self._conn  # type: ignore[return-value]

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the child (asked, then killed after ``timeout_s``) and free the shared block."""
        if self._conn is not None and self._proc is not None:
            with contextlib.suppress(OSError):
                self._conn.send(("stop",))
            self._proc.join(timeout_s)
        self._kill()
        if self._block is not None:
            self._block.close()
            self._block.unlink()
            self._block = None
