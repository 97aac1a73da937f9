"""The scaler service: worker metrics in (MQTT), pool size out (a backend), Prometheus ``/metrics``.

Every ``scaler.interval_s`` it builds a :class:`~patchcast.scaling.policy.PoolObservation` from the
latest metrics of each pool member, asks the pure policy for a decision and applies it through the
backend. Background loops (MQTT client, backend supervision, decisions, HTTP endpoint) are named tasks
in one ``TaskGroup``; :meth:`ScalerService.stop` ends them and drains the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from patchcast.monitor.ingest import worker_sample
from patchcast.monitor.state import WorkerSample
from patchcast.scaling.backends import PoolBackend, ScalingError
from patchcast.scaling.policy import Autoscaler, Decision, PoolObservation, WorkerLoad
from shared import protocol
from shared.config import Config
from shared.errors import PatchCastError, ProtocolError
from shared.logs import get_logger
from shared.metrics_http import MetricsServer
from shared.prometheus import Family, MetricType
from shared.topics import V1, Topics
from shared.transport import Incoming, Transport

POOL = "patchcast_pool_"
WORKER = "patchcast_worker_"


@dataclass(frozen=True)
class DecisionRecord:
    t: float  # seconds since the service started
    size: int
    desired: int
    direction: str
    reason: str
    queue_total: int
    oldest_queued_ms: float
    busy_mean: float
    reporting: int


class ScalerService:
    def __init__(self, cfg: Config, backend: PoolBackend, *, topics: Topics = V1,
                 clock: Callable[[], float] = time.monotonic, history: int = 3600) -> None:
        self.cfg = cfg
        self.scfg = cfg.scaler
        self.backend = backend
        self.topics = topics
        self.clock = clock
        self.started_at = clock()
        self.autoscaler = Autoscaler(cfg.scaler)
        self.samples: dict[str, tuple[WorkerSample, float]] = {}  # worker id → (latest sample, received)
        self.decisions: Counter[str] = Counter()
        self.history: deque[DecisionRecord] = deque(maxlen=history)
        self.last_decision: Decision | None = None
        self.scale_errors = 0
        self.peak_size = 0
        self._stop = asyncio.Event()
        self.log = get_logger("patchcast.scaler")
        self.transport = Transport(cfg.broker, client_id=f"scaler-{socket.gethostname()}-{os.getpid()}"[:64],
                                   handler=self._on_message)
        self.metrics_server = (MetricsServer(self.families, self.scfg.metrics_host, self.scfg.metrics_port)
                               if self.scfg.metrics_port else None)

    # ---- inputs -------------------------------------------------------------------------------
    def _on_message(self, msg: Incoming) -> None:
        if not msg.payload:
            return
        try:
            kind = "metrics" if "/metrics/" in msg.topic else "availability"
            role, ident = self.topics.parse_role_id(msg.topic, kind)
            if role != "worker":
                return
            if kind == "metrics":
                m = protocol.decode_worker_metrics(msg.payload)
                if msg.retain and time.time() - m.at > self.scfg.metrics_stale_s:
                    return  # retained report of a worker that is gone
                self.samples[m.worker_id] = (worker_sample(m), msg.received_at)
                mark = getattr(self.backend, "mark_running", None)
                if mark is not None:
                    mark(m.worker_id)
            elif protocol.decode_availability(msg.payload).state == "offline":
                self.samples.pop(ident, None)
                note = getattr(self.backend, "note_offline", None)
                if note is not None:
                    note(ident)
        except ProtocolError:
            pass

    def observation(self, now: float) -> PoolObservation:
        members = self.backend.members()
        size = self.backend.desired
        fresh = sum(1 for _, at in self.samples.values() if now - at <= self.scfg.metrics_stale_s)
        if getattr(self.backend, "observes_only", False):
            # Someone else (e.g. Kubernetes) sizes the pool: the current size is what reports.
            size = max(fresh, 1)
        if members:  # a backend that knows its workers' ids: count only those
            ids = {m.worker_id for m in members if m.state != "draining"}
            starting = sum(1 for m in members if m.state == "starting"
                           and now - m.started_at < self.scfg.startup_grace_s)
        else:  # compose: whatever reports on the pool's metrics topics
            ids = set(self.samples)
            since = self.history[-1].t + self.started_at if self.history else self.started_at
            starting = max(0, size - fresh) if now - since < self.scfg.startup_grace_s else 0
        loads = tuple(
            WorkerLoad(wid, s.queue_depth, s.oldest_queued_ms, s.busy_fraction, s.requests_per_s, now - at,
                       s.arrival_p95_ms)
            for wid, (s, at) in sorted(self.samples.items()) if wid in ids)
        return PoolObservation(t=now, size=size, starting=starting, loads=loads)

    # ---- loops --------------------------------------------------------------------------------
    async def _decide_once(self) -> Decision:
        now = self.clock()
        obs = self.observation(now)
        decision = self.autoscaler.observe(obs)
        self.last_decision = decision
        sig = decision.signals
        self.history.append(DecisionRecord(
            t=round(now - self.started_at, 3), size=obs.size, desired=decision.desired,
            direction=decision.direction, reason=decision.reason, queue_total=sig.queue_total,
            oldest_queued_ms=round(sig.oldest_queued_ms, 1), busy_mean=round(sig.busy_mean, 3),
            reporting=sig.reporting))
        if decision.desired != obs.size:
            self.decisions[decision.direction] += 1
            self.log.info("scale", direction=decision.direction, size=obs.size, desired=decision.desired,
                     reason=decision.reason)
            try:
                await self.backend.scale_to(decision.desired)
            except ScalingError as exc:
                self.scale_errors += 1
                self.log.warning("scale_failed", error=exc.message)
        self.peak_size = max(self.peak_size, self.backend.desired)
        return decision

    async def _decide_loop(self) -> None:
        while True:
            await asyncio.sleep(self.scfg.interval_s)
            await self._decide_once()

    async def run(self, *, ready: asyncio.Event | None = None) -> None:
        """Start the pool at ``min_workers`` and scale until :meth:`stop`; then drain the pool."""
        await self.transport.subscribe(self.topics.metrics_filter("worker"), qos=0)
        await self.transport.subscribe(self.topics.availability_filter("worker"), qos=1)
        try:
            async with asyncio.TaskGroup() as tg:
                loops = [tg.create_task(self.transport.run(), name="scaler-mqtt"),
                         tg.create_task(self.backend.run(), name="scaler-backend")]
                if self.metrics_server is not None:
                    await self.metrics_server.start()
                await self.backend.scale_to(self.scfg.min_workers)
                self.peak_size = max(self.peak_size, self.backend.desired)
                loops.append(tg.create_task(self._decide_loop(), name="scaler-decide"))
                if ready is not None:
                    ready.set()
                await self._stop.wait()
                for task in loops:
                    task.cancel()
        finally:
            await self.shutdown()

    def stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        with contextlib.suppress(PatchCastError):
            await self.backend.shutdown()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        with contextlib.suppress(PatchCastError):
            await self.transport.close()

    # ---- Prometheus ---------------------------------------------------------------------------
    def families(self) -> list[Family]:
        """The pool as Prometheus metric families (one consistent view per scrape)."""
        out = _Families()
        now = self.clock()
        obs = self.observation(now)
        out.add(POOL + "desired_workers", "workers the scaler wants", self.backend.desired)
        out.add(POOL + "min_workers", "configured minimum", self.scfg.min_workers)
        out.add(POOL + "max_workers", "configured maximum", self.scfg.max_workers)
        out.add(POOL + "starting_workers", "workers not reporting metrics yet", obs.starting)
        states = Counter(m.state for m in self.backend.members())
        for state in ("starting", "running", "draining", "backoff"):
            out.add(POOL + "workers", "supervised workers by state", states.get(state, 0),
                    {"state": state})
        if self.last_decision is not None:
            s = self.last_decision.signals
            out.add(POOL + "reporting_workers", "workers with fresh metrics", s.reporting)
            out.add(POOL + "queue_depth", "queued requests, all workers", s.queue_total)
            out.add(POOL + "queue_depth_per_worker", "mean queue depth per worker", s.queue_per_worker)
            out.add(POOL + "oldest_queued_seconds", "oldest queued request", s.oldest_queued_ms / 1e3)
            out.add(POOL + "arrival_lateness_seconds", "worst worker's p95 device send → worker receipt",
                    s.arrival_ms_p95 / 1e3)
            out.add(POOL + "busy_fraction", "mean busy fraction", s.busy_mean)
            out.add(POOL + "requests_per_second", "requests/s, all workers", s.requests_per_s)
        for wid, (smp, at) in sorted(self.samples.items()):
            w = {"worker": wid}
            out.add(WORKER + "queue_depth", "queued requests", smp.queue_depth, w)
            out.add(WORKER + "oldest_queued_seconds", "oldest queued request", smp.oldest_queued_ms / 1e3,
                    w)
            out.add(WORKER + "arrival_lateness_seconds", "p95 device send → worker receipt",
                    smp.arrival_p95_ms / 1e3, w)
            out.add(WORKER + "busy_fraction", "share of the window in forwards", smp.busy_fraction, w)
            out.add(WORKER + "requests_per_second", "requests/s", smp.requests_per_s, w)
            out.add(WORKER + "metrics_age_seconds", "since the last metrics message", now - at, w)
            if smp.batch_size_mean is not None:
                out.add(WORKER + "batch_size", "mean batch size", smp.batch_size_mean, w)
            if smp.tokens_per_batch_mean is not None:
                out.add(WORKER + "tokens_per_batch", "mean tokens per batch", smp.tokens_per_batch_mean,
                        w)
            for q, v in (("0.5", smp.service_p50_ms), ("0.95", smp.service_p95_ms),
                         ("0.99", smp.service_p99_ms)):
                if v is not None:
                    out.add(WORKER + "service_seconds", "service time (received → replied) quantiles",
                            v / 1e3, {**w, "quantile": q})
            for code, n in sorted(smp.errors_by_code.items()):
                out.add(WORKER + "errors_total", "errors by code since the worker started", n,
                        {**w, "code": code}, kind="counter")
        for direction in ("up", "down"):
            out.add("patchcast_scaler_decisions_total", "scaling actions taken",
                    self.decisions.get(direction, 0), {"direction": direction}, kind="counter")
        for attr, help_text in (("crashes_total", "workers that exited unasked"),
                                ("restarts_total", "crashed workers restarted"),
                                ("kills_total", "workers killed after the drain bound")):
            value = getattr(self.backend, attr, None)
            if value is not None:
                out.add(f"patchcast_scaler_worker_{attr}", help_text, value, kind="counter")
        return out.families()


class _Families:
    """Collects samples by metric name, keeping first-seen order."""

    def __init__(self) -> None:
        self._by_name: dict[str, Family] = {}

    def add(self, name: str, help_text: str, value: float, labels: dict[str, str] | None = None, *,
            kind: MetricType = "gauge") -> None:
        fam = self._by_name.get(name) or Family(name, help_text, kind)
        self._by_name[name] = fam.with_sample(value, **(labels or {}))

    def families(self) -> list[Family]:
        return list(self._by_name.values())
