"""The worker's Prometheus families (``GET /metrics`` on ``worker.metrics_port``).

Enough for a Prometheus scrape or a KEDA/HPA adapter: counters since start and the gauges of the
latest metrics window. The worker builds a :class:`WorkerSnapshot` per scrape (a frozen value: this
module never sees the worker); rendering is :mod:`shared.prometheus`, the HTTP endpoint
:mod:`shared.metrics_http`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.errors import BadFieldError
from shared.prometheus import Family, process_families
from shared.protocol import WorkerMetrics

REGION_OUTCOMES = ("asked", "answered", "expired", "table_full")


@dataclass(frozen=True)
class WorkerSnapshot:
    """What one scrape reports: the worker's counters since start, its queue now, and its latest
    metrics window (``None`` before the first)."""

    worker_id: str
    model_id: str
    requests: int
    replies: int
    batches: int
    queue_depth: int
    queue_capacity: int
    oldest_queued_s: float
    engine_restarts: int
    decoder_replacements: int
    resends_replayed: int
    resends_dropped: int
    regions: Mapping[str, int] = field(default_factory=dict)  # outcome → count; REGION_OUTCOMES
    errors_by_code: Mapping[str, int] = field(default_factory=dict)
    last_metrics: WorkerMetrics | None = None

    def __post_init__(self) -> None:
        for name in ("requests", "replies", "batches", "queue_depth", "queue_capacity", "engine_restarts",
                     "decoder_replacements", "resends_replayed", "resends_dropped"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise BadFieldError(f"WorkerSnapshot.{name} must be an int ≥ 0, got {value!r}")
        if not math.isfinite(self.oldest_queued_s) or self.oldest_queued_s < 0:
            raise BadFieldError(f"WorkerSnapshot.oldest_queued_s must be finite and ≥ 0, got {self.oldest_queued_s}")
        for name in ("regions", "errors_by_code"):
            counts = dict(getattr(self, name))
            if any(type(n) is not int or n < 0 for n in counts.values()):
                raise BadFieldError(f"WorkerSnapshot.{name} counts must be ints ≥ 0")
            object.__setattr__(self, name, counts)  # a copy: the worker's counters keep moving


def worker_families(snap: WorkerSnapshot) -> list[Family]:
    labels = {"worker": snap.worker_id, "model": snap.model_id}
    families = [
        Family("patchcast_worker_requests_total", "requests accepted since start", "counter")
        .with_sample(snap.requests, **labels),
        Family("patchcast_worker_replies_total", "replies published since start", "counter")
        .with_sample(snap.replies, **labels),
        Family("patchcast_worker_batches_total", "model batches run since start", "counter")
        .with_sample(snap.batches, **labels),
        Family("patchcast_worker_queue_depth", "requests waiting for a batch")
        .with_sample(snap.queue_depth, **labels),
        Family("patchcast_worker_queue_capacity", "bounded queue size (beyond it: busy replies)")
        .with_sample(snap.queue_capacity, **labels),
        Family("patchcast_worker_oldest_queued_seconds", "age of the oldest queued request")
        .with_sample(round(snap.oldest_queued_s, 6), **labels),
    ]
    families.append(
        Family("patchcast_worker_child_restarts_total", "child processes replaced since start (engine process, "
               "decoder process pool); each replacement failed the requests its predecessor held", "counter")
        .with_sample(snap.engine_restarts, **labels, child="engine")
        .with_sample(snap.decoder_replacements, **labels, child="decoder"))
    regions = Family("patchcast_worker_region_exchanges_total", "region exchanges by outcome since start: asked "
                     "(a RegionRequest sent), answered (the fused reply), expired (no region in time: the device "
                     "keeps the glance's answer), table_full (the glance answered alone)", "counter")
    for outcome in REGION_OUTCOMES:
        regions = regions.with_sample(snap.regions.get(outcome, 0), **labels, outcome=outcome)
    families.append(regions)
    families.append(
        Family("patchcast_worker_resends_total", "devices' re-sends of requests this worker held, since start: "
               "replayed (answered again from memory, no inference), dropped (the first was still in progress; "
               "its reply answers both)", "counter")
        .with_sample(snap.resends_replayed, **labels, outcome="replayed")
        .with_sample(snap.resends_dropped, **labels, outcome="dropped"))
    errors = Family("patchcast_worker_errors_total", "error replies by code since start", "counter")
    for code, n in sorted(snap.errors_by_code.items()):
        errors = errors.with_sample(n, **labels, code=code)
    families.append(errors)
    m = snap.last_metrics
    if m is not None:
        service = Family("patchcast_worker_service_seconds", "request service time in the last metrics window",
                         "summary")
        for q, ms in (("0.5", m.service_ms_p50), ("0.95", m.service_ms_p95), ("0.99", m.service_ms_p99)):
            service = service.with_sample(ms / 1000.0, **labels, quantile=q)
        families += [
            Family("patchcast_worker_busy_fraction", "share of the last window the model ran")
            .with_sample(m.busy_fraction, **labels),
            Family("patchcast_worker_requests_per_second", "requests per second in the last window")
            .with_sample(m.requests_per_s, **labels),
            Family("patchcast_worker_batch_size_mean", "mean batch size in the last window")
            .with_sample(m.batch_size_mean, **labels),
            Family("patchcast_worker_arrival_lateness_seconds", "p95 device send → worker receipt, last window")
            .with_sample(m.arrival_ms_p95 / 1000.0, **labels),
            service,
        ]
    return families + process_families()
