"""Worker statistics: counters since start plus a window that each metrics message drains.

Pure bookkeeping on the event loop (no locks: every call happens on the loop thread).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np

from inference_worker.batcher import BatchReport
from shared.percentiles import percentile, percentiles


@dataclass
class WindowStats:
    """Since the previous metrics message."""

    started: float = field(default_factory=time.monotonic)
    requests: int = 0  # accepted into the queue
    replies: int = 0  # successful replies published
    batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    batch_tokens: list[int] = field(default_factory=list)
    busy_s: float = 0.0
    service_s: list[float] = field(default_factory=list)  # arrival → reply published
    # device send → worker receipt (wall clocks): time a request spent in the broker and the socket
    # buffers before the worker saw it. A worker whose event loop falls behind shows it here while
    # its own queue stays short.
    arrival_s: list[float] = field(default_factory=list)


@dataclass
class WorkerStats:
    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    replies: int = 0
    batches: int = 0
    errors_by_code: collections.Counter[str] = field(default_factory=collections.Counter)
    window: WindowStats = field(default_factory=WindowStats)
    # region exchanges by outcome: asked, answered (fused reply sent), expired, table_full
    regions: collections.Counter[str] = field(default_factory=collections.Counter)

    def on_request(self, arrival_s: float | None = None) -> None:
        self.requests += 1
        self.window.requests += 1
        if arrival_s is not None:
            self.window.arrival_s.append(max(0.0, arrival_s))  # clock skew can make it negative

    def on_batch(self, report: BatchReport) -> None:
        self.batches += 1
        w = self.window
        w.batches += 1
        w.batch_sizes.append(report.size)
        w.batch_tokens.append(report.tokens)
        w.busy_s += report.run_s

    def on_reply(self, service_s: float) -> None:
        self.replies += 1
        self.window.replies += 1
        self.window.service_s.append(service_s)

    def on_error(self, code: str) -> None:
        self.errors_by_code[code] += 1

    def on_region(self, outcome: str) -> None:
        self.regions[outcome] += 1

    def drain(self, now: float | None = None) -> WindowFigures:
        """Figures for one metrics message; starts a new window."""
        now = time.monotonic() if now is None else now
        w = self.window
        elapsed = max(now - w.started, 1e-9)
        p50, p95, p99 = percentiles(w.service_s, (50, 95, 99)) or (0.0, 0.0, 0.0)  # this window's replies only
        arrival_p95 = percentile(w.arrival_s, 95) or 0.0
        sizes = w.batch_sizes
        self.window = WindowStats(started=now)
        return WindowFigures(
            window_s=elapsed, requests_per_s=w.requests / elapsed, replies_per_s=w.replies / elapsed,
            batches=w.batches, batch_size_mean=float(np.mean(sizes)) if sizes else 0.0,
            batch_size_max=max(sizes) if sizes else 0,
            tokens_per_batch_mean=float(np.mean(w.batch_tokens)) if w.batch_tokens else 0.0,
            busy_fraction=min(1.0, w.busy_s / elapsed), service_p50_ms=p50 * 1000.0,
            service_p95_ms=p95 * 1000.0, service_p99_ms=p99 * 1000.0, requests_total=self.requests,
            replies_total=self.replies, replies=w.replies, errors_by_code=dict(self.errors_by_code),
            arrival_p95_ms=arrival_p95 * 1000.0)


@dataclass(frozen=True)
class WindowFigures:
    window_s: float
    requests_per_s: float
    replies_per_s: float
    batches: int
    batch_size_mean: float
    batch_size_max: int
    tokens_per_batch_mean: float
    busy_fraction: float
    service_p50_ms: float
    service_p95_ms: float
    service_p99_ms: float
    requests_total: int
    replies_total: int
    replies: int  # replies published in this window (the service-time percentiles cover these)
    errors_by_code: dict[str, int]  # since start
    arrival_p95_ms: float = 0.0  # device send → worker receipt, this window's requests
