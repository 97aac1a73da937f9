"""An open-loop request generator for the scaling test: publishes PatchRequests at a set rate (like a
fleet of devices, without the edge model) and records each request's end-to-end latency."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from shared import protocol
from shared.config import BrokerConfig
from shared.errors import ProtocolError
from shared.topics import V1
from shared.transport import Incoming, Transport


@dataclass
class LoadGen:
    port: int
    model_id: str
    device: str = "load-0000"
    reply_timeout_s: float = 120.0
    sent: dict[str, float] = field(default_factory=dict)  # request id → monotonic send time
    done: list[tuple[float, float, str]] = field(default_factory=list)  # (received at, latency ms, status)
    statuses: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.transport = Transport(BrokerConfig(port=self.port), client_id=self.device, handler=self._on_reply)
        self._ids = itertools.count()
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        self._template = protocol.build_request(
            device_id=self.device, request_id=f"{self.device}.x", pixels=pixels, indices=np.arange(64),
            patch_size=4, codec="jpeg", codec_params={"q": 90}, topk_ids=(0,), topk_probs=(0.5,),
            uncertainty=1.0, sent_at=time.time())
        self._tasks: set[asyncio.Task[None]] = set()

    def _on_reply(self, msg: Incoming) -> None:
        try:
            reply = protocol.decode_reply(msg.payload)
        except ProtocolError:
            self.statuses["malformed"] += 1
            return
        rid = reply.request_id
        started = self.sent.pop(rid, None) if rid else None
        if started is None:
            self.statuses["unknown"] += 1
            return
        now = time.monotonic()
        status = "ok" if isinstance(reply, protocol.Reply) else f"error:{reply.code}"
        self.statuses[status] += 1
        self.done.append((now, (now - started) * 1000.0, status))

    async def start(self) -> asyncio.Task[None]:
        runner = asyncio.create_task(self.transport.run(), name="loadgen-mqtt")
        await self.transport.subscribe(V1.reply(self.device))
        await self.transport.wait_connected(10)
        return runner

    async def _send_one(self) -> None:
        rid = f"{self.device}.{next(self._ids):07d}"
        now = time.time()
        req = protocol.PatchRequest(**{**self._template.__dict__, "request_id": rid, "sent_at": now,
                                       "deadline": now + self.reply_timeout_s})
        self.sent[rid] = time.monotonic()
        await self.transport.publish(V1.request(self.model_id, self.device), protocol.encode(req), qos=1,
                                     response_topic=V1.reply(self.device), correlation_data=rid.encode(),
                                     expiry_s=self.reply_timeout_s)

    async def send_at(self, rate_hz: float, duration_s: float) -> None:
        """Open loop: one request every 1/rate seconds for duration_s (publishes never block the clock)."""
        start = time.monotonic()
        n = 0
        while (now := time.monotonic()) - start < duration_s:
            due = start + n / rate_hz
            if now < due:
                await asyncio.sleep(due - now)  # not a wait: pacing the load at rate_hz
                continue
            task = asyncio.create_task(self._send_one())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            n += 1

    async def burst(self, n: int) -> None:
        await asyncio.gather(*(self._send_one() for _ in range(n)))

    def outstanding(self) -> int:
        return len(self.sent)

    def window(self, seconds: float, now: float | None = None) -> list[float]:
        now = time.monotonic() if now is None else now
        return [lat for at, lat, status in self.done if now - at <= seconds and status == "ok"]

    def p95(self, seconds: float) -> float | None:
        lat = self.window(seconds)
        return float(np.percentile(lat, 95)) if lat else None

    def timed_out(self) -> int:
        now = time.monotonic()
        return sum(1 for t in self.sent.values() if now - t > self.reply_timeout_s)

    async def close(self) -> None:
        await self.transport.close()
