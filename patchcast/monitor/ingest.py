"""Wire → monitor records: which topics to subscribe to, and one handler that decodes each message
(:mod:`shared.protocol`, which raises only ``ProtocolError``) and folds it into an
:class:`~patchcast.monitor.state.Aggregator`. Undecodable messages are counted, never fatal."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from patchcast.monitor.state import Aggregator, WorkerSample
from shared import protocol
from shared.errors import ProtocolError
from shared.topics import Topics
from shared.transport import Incoming

SYS_FILTER = "$SYS/#"


def outcome_filter(topics: Topics) -> str:
    """Outcomes on their own topic (``<prefix>/outcome/<device>``); devices may also publish them on
    their metrics topic — both are handled."""
    return f"{topics.prefix}/outcome/+"


def subscriptions(topics: Topics, *, sys_topics: bool = True) -> list[str]:
    subs = [topics.metrics_filter(), topics.availability_filter(), outcome_filter(topics)]
    return [*subs, SYS_FILTER] if sys_topics else subs


def worker_sample(m: protocol.WorkerMetrics) -> WorkerSample:
    return WorkerSample(
        model=m.model, queue_depth=m.queue_depth, oldest_queued_ms=m.oldest_queued_ms,
        batch_size_mean=m.batch_size_mean if m.batches else None,
        tokens_per_batch_mean=m.tokens_per_batch_mean if m.batches else None,
        busy_fraction=m.busy_fraction, requests_per_s=m.requests_per_s,
        # Every accepted request gets exactly one reply (answer or error), so replies/s ≈ requests/s
        # over a window; the worker reports the latter.
        replies_per_s=m.requests_per_s,
        service_p50_ms=m.service_ms_p50 if m.requests else None,
        service_p95_ms=m.service_ms_p95 if m.requests else None,
        service_p99_ms=m.service_ms_p99 if m.requests else None,
        errors_by_code=dict(m.errors_by_code), errors_cumulative=True, arrival_p95_ms=m.arrival_ms_p95)


@dataclass
class Ingest:
    """The transport's message handler for a monitor-like client."""

    aggregator: Aggregator
    topics: Topics = field(default_factory=Topics)
    clock: Callable[[], float] = time.monotonic
    jpeg_bytes_estimate: int = 0  # per offloaded image, when outcomes do not carry it
    decode_errors: Counter[str] = field(default_factory=Counter)
    on_outcome: Callable[[protocol.Outcome], None] | None = None

    def __call__(self, msg: Incoming) -> None:
        now = self.clock()
        topic = msg.topic
        if topic.startswith("$SYS/"):
            self.aggregator.add_sys(topic, msg.payload.decode("utf-8", errors="replace"), now)
            return
        if not msg.payload:
            return  # a cleared retained message
        prefix = self.topics.prefix + "/"
        kind = topic[len(prefix):].split("/", 1)[0] if topic.startswith(prefix) else ""
        try:
            if kind in ("outcome", "metrics"):
                message = protocol.decode(msg.payload)
                if isinstance(message, protocol.Outcome):
                    self.aggregator.add_outcome(message, now, jpeg_bytes_estimate=self.jpeg_bytes_estimate)
                    if self.on_outcome is not None:
                        self.on_outcome(message)
                elif isinstance(message, protocol.WorkerMetrics):
                    if msg.retain and time.time() - message.at > self.aggregator.cfg.worker_stale_s:
                        return  # an old retained report: not a live worker
                    self.aggregator.add_worker_metrics(message.worker_id, worker_sample(message), now)
            elif kind == "availability":
                role, ident = self.topics.parse_role_id(topic, "availability")
                a = protocol.decode_availability(msg.payload)
                self.aggregator.set_availability(role, ident, a.state == "online", now)
        except ProtocolError as exc:
            self.decode_errors[exc.code] += 1
