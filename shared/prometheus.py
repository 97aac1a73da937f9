"""Prometheus text exposition (format 0.0.4) and a tiny asyncio HTTP server for ``/metrics``.

Rendering is pure (:func:`render` over :class:`Family` values); the server only calls a snapshot
function per scrape, so what it serves is always one consistent view. No client library needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from shared.logs import get_logger

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MetricType = Literal["gauge", "counter", "summary", "untyped"]


@dataclass(frozen=True)
class Family:
    name: str
    help: str
    type: MetricType = "gauge"
    samples: tuple[tuple[Mapping[str, str], float], ...] = field(default_factory=tuple)

    def with_sample(self, value: float, **labels: str) -> Family:
        return Family(self.name, self.help, self.type, (*self.samples, (labels, value)))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def process_families() -> list[Family]:
    """The client libraries' standard process metrics this process can report: resident memory (Linux
    ``/proc``) and CPU seconds. A worker's memory is worth watching: see ``shape_buckets`` in
    ``docs/benchmarks.md`` for how a CPU worker's kernel cache once grew it by gigabytes."""
    import os
    import resource

    families: list[Family] = []
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        families.append(Family("process_resident_memory_bytes", "resident memory size in bytes")
                        .with_sample(pages * os.sysconf("SC_PAGE_SIZE")))
    except (OSError, ValueError, IndexError):  # not Linux: leave the family out rather than guess
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF)
    families.append(Family("process_cpu_seconds_total", "user and system CPU time spent in seconds", "counter")
                    .with_sample(round(usage.ru_utime + usage.ru_stime, 6)))
    return families


def render(families: Iterable[Family]) -> str:
    lines: list[str] = []
    for fam in families:
        lines.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.type}")
        for labels, value in fam.samples:
            if labels:
                inner = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in sorted(labels.items()))
                lines.append(f"{fam.name}{{{inner}}} {_value(value)}")
            else:
                lines.append(f"{fam.name} {_value(value)}")
    return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` → ``render(snapshot())``; ``GET /healthz`` → ``ok``. HTTP/1.0, one response per
    connection, bounded request reads: enough for Prometheus and curl, nothing more."""

    def __init__(self, snapshot: Callable[[], Iterable[Family]], host: str, port: int) -> None:
        self._snapshot = snapshot
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self.log = get_logger("patchcast.metrics_http")

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        self.log.info("metrics_endpoint_listening", url=f"http://{self.host}:{self.port}/metrics")

    async def run(self) -> None:
        """Serve until cancelled (for a task in the owner's TaskGroup), then close."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5.0)
            method, _, rest = request.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"method not allowed\n"
            elif path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE, render(self._snapshot()).encode()
            elif path in ("/healthz", "/"):
                status, ctype, body = "200 OK", "text/plain", b"ok\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode()
            writer.write(head + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
