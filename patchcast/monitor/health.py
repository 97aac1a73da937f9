"""Availability check for healthchecks: subscribe to the retained availability topics for a short
while and report which matching services say online."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import replace

from shared import protocol
from shared.config import BrokerConfig
from shared.errors import ProtocolError, TransportError
from shared.topics import Topics
from shared.transport import Incoming, Transport


async def check_availability(broker: BrokerConfig, *, role: str, ident: str | None = None,
                             prefix: str | None = None, timeout_s: float = 3.0,
                             settle_s: float = 0.3, topics: Topics | None = None) -> tuple[set[str], int]:
    """``(online ids, ids seen)`` among retained availability messages of ``role`` that match
    ``ident`` (exact) or ``prefix``. Returns as soon as a match is online, else after ``timeout_s``
    (or ``settle_s`` after connecting when retained messages have arrived: they come at once)."""
    topics = topics or Topics()
    states: dict[str, bool] = {}
    found = asyncio.Event()

    def matches(name: str) -> bool:
        return (ident is None or name == ident) and (prefix is None or name.startswith(prefix))

    def on_message(msg: Incoming) -> None:
        if not msg.payload:
            return
        try:
            _, name = topics.parse_role_id(msg.topic, "availability")
            a = protocol.decode_availability(msg.payload)
        except ProtocolError:
            return
        if matches(name):
            states[name] = a.state == "online"
            if states[name]:
                found.set()

    cfg = replace(broker, connect_timeout_s=min(broker.connect_timeout_s, timeout_s),
                  reconnect_min_s=0.2, reconnect_max_s=1.0)
    transport = Transport(cfg, client_id=f"health-{os.getpid()}", handler=on_message)
    await transport.subscribe(topics.availability_filter(role))
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(transport.run(), name="health-mqtt")
        try:
            async with asyncio.timeout(timeout_s):
                await transport.wait_connected(timeout_s)
                await asyncio.sleep(settle_s)  # retained messages arrive right after SUBACK
                if not any(states.values()):
                    await found.wait()
        except (TimeoutError, TransportError):
            pass
        finally:
            with contextlib.suppress(TransportError):
                await transport.close()
            task.cancel()
    return {name for name, up in states.items() if up}, len(states)
