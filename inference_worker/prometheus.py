"""The worker's Prometheus families (``GET /metrics`` on ``worker.metrics_port``).

Enough for a Prometheus scrape or a KEDA/HPA adapter: counters since start and the gauges of the
latest metrics window. Rendering and the HTTP endpoint are :mod:`shared.prometheus`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.prometheus import Family, process_families

if TYPE_CHECKING:
    from inference_worker.service import InferenceWorker


def worker_families(worker: InferenceWorker) -> list[Family]:
    labels = {"worker": worker.worker_id, "model": worker.model_id}
    stats = worker.stats
    families = [
        Family("patchcast_worker_requests_total", "requests accepted since start", "counter")
        .with_sample(stats.requests, **labels),
        Family("patchcast_worker_replies_total", "replies published since start", "counter")
        .with_sample(stats.replies, **labels),
        Family("patchcast_worker_batches_total", "model batches run since start", "counter")
        .with_sample(stats.batches, **labels),
        Family("patchcast_worker_queue_depth", "requests waiting for a batch")
        .with_sample(worker.batcher.depth, **labels),
        Family("patchcast_worker_queue_capacity", "bounded queue size (beyond it: busy replies)")
        .with_sample(worker.config.worker.queue_capacity, **labels),
        Family("patchcast_worker_oldest_queued_seconds", "age of the oldest queued request")
        .with_sample(round(worker.batcher.oldest_age_s(), 6), **labels),
    ]
    families.append(
        Family("patchcast_worker_child_restarts_total", "child processes replaced since start (engine process, "
               "decoder process pool); each replacement failed the requests its predecessor held", "counter")
        .with_sample(worker.engine.restarts, **labels, child="engine")
        .with_sample(worker.decoder_replacements, **labels, child="decoder"))
    regions = Family("patchcast_worker_region_exchanges_total", "region exchanges by outcome since start: asked "
                     "(a RegionRequest sent), answered (the fused reply), expired (no region in time: the device "
                     "keeps the glance's answer), table_full (the glance answered alone)", "counter")
    for outcome in ("asked", "answered", "expired", "table_full"):
        regions = regions.with_sample(stats.regions[outcome], **labels, outcome=outcome)
    families.append(regions)
    recent = worker.recent.stats
    families.append(
        Family("patchcast_worker_resends_total", "devices' re-sends of requests this worker held, since start: "
               "replayed (answered again from memory, no inference), dropped (the first was still in progress; "
               "its reply answers both)", "counter")
        .with_sample(recent.replayed, **labels, outcome="replayed")
        .with_sample(recent.dropped, **labels, outcome="dropped"))
    errors = Family("patchcast_worker_errors_total", "error replies by code since start", "counter")
    for code, n in sorted(stats.errors_by_code.items()):
        errors = errors.with_sample(n, **labels, code=code)
    families.append(errors)
    m = worker.last_metrics
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
