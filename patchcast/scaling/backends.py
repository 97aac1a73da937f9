"""Pool backends: who actually starts and stops workers. Both take the same decisions from
:mod:`patchcast.scaling.policy`.

* :class:`ProcessPool` supervises ``patchcast worker`` subprocesses on this host: each in its own
  session (terminal Ctrl-C reaches only the supervisor, which drains them in order) and, on Linux,
  with a parent-death signal so none outlives a killed supervisor. Crashed workers are restarted
  with exponential backoff, at most ``restart_max`` times per ``restart_window_s``; a worker being
  stopped is drained: SIGTERM, bounded wait (``drain_timeout_s``), then SIGKILL.
* :class:`ComposeBackend` runs ``docker compose up -d --no-recreate --no-deps --scale worker=N``;
  compose stops surplus containers with SIGTERM and the service's ``stop_grace_period``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Protocol

from shared.children import start_child
from shared.config import Config, ScalerConfig
from shared.errors import PatchCastError
from shared.logs import get_logger

SlotState = Literal["starting", "running", "draining", "backoff"]

EXIT_AFTER_OFFLINE_S = 3.0
"""A draining worker that has announced itself offline has finished its work: it gets this long (within
``drain_timeout_s``) to exit before SIGKILL, instead of the whole drain bound."""


class ScalingError(PatchCastError):
    code = "scaling"


@dataclass(frozen=True)
class PoolMember:
    """One worker as the backend sees it."""

    worker_id: str
    state: SlotState
    pid: int | None
    started_at: float  # monotonic
    restarts: int


class PoolBackend(Protocol):
    @property
    def desired(self) -> int: ...
    def members(self) -> tuple[PoolMember, ...]: ...
    async def scale_to(self, n: int) -> None: ...
    async def run(self) -> None: ...
    async def shutdown(self) -> None: ...


@dataclass
class _Slot:
    worker_id: str
    proc: asyncio.subprocess.Process | None = None
    state: SlotState = "starting"
    started_at: float = 0.0
    restarts: int = 0
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None
    log_file: IO[bytes] | None = None
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # it said "offline" while draining


def _open_log(path: Path) -> IO[bytes]:
    """Append-mode log file for one worker slot (kept across its restarts; closed when it stops)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")  # the slot owns and closes it


def default_worker_argv() -> list[str]:
    return [sys.executable, "-m", "patchcast.cli", "worker"]


def worker_env(cfg: Config, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for supervised workers: the supervisor's broker address (so ``--broker`` given to
    the supervisor reaches them) and JSON logs."""
    env = dict(os.environ if base is None else base)
    env["PATCHCAST_BROKER__HOST"] = cfg.broker.host
    env["PATCHCAST_BROKER__PORT"] = str(cfg.broker.port)
    if cfg.broker.tls:  # --tls* flags given to the supervisor reach its workers too
        env["PATCHCAST_BROKER__TLS"] = "true"
        env["PATCHCAST_BROKER__TLS_VERIFY_HOSTNAME"] = str(cfg.broker.tls_verify_hostname).lower()
        for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            if getattr(cfg.broker, key):
                env[f"PATCHCAST_BROKER__{key.upper()}"] = getattr(cfg.broker, key)
    env.setdefault("PATCHCAST_LOGGING__FORMAT", "json")
    return env


class ProcessPool:
    """Supervised ``patchcast worker`` subprocesses (see the module docstring).

    Workers get their id and everything else through the environment
    (``PATCHCAST_WORKER__WORKER_ID`` …), so the argv stays a plain ``patchcast worker``.
    """

    def __init__(self, cfg: ScalerConfig, *, argv: Sequence[str] | None = None,
                 env: Mapping[str, str] | None = None, id_prefix: str = "worker",
                 log_dir: Path | None = None, clock: Callable[[], float] = time.monotonic,
                 poll_s: float = 0.25) -> None:
        self.cfg = cfg
        self.argv = list(argv or default_worker_argv())
        self.env = dict(os.environ if env is None else env)
        self.id_prefix = id_prefix
        self.log_dir = log_dir
        self.clock = clock
        self.poll_s = poll_s
        self.log = get_logger("patchcast.scaling.pool")
        self._desired = 0
        self._slots: list[_Slot] = []
        self._draining: set[asyncio.Task[None]] = set()
        self._draining_slots: dict[str, _Slot] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.crashes_total = 0
        self.restarts_total = 0
        self.kills_total = 0
        self.ever_started = 0
        self.peak_running = 0
        self.all_pids: list[int] = []  # every worker process ever started (for orphan checks)

    # ---- view ---------------------------------------------------------------------------------
    @property
    def desired(self) -> int:
        return self._desired

    def members(self) -> tuple[PoolMember, ...]:
        return tuple(PoolMember(s.worker_id, s.state, s.proc.pid if s.proc else None, s.started_at,
                                s.restarts) for s in self._slots)

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self._slots if s.proc is not None and s.proc.returncode is None]

    # ---- control ------------------------------------------------------------------------------
    async def _spawn(self, slot: _Slot) -> None:
        env = dict(self.env)
        env["PATCHCAST_WORKER__WORKER_ID"] = slot.worker_id
        stdout: IO[bytes] | None = None  # inherit: worker logs go where the supervisor's go
        if self.log_dir is not None:
            if slot.log_file is None:
                slot.log_file = _open_log(self.log_dir / f"{slot.worker_id}.log")
            stdout = slot.log_file
        slot.proc = await start_child(self.argv, env=env, output=stdout)
        self.all_pids.append(slot.proc.pid)
        slot.state = "starting"
        slot.started_at = self.clock()
        slot.restart_at = None
        self.ever_started += 1
        self.log.info("worker_started", worker_id=slot.worker_id, pid=slot.proc.pid, restarts=slot.restarts)

    async def scale_to(self, n: int) -> None:
        n = max(0, n)
        async with self._lock:
            self._desired = n
            while len(self._slots) < n:
                slot = _Slot(worker_id=f"{self.id_prefix}-{next(self._ids)}")
                self._slots.append(slot)
                await self._spawn(slot)
            while len(self._slots) > n:
                # Stop the newest first: the oldest are warm and hold the longest-lived queues.
                slot = self._slots.pop()
                self._start_drain(slot)
            self.peak_running = max(self.peak_running, len(self._slots))

    def mark_running(self, worker_id: str) -> None:
        """The scaler saw this worker's first metrics: it is warm."""
        for s in self._slots:
            if s.worker_id == worker_id and s.state == "starting":
                s.state = "running"

    def note_offline(self, worker_id: str) -> None:
        """The worker published offline availability: if it is draining, it is done."""
        slot = self._draining_slots.get(worker_id)
        if slot is not None:
            slot.drained.set()

    def _start_drain(self, slot: _Slot) -> None:
        slot.state = "draining"
        self._draining_slots[slot.worker_id] = slot
        task = asyncio.create_task(self._drain(slot), name=f"drain-{slot.worker_id}")
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _drain(self, slot: _Slot) -> None:
        proc = slot.proc
        try:
            if proc is None or proc.returncode is not None:
                return
            self.log.info("worker_draining", worker_id=slot.worker_id, pid=proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            deadline = self.clock() + self.cfg.drain_timeout_s
            exited = asyncio.create_task(proc.wait(), name=f"wait-{slot.worker_id}")
            drained = asyncio.create_task(slot.drained.wait(), name=f"drained-{slot.worker_id}")
            try:
                await asyncio.wait({exited, drained}, timeout=self.cfg.drain_timeout_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                if not exited.done() and drained.done():
                    remaining = max(0.0, min(EXIT_AFTER_OFFLINE_S, deadline - self.clock()))
                    await asyncio.wait({exited}, timeout=remaining)
            finally:
                drained.cancel()
            if not exited.done():
                self.kills_total += 1
                self.log.warning("worker_stop_timeout_killed", worker_id=slot.worker_id, pid=proc.pid,
                                 drained=slot.drained.is_set(), timeout_s=self.cfg.drain_timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            code = await exited
            self.log.info("worker_stopped", worker_id=slot.worker_id, pid=proc.pid, code=code)
        finally:
            self._draining_slots.pop(slot.worker_id, None)
            if slot.log_file is not None:
                slot.log_file.close()
                slot.log_file = None

    def _restart_delay(self, slot: _Slot, now: float) -> float | None:
        """Seconds until a restart is allowed, or None while the rate limit is exhausted."""
        while slot.crashes and now - slot.crashes[0] > self.cfg.restart_window_s:
            slot.crashes.popleft()
        if len(slot.crashes) > self.cfg.restart_max:
            return None
        return self.cfg.restart_backoff_s * 2 ** max(0, len(slot.crashes) - 1)

    async def _check_children(self) -> None:
        now = self.clock()
        async with self._lock:
            for slot in self._slots:
                proc = slot.proc
                if slot.state == "backoff":
                    if slot.restart_at is None:  # rate limit exhausted: wait for the window to move
                        delay = self._restart_delay(slot, now)
                        if delay is not None:
                            slot.restart_at = now + delay
                    elif now >= slot.restart_at:
                        slot.restarts += 1
                        self.restarts_total += 1
                        await self._spawn(slot)
                    continue
                if proc is None or proc.returncode is None:
                    continue
                self.crashes_total += 1
                slot.crashes.append(now)
                delay = self._restart_delay(slot, now)
                slot.state = "backoff"
                slot.restart_at = None if delay is None else now + delay
                self.log.warning("worker_exited", worker_id=slot.worker_id, pid=proc.pid,
                                 code=proc.returncode, restart_in_s=delay,
                                 crashes_in_window=len(slot.crashes))

    async def run(self) -> None:
        """Watch the children until cancelled."""
        while True:
            await self._check_children()
            await asyncio.sleep(self.poll_s)

    async def shutdown(self) -> None:
        """Drain every worker concurrently (each bounded by drain_timeout_s) and wait for all."""
        async with self._lock:
            self._desired = 0
            while self._slots:
                self._start_drain(self._slots.pop())
        if self._draining:
            await asyncio.gather(*list(self._draining), return_exceptions=True)


class ComposeBackend:
    """``docker compose up -d --no-recreate --no-deps --scale SERVICE=N SERVICE``.

    Compose owns the containers (restart policy, SIGTERM + ``stop_grace_period`` when scaling
    down); this backend only sets the replica count, with a timeout per call.
    """

    def __init__(self, cfg: ScalerConfig, *, docker: str = "docker", timeout_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.docker = docker
        self.timeout_s = timeout_s
        self.clock = clock
        self.log = get_logger("patchcast.scaling.compose")
        self._desired = 0
        self._changed_at = clock()

    @property
    def desired(self) -> int:
        return self._desired

    def command(self, n: int) -> list[str]:
        argv = [self.docker, "compose", "-f", self.cfg.compose_file]
        if self.cfg.compose_project:
            argv += ["-p", self.cfg.compose_project]
        service = self.cfg.compose_service
        return [*argv, "up", "-d", "--no-recreate", "--no-deps", "--scale", f"{service}={n}", service]

    def members(self) -> tuple[PoolMember, ...]:
        # Container ids are compose's business; the scaler counts workers by their metrics.
        return ()

    async def scale_to(self, n: int) -> None:
        argv = self.command(n)
        self.log.info("compose_scale", replicas=n, command=" ".join(argv))
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
        except OSError as exc:
            raise ScalingError(f"cannot run {argv[0]!r}: {exc.strerror}") from exc
        try:
            async with asyncio.timeout(self.timeout_s):
                out, _ = await proc.communicate()
        except TimeoutError as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise ScalingError(f"'{' '.join(argv)}' timed out after {self.timeout_s} s") from exc
        if proc.returncode != 0:
            raise ScalingError(f"'{' '.join(argv)}' failed ({proc.returncode}): "
                               f"{out.decode(errors='replace').strip()[-500:]}")
        self._desired = n
        self._changed_at = self.clock()

    async def run(self) -> None:
        await asyncio.Event().wait()  # compose supervises the containers itself

    async def shutdown(self) -> None:
        """Leave the deployment as it is: compose owns the containers' lifetime."""


class ObserveBackend:
    """Starts and stops nothing: the scaler only computes the pool size it would want and exports it
    (``patchcast_pool_desired_workers``) for an external autoscaler — Kubernetes HPA/KEDA — to apply.
    The current size is whatever reports metrics."""

    observes_only = True

    def __init__(self) -> None:
        self._desired = 0

    @property
    def desired(self) -> int:
        return self._desired

    def members(self) -> tuple[PoolMember, ...]:
        return ()

    async def scale_to(self, n: int) -> None:
        self._desired = n

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def shutdown(self) -> None:
        """Nothing to stop."""
