"""The scaler's Prometheus view: text exposition format and the /metrics endpoint (in-process)."""

from __future__ import annotations

import asyncio
import re
import time

from patchcast.scaling.backends import PoolMember
from patchcast.scaling.service import ScalerService
from shared import protocol
from shared.config import Config, ScalerConfig
from shared.metrics_http import MetricsServer
from shared.prometheus import Family, render
from shared.topics import V1
from shared.transport import Incoming

LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? [-+0-9.eEInfNa]+$')


def test_render_exposition_format():
    fam = Family("x_total", 'help with "quotes"\nand newline', "counter").with_sample(3, code='a"b')
    text = render([fam, Family("y", "gauge").with_sample(0.25).with_sample(float("nan"), w="1")])
    assert text.endswith("\n")
    assert '# HELP x_total help with "quotes"\\nand newline' in text
    assert 'x_total{code="a\\"b"} 3' in text and "y 0.25" in text and 'y{w="1"} NaN' in text
    for line in text.splitlines():
        assert line.startswith("#") or LINE.match(line), line


class FakePool:
    desired = 2

    def members(self) -> tuple[PoolMember, ...]:
        now = time.monotonic()
        return (PoolMember("w1", "running", 101, now - 50, 0), PoolMember("w2", "starting", 102, now, 0))

    async def scale_to(self, n: int) -> None:
        self.desired = n

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def shutdown(self) -> None:
        pass


def metrics_message(worker: str, queue: int = 7, oldest_ms: float = 250.0) -> Incoming:
    m = protocol.WorkerMetrics(
        worker_id=worker, model="m", at=time.time(), window_s=1.0, queue_depth=queue, queue_capacity=256,
        oldest_queued_ms=oldest_ms, requests=40, requests_per_s=12.5, batches=5, batch_size_mean=2.5,
        batch_size_max=4, tokens_per_batch_mean=120.0, busy_fraction=0.6, service_ms_p50=10.0,
        service_ms_p95=40.0, service_ms_p99=80.0, errors_by_code={"busy": 3})
    return Incoming(topic=V1.metrics("worker", worker), payload=protocol.encode(m))


async def _endpoint() -> str:
    cfg = Config(scaler=ScalerConfig(metrics_port=0))
    service = ScalerService(cfg, FakePool())
    service._on_message(metrics_message("w1"))
    service._on_message(metrics_message("stranger"))  # not a pool member: exported, not counted
    await service._decide_once()
    server = MetricsServer(service.families, "127.0.0.1", 0)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        body = await reader.read()
        writer.close()
        await writer.wait_closed()
    finally:
        await server.close()
    return body.decode()


def test_scaler_metrics_endpoint():
    response = asyncio.run(_endpoint())
    head, _, text = response.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200") and "text/plain; version=0.0.4" in head
    for line in text.splitlines():
        assert line.startswith("#") or LINE.match(line), line
    assert "patchcast_pool_desired_workers 2" in text
    assert 'patchcast_pool_workers{state="running"} 1' in text
    assert 'patchcast_pool_workers{state="starting"} 1' in text
    assert "patchcast_pool_queue_depth 7" in text  # only w1 counts for the decision
    assert "patchcast_pool_oldest_queued_seconds 0.25" in text
    assert 'patchcast_worker_queue_depth{worker="stranger"} 7' in text
    assert 'patchcast_worker_service_seconds{quantile="0.95",worker="w1"} 0.04' in text
    assert 'patchcast_worker_errors_total{code="busy",worker="w1"} 3' in text
    assert "# TYPE patchcast_scaler_decisions_total counter" in text


async def _observe_only() -> list[int]:
    from dataclasses import replace as dc_replace

    from patchcast.scaling.backends import ObserveBackend

    now = [1000.0]
    cfg = Config(scaler=ScalerConfig(min_workers=1, max_workers=5, up_after_s=2.0, up_cooldown_s=0.0))
    service = ScalerService(cfg, ObserveBackend(), clock=lambda: now[0])
    await service.backend.scale_to(1)
    desired = []
    for _ in range(6):
        hot = metrics_message("k8s-pod-a", queue=40, oldest_ms=2000.0)
        service._on_message(dc_replace(hot, received_at=now[0]))
        await service._decide_once()
        desired.append(service.backend.desired)
        now[0] += 1.0
    return desired


def test_observe_backend_exports_desired_size_for_an_external_autoscaler():
    # One reporting worker, backlog over the thresholds: the desired size grows (KEDA/HPA applies it);
    # nothing is started here.
    desired = asyncio.run(_observe_only())
    assert desired[0] == 1 and desired[-1] > 1, desired
