"""The ``/metrics`` HTTP endpoint: a tiny asyncio server over :mod:`shared.prometheus` rendering.

It calls its snapshot function once per scrape, so what it serves is always one consistent view.
One of shared's runtime modules (an asyncio server; see :mod:`shared`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

from shared.logs import get_logger
from shared.prometheus import CONTENT_TYPE, Family, render


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
