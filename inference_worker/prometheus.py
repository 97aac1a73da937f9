"""A minimal Prometheus text-format endpoint (``GET /metrics``) for a worker, on asyncio streams.

Enough for a Prometheus scrape or a KEDA/HPA adapter: counters since start and the gauges of the
latest metrics window. No dependency beyond the standard library.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inference_worker.service import InferenceWorker


def render(worker: InferenceWorker) -> str:
    labels = f'worker="{worker.worker_id}",model="{worker.model_id}"'
    stats = worker.stats
    m = worker.last_metrics
    lines = [
        "# TYPE patchcast_worker_requests_total counter",
        f"patchcast_worker_requests_total{{{labels}}} {stats.requests}",
        "# TYPE patchcast_worker_replies_total counter",
        f"patchcast_worker_replies_total{{{labels}}} {stats.replies}",
        "# TYPE patchcast_worker_batches_total counter",
        f"patchcast_worker_batches_total{{{labels}}} {stats.batches}",
        "# TYPE patchcast_worker_queue_depth gauge",
        f"patchcast_worker_queue_depth{{{labels}}} {worker.batcher.depth}",
        "# TYPE patchcast_worker_queue_capacity gauge",
        f"patchcast_worker_queue_capacity{{{labels}}} {worker.config.worker.queue_capacity}",
        "# TYPE patchcast_worker_oldest_queued_seconds gauge",
        f"patchcast_worker_oldest_queued_seconds{{{labels}}} {worker.batcher.oldest_age_s():.6f}",
        "# TYPE patchcast_worker_errors_total counter",
    ]
    lines += [f'patchcast_worker_errors_total{{{labels},code="{code}"}} {n}'
              for code, n in sorted(stats.errors_by_code.items())]
    if m is not None:
        lines += [
            "# TYPE patchcast_worker_busy_fraction gauge",
            f"patchcast_worker_busy_fraction{{{labels}}} {m.busy_fraction:.4f}",
            "# TYPE patchcast_worker_requests_per_second gauge",
            f"patchcast_worker_requests_per_second{{{labels}}} {m.requests_per_s:.3f}",
            "# TYPE patchcast_worker_batch_size_mean gauge",
            f"patchcast_worker_batch_size_mean{{{labels}}} {m.batch_size_mean:.3f}",
            "# TYPE patchcast_worker_service_seconds gauge",
        ]
        quantiles = (("0.5", m.service_ms_p50), ("0.95", m.service_ms_p95), ("0.99", m.service_ms_p99))
        lines += [f'patchcast_worker_service_seconds{{{labels},quantile="{q}"}} {v / 1000.0:.6f}'
                  for q, v in quantiles]
    return "\n".join(lines) + "\n"


async def serve_prometheus(worker: InferenceWorker, port: int, host: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` until cancelled."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5.0):
                request_line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            ok = request_line.split(b" ")[1:2] == [b"/metrics"]
            body = render(worker).encode() if ok else b"not found\n"
            status = b"200 OK" if ok else b"404 Not Found"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                         + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port)
    async with server:
        await server.serve_forever()
