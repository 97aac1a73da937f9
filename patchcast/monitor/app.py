"""The live monitor: one MQTT client feeding an aggregator, a refresh loop producing snapshots, and a
rich ``Live`` (or a single plain-text snapshot with ``once``). Both loops run as named tasks in one
``TaskGroup``; leaving the group cancels and awaits them."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable

from rich.console import Console
from rich.live import Live

from patchcast.monitor.errors import first_error
from patchcast.monitor.ingest import Ingest, subscriptions
from patchcast.monitor.render import render, render_text
from patchcast.monitor.state import Aggregator, Snapshot, snapshot_dict
from shared.config import Config
from shared.topics import Topics
from shared.transport import Transport


class MonitorSession:
    """An MQTT subscriber that folds metrics, availability, outcomes and ``$SYS`` into an aggregator.

    Run :meth:`run` as a task; read :meth:`snapshot` whenever a view is needed.
    """

    def __init__(self, cfg: Config, *, title: str | None = None, topics: Topics | None = None,
                 client_id: str | None = None, jpeg_bytes_estimate: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.topics = topics or Topics()
        self.aggregator = Aggregator(cfg.monitor, started_at=clock(),
                                     title=title or f"PatchCast  {cfg.broker.host}:{cfg.broker.port}")
        self.ingest = Ingest(self.aggregator, self.topics, clock=clock,
                             jpeg_bytes_estimate=jpeg_bytes_estimate)
        ident = client_id or f"monitor-{socket.gethostname()}-{os.getpid()}"
        self.transport = Transport(cfg.broker, client_id=ident[:64], handler=self.ingest)

    async def run(self) -> None:
        for topic_filter in subscriptions(self.topics, sys_topics=self.cfg.monitor.sys_topics):
            await self.transport.subscribe(topic_filter, qos=0 if topic_filter.startswith("$SYS") else 1)
        await self.transport.run()

    async def wait_connected(self) -> None:
        """Until connected and subscribed (TransportError after the broker's connect timeout)."""
        await self.transport.wait_connected()

    def snapshot(self) -> Snapshot:
        return self.aggregator.snapshot(self.clock())

    async def close(self) -> None:
        await self.transport.close()


async def run_monitor(cfg: Config, *, once_s: float | None = None, console: Console | None = None,
                      as_json: bool = False) -> Snapshot | None:
    """``once_s``: collect that long, print one plain snapshot and return it; else run Live until
    cancelled (Ctrl-C)."""
    try:
        return await _run(cfg, once_s, console or Console(), as_json)
    except BaseExceptionGroup as group:
        error = first_error(group)
        if error is None:
            raise
        raise error from group


async def _run(cfg: Config, once_s: float | None, console: Console, as_json: bool) -> Snapshot | None:
    session = MonitorSession(cfg)
    result: Snapshot | None = None
    async with asyncio.TaskGroup() as tg:
        mqtt = tg.create_task(session.run(), name="monitor-mqtt")
        try:
            if once_s is not None:
                await session.wait_connected()
                await asyncio.sleep(once_s)
                result = session.snapshot()
                if as_json:
                    print(json.dumps(snapshot_dict(result), indent=2))
                else:
                    print(render_text(result, width=max(80, min(console.width, 120))), end="")
            else:
                await _live(session, console, cfg.monitor.refresh_s)
        finally:
            await session.close()
            mqtt.cancel()
    return result


async def _live(session: MonitorSession, console: Console, refresh_s: float) -> None:
    with Live(render(session.snapshot(), width=console.width), console=console, auto_refresh=False,
              redirect_stdout=False, redirect_stderr=False) as live:
        while True:
            await asyncio.sleep(refresh_s)
            live.update(render(session.snapshot(), width=console.width), refresh=True)
