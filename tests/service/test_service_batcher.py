"""Dynamic batching: the three closing rules, the token carry-over, bounded queue, failure fan-out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from service_helpers import async_test

from inference_worker.batcher import Batcher, BatchReport
from shared.config import BatchingConfig
from shared.errors import BusyError, InferenceError, PatchCastError


def make(limits: BatchingConfig, capacity: int = 100, fn=None):
    batches: list[list[int]] = []
    reports: list[BatchReport] = []

    def run(items: Sequence[int]) -> list[int | PatchCastError]:
        batches.append(list(items))
        return [i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(fn or run, limits, capacity=capacity,
                                         executor=ThreadPoolExecutor(1), on_batch=reports.append)
    return batcher, batches, reports


@async_test(20)
async def test_closes_at_max_batch() -> None:
    batcher, batches, _ = make(BatchingConfig(max_batch=4, max_tokens=10_000, max_delay_ms=10_000))
    futures = [batcher.submit_nowait(i, 10) for i in range(10)]
    task = asyncio.create_task(batcher.run())
    done = await asyncio.wait_for(asyncio.gather(*futures[:8]), 5)
    assert done == [i * 10 for i in range(8)]
    assert batches[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    task.cancel()


@async_test(20)
async def test_closes_at_max_tokens_and_carries_the_overflowing_request() -> None:
    batcher, batches, reports = make(BatchingConfig(max_batch=100, max_tokens=100, max_delay_ms=50))
    sizes = [40, 40, 40, 30, 90]
    futures = [batcher.submit_nowait(i, n) for i, n in enumerate(sizes)]
    task = asyncio.create_task(batcher.run())
    await asyncio.wait_for(asyncio.gather(*futures), 5)
    # 40+40 (+40 would be 120) | 40+30 (+90 would be 160) | 90
    assert batches == [[0, 1], [2, 3], [4]]
    assert [r.tokens for r in reports] == [80, 70, 90]
    assert all(r.tokens <= 100 for r in reports)
    task.cancel()


@async_test(20)
async def test_closes_at_max_delay_after_the_first_request() -> None:
    delay_ms = 80
    batcher, batches, reports = make(BatchingConfig(max_batch=100, max_tokens=10_000, max_delay_ms=delay_ms))
    task = asyncio.create_task(batcher.run())
    start = time.monotonic()
    first = batcher.submit_nowait(1, 5)
    await asyncio.sleep(0.02)  # not a wait: the second request comes 20 ms after the first
    second = batcher.submit_nowait(2, 5)  # joins: within the first request's delay
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    elapsed = time.monotonic() - start
    assert batches == [[1, 2]]
    # Closed by the deadline of the *first* request (not reset by the second one).
    assert delay_ms / 1000 * 0.9 <= elapsed < delay_ms / 1000 + 1.0
    assert reports[0].waits_s[0] >= delay_ms / 1000 * 0.9
    task.cancel()


@async_test(20)
async def test_full_queue_raises_busy_and_keeps_what_it_has() -> None:
    batcher, _, _ = make(BatchingConfig(), capacity=3)
    for i in range(3):
        batcher.submit_nowait(i, 1)
    with pytest.raises(BusyError) as info:
        batcher.submit_nowait(99, 1)
    assert info.value.code == "busy"
    assert batcher.depth == 3


@async_test(20)
async def test_failed_batch_fails_every_future_and_the_loop_goes_on() -> None:
    calls = []

    def flaky(items: Sequence[int]) -> list[int | PatchCastError]:
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return [i for i in items]

    batcher, _, reports = make(BatchingConfig(max_batch=2, max_delay_ms=1), fn=flaky)
    futures = [batcher.submit_nowait(i, 1) for i in range(4)]
    task = asyncio.create_task(batcher.run())
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 5)
    assert all(isinstance(r, InferenceError) and r.code == "inference" for r in results[:2])
    assert results[2:] == [2, 3]
    assert [r.failed for r in reports] == [True, False]
    task.cancel()


@async_test(20)
async def test_per_request_errors_and_expired_requests() -> None:
    def run(items: Sequence[int]) -> list[int | PatchCastError]:
        return [PatchCastError("bad", code="bad_payload") if i == 1 else i for i in items]

    batcher, _, _ = make(BatchingConfig(max_batch=8, max_delay_ms=1), fn=run)
    ok = batcher.submit_nowait(0, 1)
    bad = batcher.submit_nowait(1, 1)
    expired = batcher.submit_nowait(2, 1, deadline=time.monotonic() - 1.0)
    task = asyncio.create_task(batcher.run())
    results = await asyncio.wait_for(asyncio.gather(ok, bad, expired, return_exceptions=True), 5)
    assert results[0] == 0
    assert isinstance(results[1], PatchCastError) and results[1].code == "bad_payload"
    assert isinstance(results[2], PatchCastError) and results[2].code == "expired"
    await asyncio.wait_for(batcher.wait_idle(), 2)
    task.cancel()


def test_worker_stats_window_drains_and_errors_are_cumulative() -> None:
    from inference_worker.stats import WorkerStats

    stats = WorkerStats()
    stats.window.started -= 2.0  # a 2 s window
    for lateness in (0.1, 0.2, -0.05, None):  # negative: clock skew, clamped; None: not measured
        stats.on_request(lateness)
    stats.on_batch(BatchReport(size=4, tokens=300, run_s=0.5, waits_s=(0.01,) * 4, failed=False))
    for ms in (10, 20, 30, 40):
        stats.on_reply(ms / 1000)
    stats.on_error("busy")
    first = stats.drain()
    assert first.replies == 4 and first.batches == 1 and first.batch_size_mean == 4
    assert first.tokens_per_batch_mean == 300 and 0.2 < first.busy_fraction < 0.3
    assert 1.9 < first.requests_per_s < 2.1 and first.service_p50_ms == pytest.approx(25)
    assert first.arrival_p95_ms == pytest.approx(190.0)  # p95 of (100, 200, 0) ms, linear interpolation
    second = stats.drain()
    assert second.replies == 0 and second.batches == 0 and second.service_p99_ms == 0
    assert second.arrival_p95_ms == 0
    assert second.errors_by_code == {"busy": 1} and second.requests_total == 4
