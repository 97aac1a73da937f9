"""The worker's Prometheus families, rendered and served by the shared endpoint (pure units + loopback HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import re

import pytest
from waiting import wait_until_async

from inference_worker.prometheus import WorkerSnapshot, worker_families
from shared.errors import BadFieldError
from shared.metrics_http import MetricsServer
from shared.prometheus import render
from shared.protocol import WorkerMetrics

LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? [-+0-9.eEInfNa]+$')


def _snapshot(with_window: bool) -> WorkerSnapshot:
    metrics = WorkerMetrics(
        worker_id="w1", model="cifar10-server", at=1.0, window_s=5.0, queue_depth=4, queue_capacity=256,
        oldest_queued_ms=250.0, requests=20, requests_per_s=4.0, batches=6, batch_size_mean=3.5, batch_size_max=8,
        tokens_per_batch_mean=100.0, busy_fraction=0.5, service_ms_p50=20.0, service_ms_p95=40.0,
        service_ms_p99=80.0, arrival_ms_p95=120.0) if with_window else None
    return WorkerSnapshot(worker_id="w1", model_id="cifar10-server", requests=12, replies=11, batches=3,
                          queue_depth=4, queue_capacity=256, oldest_queued_s=0.25, engine_restarts=1,
                          decoder_replacements=0, resends_replayed=3, resends_dropped=1,
                          regions={"asked": 5, "answered": 4}, errors_by_code={"busy": 2}, last_metrics=metrics)


def test_worker_families_render_in_exposition_format() -> None:
    text = render(worker_families(_snapshot(True)))
    for line in text.splitlines():
        assert line.startswith("#") or LINE.match(line), line
    assert 'patchcast_worker_requests_total{model="cifar10-server",worker="w1"} 12' in text
    assert 'patchcast_worker_errors_total{code="busy",model="cifar10-server",worker="w1"} 2' in text
    assert 'patchcast_worker_queue_depth{model="cifar10-server",worker="w1"} 4' in text
    assert 'patchcast_worker_child_restarts_total{child="engine",model="cifar10-server",worker="w1"} 1' in text
    assert 'patchcast_worker_child_restarts_total{child="decoder",model="cifar10-server",worker="w1"} 0' in text
    assert 'patchcast_worker_service_seconds{model="cifar10-server",quantile="0.95",worker="w1"} 0.04' in text
    assert 'patchcast_worker_region_exchanges_total{model="cifar10-server",outcome="asked",worker="w1"} 5' in text
    assert 'patchcast_worker_region_exchanges_total{model="cifar10-server",outcome="expired",worker="w1"} 0' in text
    assert 'patchcast_worker_resends_total{model="cifar10-server",outcome="replayed",worker="w1"} 3' in text
    assert 'patchcast_worker_resends_total{model="cifar10-server",outcome="dropped",worker="w1"} 1' in text
    assert "# TYPE patchcast_worker_service_seconds summary" in text
    assert 'patchcast_worker_arrival_lateness_seconds{model="cifar10-server",worker="w1"} 0.12' in text
    rss = re.search(r"^process_resident_memory_bytes (\d+)$", text, re.MULTILINE)
    assert rss is not None and int(rss.group(1)) > 5 * 2**20  # any Python process holds more than that
    cpu = re.search(r"^process_cpu_seconds_total ([0-9.]+)$", text, re.MULTILINE)
    assert cpu is not None and float(cpu.group(1)) > 0
    # before the first metrics window only the counters and queue gauges exist
    early = render(worker_families(_snapshot(False)))
    assert "patchcast_worker_busy_fraction" not in early and "patchcast_worker_replies_total" in early


async def _scrape() -> str:
    server = MetricsServer(lambda: worker_families(_snapshot(True)), "127.0.0.1", 0)
    task = asyncio.create_task(server.run(), name="prometheus")
    await wait_until_async(lambda: server.port != 0, 1.0, 0.01, message="the endpoint listening (its port bound)")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    response = (await asyncio.wait_for(reader.read(), timeout=5.0)).decode()
    writer.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert server._server is None  # cancelled → closed
    return response


def test_worker_endpoint_serves_the_families_until_cancelled() -> None:
    response = asyncio.run(_scrape())
    assert response.startswith("HTTP/1.0 200")
    assert 'patchcast_worker_batches_total{model="cifar10-server",worker="w1"} 3' in response


def test_a_snapshot_holds_counts_only_and_copies_them() -> None:
    errors = {"busy": 2}
    snap = WorkerSnapshot(worker_id="w1", model_id="m", requests=1, replies=1, batches=1, queue_depth=0,
                          queue_capacity=8, oldest_queued_s=0.0, engine_restarts=0, decoder_replacements=0,
                          resends_replayed=0, resends_dropped=0, errors_by_code=errors)
    errors["busy"] = 5  # the worker's counter moves on; the scrape's view does not
    assert snap.errors_by_code == {"busy": 2}
    with pytest.raises(BadFieldError, match="queue_depth"):
        WorkerSnapshot(worker_id="w1", model_id="m", requests=1, replies=1, batches=1, queue_depth=-1,
                       queue_capacity=8, oldest_queued_s=0.0, engine_restarts=0, decoder_replacements=0,
                       resends_replayed=0, resends_dropped=0)
    with pytest.raises(BadFieldError, match="oldest_queued_s"):
        WorkerSnapshot(worker_id="w1", model_id="m", requests=1, replies=1, batches=1, queue_depth=0,
                       queue_capacity=8, oldest_queued_s=float("nan"), engine_restarts=0, decoder_replacements=0,
                       resends_replayed=0, resends_dropped=0)
