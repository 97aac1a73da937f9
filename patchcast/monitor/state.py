"""Monitor state: a mutable :class:`Aggregator` that message handlers fold records into, and the
immutable :class:`Snapshot` it produces once per refresh. Pure and synchronous: no MQTT, no clock
(callers pass ``now``), so tests feed records and compare snapshots.

Outcomes are the protocol's own :class:`~shared.protocol.Outcome` (the one outcome record of the
project: devices publish it, the fleet summary and the monitor read it); worker metrics arrive as a
:class:`WorkerSample`, which :mod:`patchcast.monitor.ingest` builds from the wire message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.config import MonitorConfig
from shared.percentiles import percentiles
from shared.protocol import Outcome

# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class _Seen:
    """An outcome in the sliding window, with what its full image would have cost (0: not sent)."""

    at: float
    outcome: Outcome
    full_bytes: int


@dataclass(frozen=True)
class WorkerSample:
    """One worker metrics message (an interval's figures)."""

    queue_depth: int = 0
    oldest_queued_ms: float = 0.0
    batch_size_mean: float | None = None
    tokens_per_batch_mean: float | None = None
    busy_fraction: float = 0.0
    requests_per_s: float = 0.0
    replies_per_s: float = 0.0
    service_p50_ms: float | None = None
    service_p95_ms: float | None = None
    service_p99_ms: float | None = None
    errors_by_code: Mapping[str, int] = field(default_factory=dict)
    errors_cumulative: bool = True  # errors_by_code counts since start (else: this interval only)
    arrival_p95_ms: float = 0.0  # device send → worker receipt (time in the broker), p95 of the interval
    model: str = ""  # the model id whose requests the worker serves: its pool (experts have their own)


# ---------------------------------------------------------------------------------------------
# Snapshot (immutable; rendering is a pure function of it)


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    state: str  # "online", "stale", "offline", "starting"
    batch_size: float | None
    tokens_per_batch: float | None
    busy_fraction: float | None
    queue_depth: int | None
    oldest_queued_ms: float | None
    replies_per_s: float | None
    service_p95_ms: float | None
    errors: int
    model: str = ""  # its pool's model id ("" until a metrics message said)


@dataclass(frozen=True)
class BrokerRow:
    version: str | None = None
    uptime_s: float | None = None
    clients: int | None = None
    msgs_in_per_s: float | None = None
    msgs_out_per_s: float | None = None
    bytes_in_per_s: float | None = None


@dataclass(frozen=True)
class Accuracy:
    edge: float | None
    collaborative: float | None
    server: float | None
    labelled: int  # images with a known ground truth
    server_labelled: int  # images the server-only reference accuracy was measured on (set_server_reference)


@dataclass(frozen=True)
class Snapshot:
    elapsed_s: float
    window_s: float
    devices_online: int
    workers_online: int
    images_total: int
    sent_total: int
    timeouts_total: int
    errors_total: int
    requests_per_s: float  # images classified per second (edge-only and offloaded)
    offload_rate: float | None  # sent / images in the window
    patch_fraction: float | None  # patches sent / patches of sent images, in the window
    bytes_per_s: float
    jpeg_bytes_per_s: float | None  # full JPEGs of the *same* offloaded images (None: not known)
    bytes_total: int
    jpeg_bytes_total: int
    accuracy: Accuracy
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    latency_history: tuple[float | None, ...]
    workers: tuple[WorkerRow, ...]
    broker: BrokerRow
    title: str = "PatchCast"

    @property
    def bytes_saving(self) -> float | None:
        """1 − sent/JPEG over everything seen (None before anything was offloaded)."""
        return 1.0 - self.bytes_total / self.jpeg_bytes_total if self.jpeg_bytes_total else None


# ---------------------------------------------------------------------------------------------
# Aggregator


@dataclass
class _Worker:
    sample: WorkerSample | None = None
    last_seen: float | None = None
    available: bool | None = None
    avail_at: float | None = None
    errors_seen: int = 0  # running total when the worker reports per-interval errors


@dataclass
class _Totals:
    images: int = 0
    sent: int = 0
    timeouts: int = 0
    errors: int = 0
    bytes: int = 0
    jpeg_bytes: int = 0
    labelled: int = 0
    edge_correct: int = 0
    final_correct: int = 0


class _RateOf:
    """Rate of a monotonically increasing counter from its last two samples (e.g. $SYS totals)."""

    def __init__(self) -> None:
        self.prev: tuple[float, float] | None = None
        self.last: tuple[float, float] | None = None

    def add(self, t: float, value: float) -> None:
        if self.last is not None and t - self.last[0] < 1e-3:
            self.last = (t, value)
            return
        self.prev, self.last = self.last, (t, value)

    def rate(self) -> float | None:
        if self.prev is None or self.last is None:
            return None
        dt = self.last[0] - self.prev[0]
        dv = self.last[1] - self.prev[1]
        return dv / dt if dt > 0 and dv >= 0 else None


_SYS_RATES = {
    "$SYS/broker/messages/received": "msgs_in",
    "$SYS/broker/messages/sent": "msgs_out",
    "$SYS/broker/bytes/received": "bytes_in",
}


class Aggregator:
    """Folds messages into counters and windows; :meth:`snapshot` freezes a view of them."""

    def __init__(self, cfg: MonitorConfig, *, started_at: float, title: str = "PatchCast") -> None:
        self.cfg = cfg
        self.started_at = started_at
        self.title = title
        self.totals = _Totals()
        self.workers: dict[str, _Worker] = {}
        self.devices: dict[str, bool] = {}  # availability of edge devices
        self.device_seen: dict[str, float] = {}  # last outcome time per device
        self._window: deque[_Seen] = deque()
        self._latency_history: deque[float | None] = deque(maxlen=cfg.sparkline_points)
        self._sys: dict[str, str] = {}
        self._server_reference: tuple[float, int] | None = None
        self.first_outcome_at: float | None = None
        self.last_outcome_at: float | None = None
        self._sys_rates = {name: _RateOf() for name in _SYS_RATES.values()}

    # ---- folding ------------------------------------------------------------------------------
    def add_outcome(self, outcome: Outcome, now: float, *, jpeg_bytes_estimate: int = 0) -> None:
        """Fold one device outcome in. ``jpeg_bytes_estimate``: the full-image cost of an offloaded image
        whose outcome does not carry ``full_bytes``."""
        if self.first_outcome_at is None:
            self.first_outcome_at = now
        self.last_outcome_at = now
        full = (outcome.full_bytes or jpeg_bytes_estimate) if outcome.offloaded else 0
        t = self.totals
        t.images += 1
        if outcome.offloaded:
            t.sent += 1
            t.bytes += outcome.bytes
            t.jpeg_bytes += full
        t.timeouts += outcome.status == "timeout"
        t.errors += outcome.status == "error"
        if outcome.ground_truth is not None:
            t.labelled += 1
            t.edge_correct += outcome.edge_label == outcome.ground_truth
            t.final_correct += outcome.final_label == outcome.ground_truth
        self.device_seen[outcome.device_id] = now
        self._window.append(_Seen(now, outcome, full))

    def add_worker_metrics(self, worker_id: str, sample: WorkerSample, now: float) -> None:
        w = self.workers.setdefault(worker_id, _Worker())
        if not sample.errors_cumulative:
            w.errors_seen += sum(sample.errors_by_code.values())
        w.sample = sample
        w.last_seen = now
        if w.available is None:
            w.available = True

    def set_availability(self, role: str, ident: str, online: bool, now: float) -> None:
        if role == "worker":
            w = self.workers.setdefault(ident, _Worker())
            w.available = online
            w.avail_at = now
        elif role == "edge":
            self.devices[ident] = online

    def set_server_reference(self, accuracy: float, images: int) -> None:
        """Server-only accuracy measured elsewhere (e.g. the server model on a sample of the same source);
        shown until outcomes carry server labels themselves."""
        self._server_reference = (accuracy, images)

    def add_sys(self, topic: str, payload: str, now: float) -> None:
        self._sys[topic] = payload
        name = _SYS_RATES.get(topic)
        if name is not None:
            with contextlib.suppress(ValueError, IndexError):
                self._sys_rates[name].add(now, float(payload.split()[0]))

    # ---- freezing -----------------------------------------------------------------------------
    def _prune(self, now: float) -> None:
        horizon = now - self.cfg.window_s
        while self._window and self._window[0].at < horizon:
            self._window.popleft()

    def _worker_rows(self, now: float) -> tuple[WorkerRow, ...]:
        rows = []
        for wid in sorted(self.workers):
            w = self.workers[wid]
            silent = math.inf if w.last_seen is None else now - w.last_seen
            if w.available is False:
                if now - (w.avail_at or now) > self.cfg.window_s:
                    continue  # long gone
                state = "offline"
            elif w.sample is None:
                state = "starting"
            elif silent > self.cfg.worker_stale_s:
                state = "stale"
            else:
                state = "online"
            s = w.sample if state in ("online", "stale") else None
            errors = (w.errors_seen if s is None or not s.errors_cumulative
                      else sum(s.errors_by_code.values()))
            rows.append(WorkerRow(
                worker_id=wid, state=state,
                batch_size=s.batch_size_mean if s else None,
                tokens_per_batch=s.tokens_per_batch_mean if s else None,
                busy_fraction=s.busy_fraction if s else None,
                queue_depth=s.queue_depth if s else None,
                oldest_queued_ms=s.oldest_queued_ms if s else None,
                replies_per_s=s.replies_per_s if s else None,
                service_p95_ms=s.service_p95_ms if s else None,
                errors=errors, model=w.sample.model if w.sample else ""))
        return tuple(rows)

    def _broker_row(self) -> BrokerRow:
        def as_float(topic: str) -> float | None:
            raw = self._sys.get(topic)
            try:
                return float(raw.split()[0]) if raw else None
            except (ValueError, IndexError):
                return None

        clients = as_float("$SYS/broker/clients/connected")
        if clients is None:
            clients = as_float("$SYS/broker/clients/active")
        version = self._sys.get("$SYS/broker/version")
        return BrokerRow(
            version=version.removeprefix("mosquitto version ") if version else None,
            uptime_s=as_float("$SYS/broker/uptime"),
            clients=int(clients) if clients is not None else None,
            msgs_in_per_s=self._sys_rates["msgs_in"].rate(),
            msgs_out_per_s=self._sys_rates["msgs_out"].rate(),
            bytes_in_per_s=self._sys_rates["bytes_in"].rate())

    def snapshot(self, now: float) -> Snapshot:
        self._prune(now)
        elapsed = max(0.0, now - self.started_at)
        span = max(1.0, min(self.cfg.window_s, elapsed))
        recs = list(self._window)
        sent = [r for r in recs if r.outcome.offloaded]
        patches_total = sum(r.outcome.num_patches for r in sent)
        latencies = [r.outcome.latency_ms for r in sent
                     if r.outcome.status == "server" and r.outcome.latency_ms is not None]
        p50, p95, p99 = percentiles(latencies, (50, 95, 99)) or (None, None, None)
        self._latency_history.append(p95)
        t = self.totals
        rows = self._worker_rows(now)
        server_acc, server_n = self._server_reference if self._server_reference is not None else (None, 0)
        devices_online = sum(self.devices.values()) if self.devices else sum(
            1 for seen in self.device_seen.values() if now - seen <= self.cfg.window_s)
        return Snapshot(
            elapsed_s=elapsed, window_s=span,
            devices_online=devices_online,
            workers_online=sum(1 for r in rows if r.state == "online"),
            images_total=t.images, sent_total=t.sent, timeouts_total=t.timeouts, errors_total=t.errors,
            requests_per_s=len(recs) / span,
            offload_rate=len(sent) / len(recs) if recs else None,
            patch_fraction=sum(r.outcome.patches for r in sent) / patches_total if patches_total else None,
            bytes_per_s=sum(r.outcome.bytes for r in sent) / span,
            jpeg_bytes_per_s=(sum(r.full_bytes for r in sent) / span
                              if any(r.full_bytes for r in sent) else None),
            bytes_total=t.bytes, jpeg_bytes_total=t.jpeg_bytes,
            accuracy=Accuracy(
                edge=t.edge_correct / t.labelled if t.labelled else None,
                collaborative=t.final_correct / t.labelled if t.labelled else None,
                server=server_acc, labelled=t.labelled, server_labelled=server_n),
            latency_p50_ms=p50, latency_p95_ms=p95, latency_p99_ms=p99,
            latency_history=tuple(self._latency_history),
            workers=rows, broker=self._broker_row(), title=self.title)


def snapshot_dict(s: Snapshot) -> dict[str, Any]:
    """JSON-ready form of a snapshot (``--once --json``, reports)."""
    out = dataclasses.asdict(s)
    out["bytes_saving"] = s.bytes_saving
    return out
