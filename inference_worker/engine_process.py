"""The server engine in a process of its own (``worker.engine_process``; on by default for a GPU).

Why: on a GPU the forward is bound by the host issuing it, hundreds of small torch calls per batch,
and each call releases and re-takes the GIL. Inside the worker's process the event loop (MQTT,
validation, replies) and the pixel decoder hold the GIL most of the time at a few hundred requests
per second, and every re-take waits for them: on an H100 the same batches ran ~10× slower in the
worker than alone (docs/benchmarks.md). In its own process the engine has a GIL to itself. On a CPU
the forward is long matrix products with few calls, so the engine stays in the worker (no copies).

Shape: :class:`EngineProcess` has :class:`~inference_worker.engine.ServerEngine`'s interface. Each
call writes the batch's uint8 patches into one shared-memory block sized for the largest batch the
caps allow and sends the layout (patches per set, their grid indices) over a pipe; the child runs
``ServerEngine.logits_checked`` on views of the block and sends the logits back. One batch at a time,
as the batcher runs them. The pipe only ever carries this project's own messages between a parent
and the child it started (requests from the wire never cross it as bytes to unpickle: they were
validated and decoded to pixel arrays in the worker).

Failure: a batch whose forward fails comes back as that batch's :class:`InferenceError`. If the child
dies (killed, out of memory, a crash in a kernel), the batch in flight fails and the next batch
starts a new child, at most ``MAX_RESTARTS`` times per ``RESTART_WINDOW_S``; past that every batch
fails until the window has passed, so a crash loop cannot spin. A batch that takes longer than
``batch_timeout_s`` fails and the child is replaced.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Sequence
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import torch

from inference_worker.decoders import ignore_stop_signals
from inference_worker.engine import PatchSet, ServerEngine, configure_threads, resolve_precision
from shared.config import BatchingConfig
from shared.errors import InferenceError, ModelError, PatchCastError
from shared.logs import get_logger
from shared.models import LoadedModel

MAX_RESTARTS = 3
RESTART_WINDOW_S = 60.0
_log = get_logger("patchcast.worker.engine")


def _child_main(conn: multiprocessing.connection.Connection, loaded: LoadedModel, batching: BatchingConfig,
                precision_setting: str, device: str, prepack: bool, threads: int, block: str) -> None:
    """The engine process: build the engine, say ``ready`` (or why not), then serve batches until the
    pipe closes or ``stop`` arrives."""
    ignore_stop_signals()  # the worker stops this process once it has drained (close)
    configure_threads(threads)
    try:
        engine = ServerEngine(loaded, batching, resolve_precision(precision_setting, device), prepack=prepack,
                              device=device)
    except PatchCastError as exc:
        conn.send(("failed", exc.code, exc.message))
        return
    except Exception as exc:  # a broken model must reach the parent as a message, not a traceback
        conn.send(("failed", "model", f"{type(exc).__name__}: {exc}"))
        return
    shm = SharedMemory(name=block)
    try:
        conn.send(("ready", {"precision": engine.precision, "attention": engine.attention,
                             "device": str(engine.device), "prepacked": engine.prepacked}))
        p = engine.patch_size
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the worker is gone
                return
            if message[0] != "batch":
                return
            _, counts, indices = message
            pixels = np.ndarray((int(counts.sum()), p, p, 3), dtype=np.uint8, buffer=shm.buf)
            try:
                bounds = np.concatenate([[0], np.cumsum(counts)])
                sets = [PatchSet(pixels[a:b], indices[a:b]) for a, b in itertools.pairwise(bounds)]
                answer: tuple[Any, ...] = ("logits", engine.logits_checked(sets).numpy())
            except InferenceError as exc:
                answer = ("error", exc.code, exc.message)
            except Exception as exc:  # a malformed layout: this batch's error, not the process's end
                answer = ("error", "inference", f"batch layout: {type(exc).__name__}: {exc}")
            sets = []
            del pixels  # no view may outlive the block
            try:
                conn.send(answer)
            except OSError:  # the worker died during the batch
                return
    finally:
        shm.close()


class EngineProcess:
    """:class:`ServerEngine` in a child process, with the same interface for the worker."""

    def __init__(self, loaded: LoadedModel, batching: BatchingConfig, precision: str = "auto", *,
                 prepack: bool = False, device: str = "cpu", threads: int = 1,
                 start_timeout_s: float = 300.0, batch_timeout_s: float = 120.0) -> None:
        self.loaded = loaded
        self.batching = batching
        self.patch_size = loaded.patch_size
        self.num_patches = loaded.num_patches
        self.input_size = loaded.preprocess.input_size
        self._settings = (precision, device, prepack, threads)
        self.start_timeout_s = start_timeout_s
        self.batch_timeout_s = batch_timeout_s
        # The largest batch: the token cap (each set also has a CLS token, so its patches fit), or one
        # whole image when a single request alone exceeds the cap.
        self.capacity = max(batching.max_tokens, self.num_patches)
        self._patch_bytes = self.patch_size * self.patch_size * 3
        self._block: SharedMemory | None = SharedMemory(create=True, size=self.capacity * self._patch_bytes)
        self.block_name = self._block.name
        self._restarts: collections.deque[float] = collections.deque()
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self.restarts = 0  # children started after the first (for logs and tests)
        try:
            info = self._start()
        except BaseException:
            self.close()
            raise
        self.precision: str = info["precision"]
        self.attention: str = info["attention"]
        self.device = torch.device(info["device"])
        self.prepacked: bool = info["prepacked"]

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
                           args=(child, self.loaded, self.batching, precision, device, prepack, threads,
                                 self.block_name))
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        if not parent.poll(self.start_timeout_s):
            self._kill()
            raise ModelError(f"engine process did not start within {self.start_timeout_s:.0f} s")
        try:
            message = parent.recv()
        except EOFError as exc:
            self._kill()
            raise ModelError(f"engine process exited while starting (exit code {proc.exitcode})") from exc
        if message[0] != "ready":
            self._kill()
            raise ModelError(f"engine process could not build the model: {message[2]}")
        return dict(message[1])

    def _kill(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(10)
            self._proc = None

    def _ensure_running(self) -> multiprocessing.connection.Connection:
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

    def logits(self, sets: Sequence[PatchSet]) -> torch.Tensor:
        return self.logits_checked(sets)

    def logits_checked(self, sets: Sequence[PatchSet]) -> torch.Tensor:
        """Float32 logits (B, C) for B patch sets, in input order; any failure as :class:`InferenceError`."""
        if not sets:
            return torch.zeros(0, self.loaded.num_classes)
        counts = np.fromiter((s.patches.shape[0] for s in sets), dtype=np.int64, count=len(sets))
        total = int(counts.sum())
        if total > self.capacity:
            raise InferenceError(f"batch of {total} patches exceeds the engine's {self.capacity}")
        conn = self._ensure_running()
        if self._block is None:
            raise InferenceError("engine process is closed")
        view = np.ndarray((total, self.patch_size, self.patch_size, 3), dtype=np.uint8, buffer=self._block.buf)
        np.concatenate([s.patches for s in sets], axis=0, out=view)
        del view
        indices = np.concatenate([s.indices for s in sets]).astype(np.int64, copy=False)
        try:
            conn.send(("batch", counts, indices))
            if not conn.poll(self.batch_timeout_s):
                self._kill()
                raise InferenceError(f"engine process took over {self.batch_timeout_s:.0f} s on a batch of "
                                     f"{len(sets)}; replaced")
            message = conn.recv()
        except (EOFError, OSError) as exc:
            code = self._proc.exitcode if self._proc is not None else None
            self._kill()
            raise InferenceError(f"engine process died during a batch of {len(sets)} (exit code {code})") from exc
        if message[0] == "error":
            raise InferenceError(message[2])
        logits = torch.from_numpy(message[1])
        if logits.shape != (len(sets), self.loaded.num_classes):
            raise InferenceError(f"engine process returned logits of shape {tuple(logits.shape)}")
        return logits

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
