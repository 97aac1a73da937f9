"""One edge device: its own MQTT client id and reply topic, up to W requests in flight.

Per image: edge model (shared runner) → keep the edge label, or publish the kept patches with
response topic = this device's reply topic, correlation data = the request id and message expiry =
the reply timeout, then await the reply. On timeout, a 'busy' refusal or a transport failure the
device re-sends (``edge.retries``, a new request id per attempt); when attempts run out it keeps
the edge label. It never waits longer than ``(retries + 1) × reply_timeout_s`` per image. With
expert routing the first attempt goes to the routed expert's pool and every re-send to the general
pool, so a specialist pool that is down or overloaded costs one timeout, not the image.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from edge_node.engine import EdgeDecision
from edge_node.outcome import OutcomeRecord
from edge_node.runner import EdgeRunner
from edge_node.summary import edge_metrics
from shared.bitmask import pack_mask
from shared.config import Config
from shared.datasets import Sample
from shared.errors import PatchCastError, ProtocolError
from shared.logs import get_logger
from shared.protocol import (
    Availability,
    ErrorReply,
    PatchRequest,
    RegionRequest,
    Reply,
    decode_device_message,
    encode,
)
from shared.routing import ExpertRouter, parse_experts
from shared.topics import Topics
from shared.transport import Incoming, Outgoing, Transport

_RETRYABLE_PUBLISH = ("timeout", "transport")  # too_large etc. would fail again
Answer = Reply | ErrorReply | RegionRequest  # what arrives on a device's reply topic


@dataclass
class ReplyLedger:
    """What arrived on this device's reply topic (the tests check it: exactly once, right device)."""

    answered: collections.Counter[str] = field(default_factory=collections.Counter)  # request id → replies
    late: int = 0  # replies to requests no longer awaited (timed out before the reply came)
    foreign: int = 0  # replies on another topic or for another device's request id
    malformed: int = 0
    regions: collections.Counter[str] = field(default_factory=collections.Counter)  # RegionRequests per request id


class Device:
    def __init__(self, device_id: str, config: Config, runner: EdgeRunner, topics: Topics, model_id: str, *,
                 on_outcome: Callable[[OutcomeRecord], None] | None = None) -> None:
        self.device_id = device_id
        self.config = config
        self.edge = config.edge
        self.runner = runner
        self.topics = topics
        self.reply_topic = topics.reply(device_id)
        self.request_topic = topics.request(model_id, device_id)  # the general server's pool
        # Expert routing (empty table: every request goes to model_id's pool).
        self.router = ExpertRouter(parse_experts(config.routing.experts), fallback=model_id,
                                   top_k=config.routing.top_k, min_share=config.routing.min_share)
        self.metrics_topic = topics.metrics("edge", device_id)
        self.on_outcome = on_outcome
        self.ledger = ReplyLedger()
        self.outcomes: list[OutcomeRecord] = []
        self._pending: dict[bytes, asyncio.Future[Answer]] = {}
        self._in_flight = asyncio.Semaphore(self.edge.max_in_flight)
        self._window: list[OutcomeRecord] = []
        self._window_started = time.monotonic()
        self.log = get_logger("patchcast.edge", device_id=device_id)
        availability = topics.availability("edge", device_id)
        self.transport = Transport(
            config.broker, client_id=device_id, handler=self._on_message,
            will=Outgoing(availability, self._availability("offline"), retain=True),
            birth=[Outgoing(availability, self._availability("online"), retain=True)],
            log_context={"device_id": device_id})
        self._closing = False

    def _availability(self, state: str) -> bytes:
        return encode(Availability("edge", self.device_id, state, time.time()))  # type: ignore[arg-type]

    # ---- replies (event loop, cheap) ---------------------------------------------------------
    def _on_message(self, msg: Incoming) -> None:
        if msg.topic != self.reply_topic:
            self.ledger.foreign += 1
            return
        try:
            reply = decode_device_message(msg.payload)
        except ProtocolError:
            self.ledger.malformed += 1
            return
        rid = reply.request_id
        if rid is None or not rid.startswith(self.device_id + "."):
            if rid is not None:
                self.ledger.foreign += 1
            else:
                self.ledger.malformed += 1
            return
        if isinstance(reply, RegionRequest):
            self.ledger.regions[rid] += 1
        else:
            self.ledger.answered[rid] += 1
        future = self._pending.get(msg.correlation_data or rid.encode())
        if future is None or future.done():
            self.ledger.late += 1
            return
        future.set_result(reply)

    # ---- one image ---------------------------------------------------------------------------
    async def _request(self, request: PatchRequest, topic: str) -> tuple[Answer | None, int, str | None]:
        """Publish one attempt and wait for its answer: (answer or None on timeout, bytes, error code)."""
        key = request.request_id.encode()
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            payload = encode(request)
            async with asyncio.timeout(self.edge.reply_timeout_s):
                await self.transport.publish(topic, payload, qos=1, response_topic=self.reply_topic,
                                             correlation_data=key, expiry_s=self.edge.reply_timeout_s)
                return await future, len(payload), None
        except TimeoutError:
            return None, len(payload), "timeout"
        except PatchCastError as exc:
            return None, 0, exc.code
        finally:
            self._pending.pop(key, None)

    async def process(self, seq: int, sample: Sample) -> OutcomeRecord:
        base_id = f"{self.device_id}.{seq:06d}"
        try:
            decision = await self.runner.infer(sample)
        except PatchCastError as exc:
            self.log.warning("edge_failed", request_id=base_id, code=exc.code, error=exc.message)
            raise
        if not decision.send:
            return self._record(base_id, decision, sample, "edge", decision.edge_label)
        return await self._offload(base_id, decision, sample)

    async def _offload(self, base_id: str, decision: EdgeDecision, sample: Sample) -> OutcomeRecord:
        assert decision.indices is not None and decision.payload is not None
        if decision.downscale is not None:
            return await self._exchange(base_id, decision, sample)
        mask = pack_mask(decision.indices, decision.num_patches)
        topic = (self.topics.request(self.router.route(decision.topk_ids, decision.topk_probs), self.device_id)
                 if self.router.experts else self.request_topic)
        total_bytes = 0
        code: str | None = None
        attempts = 0
        for attempt in range(self.edge.retries + 1):
            if attempt:
                topic = self.request_topic  # an expert pool that timed out or was busy: the general pool retries
            rid = base_id if attempt == 0 else f"{base_id}.r{attempt}"
            sent_at = time.time()
            request = PatchRequest(
                device_id=self.device_id, request_id=rid, height=decision.height, width=decision.width,
                patch_size=decision.patch_size, grid=(decision.height // decision.patch_size,
                                                      decision.width // decision.patch_size),
                mask=mask, codec=self.runner.engine.codec_name, codec_params=self.runner.engine.codec_params,
                payload=decision.payload, topk_ids=decision.topk_ids, topk_probs=decision.topk_probs,
                uncertainty=decision.uncertainty, uncertainty_kind=self.config.gate.kind, sent_at=sent_at,
                label=sample.label, deadline=sent_at + self.edge.reply_timeout_s)
            started = time.monotonic()
            answer, nbytes, code = await self._request(request, topic)
            total_bytes += nbytes
            attempts += 1 if nbytes else 0
            latency_ms = (time.monotonic() - started) * 1000.0
            if isinstance(answer, Reply):
                return self._record(rid, decision, sample, "server", answer.label, nbytes=total_bytes,
                                    latency_ms=latency_ms, attempts=attempts, worker_id=answer.worker_id)
            if isinstance(answer, RegionRequest):  # this device offered no region
                code = "bad_region"
                break
            if isinstance(answer, ErrorReply):
                code = answer.code
                if code != "busy":
                    break
                await asyncio.sleep(self.edge.busy_retry_delay_s)
            elif code not in _RETRYABLE_PUBLISH:
                break
        status = "timeout" if code == "timeout" else "error"
        return self._record(base_id, decision, sample, status, decision.edge_label, nbytes=total_bytes,
                            attempts=attempts, error_code=code)

    async def _exchange(self, rid: str, decision: EdgeDecision, sample: Sample) -> OutcomeRecord:
        """Region retransmission: send the glance; if the worker asks for a region, send it the window's
        full-resolution patches and take the fused answer. If the region leg fails, the glance's answer
        (carried by the RegionRequest) is kept: the server has seen the image, at low resolution."""
        assert decision.payload is not None and decision.pixels is not None and decision.downscale is not None
        assert decision.indices is not None
        engine = self.runner.engine
        sent_at = time.time()
        glance = PatchRequest(
            device_id=self.device_id, request_id=rid, height=decision.height, width=decision.width,
            patch_size=decision.patch_size, grid=(decision.height // decision.patch_size,
                                                  decision.width // decision.patch_size),
            mask=pack_mask(decision.indices, decision.num_patches), codec=engine.codec_name,
            codec_params=engine.codec_params, payload=decision.payload, topk_ids=decision.topk_ids,
            topk_probs=decision.topk_probs, uncertainty=decision.uncertainty,
            uncertainty_kind=self.config.gate.kind, sent_at=sent_at, label=sample.label,
            deadline=sent_at + self.edge.reply_timeout_s, downscale=decision.downscale)
        started = time.monotonic()
        answer, nbytes, code = await self._request(glance, self.request_topic)
        # patches sent, counted in full-resolution patches: the glance is worth N / s² of them
        patches = -(-decision.num_patches // decision.downscale**2)
        asked: RegionRequest | None = None
        sent_region = False
        if isinstance(answer, RegionRequest):
            asked = answer
            region, code = await self._region(rid, asked, decision, sample)
            answer = None
            if region is not None:
                sent_region = True
                patches += region.kept
                answer, more, code = await self._request(region, self.topics.region(asked.worker_id, self.device_id))
                nbytes += more
        latency_ms = (time.monotonic() - started) * 1000.0
        full_bytes = None
        if decision.full_payload_bytes is not None and nbytes:  # the glance's message with the full image instead
            full_bytes = len(encode(glance)) - len(decision.payload) + decision.full_payload_bytes
        kept = min(patches, decision.num_patches)
        if isinstance(answer, Reply):
            return self._record(rid, decision, sample, "server", answer.label, nbytes=nbytes, latency_ms=latency_ms,
                                attempts=1, worker_id=answer.worker_id, patches=kept, full_bytes=full_bytes,
                                region=sent_region)
        if isinstance(answer, ErrorReply):
            code = answer.code
        elif isinstance(answer, RegionRequest):
            code = "bad_region"  # a worker asks once per exchange
        final = asked.topk_ids[0] if asked is not None else decision.edge_label
        return self._record(rid, decision, sample, "timeout" if code == "timeout" else "error", final,
                            nbytes=nbytes, attempts=1, error_code=code, patches=kept, full_bytes=full_bytes,
                            worker_id=None if asked is None else asked.worker_id, region=sent_region)

    async def _region(self, rid: str, asked: RegionRequest, decision: EdgeDecision,
                      sample: Sample) -> tuple[PatchRequest | None, str | None]:
        """The region request a worker asked for, or (None, why not) when the ask does not fit this image."""
        assert decision.pixels is not None
        engine = self.runner.engine
        p = engine.patch_size
        h, w = decision.pixels.shape[:2]
        if asked.request_id != rid or asked.patch_size != p or tuple(asked.grid) != (h // p, w // p):
            self.log.warning("region_request_refused", request_id=rid, worker_id=asked.worker_id,
                             grid=list(asked.grid), patch_size=asked.patch_size)
            return None, "bad_region"
        indices = asked.indices
        payload = await asyncio.to_thread(engine.codec.encode, decision.pixels, indices, p, engine.codec_params)
        sent_at = time.time()
        return PatchRequest(
            device_id=self.device_id, request_id=rid, height=h, width=w, patch_size=p, grid=asked.grid,
            mask=asked.mask, codec=engine.codec_name, codec_params=engine.codec_params, payload=payload,
            topk_ids=decision.topk_ids, topk_probs=decision.topk_probs, uncertainty=decision.uncertainty,
            uncertainty_kind=self.config.gate.kind, sent_at=sent_at, label=sample.label,
            deadline=sent_at + min(self.edge.reply_timeout_s, asked.ttl_s), exchange=asked.exchange), None

    def _record(self, rid: str, decision: EdgeDecision, sample: Sample, status: str, final_label: int, *,
                nbytes: int = 0, latency_ms: float | None = None, attempts: int = 0, worker_id: str | None = None,
                error_code: str | None = None, patches: int | None = None,
                full_bytes: int | None = None, region: bool = False) -> OutcomeRecord:
        record = OutcomeRecord(
            device_id=self.device_id, request_id=rid, status=status,
            patches=0 if status == "edge" else decision.kept if patches is None else patches,
            num_patches=decision.num_patches,
            bytes=nbytes, latency_ms=latency_ms, edge_label=decision.edge_label, final_label=final_label,
            ground_truth=sample.label, uncertainty=decision.uncertainty, error_code=error_code,
            attempts=attempts, worker_id=worker_id, edge_ms=decision.edge_ms, region=region)
        if full_bytes is not None:
            record = OutcomeRecord(**{**record.__dict__, "full_bytes": full_bytes})
        elif attempts and decision.full_payload_bytes is not None and decision.payload is not None:
            # the same attempts, each with the full image as the payload instead of the kept patches
            full = nbytes + attempts * (decision.full_payload_bytes - len(decision.payload))
            record = OutcomeRecord(**{**record.__dict__, "full_bytes": full})
        if status != "edge" and nbytes == 0 and record.patches == 0:
            record = OutcomeRecord(**{**record.__dict__, "patches": 1})  # keep the Outcome invariant
        return record

    # ---- the device loop ---------------------------------------------------------------------
    async def _publish_outcome(self, record: OutcomeRecord) -> None:
        if not self.edge.publish_outcomes:
            return
        try:
            await self.transport.publish(self.metrics_topic, encode(record.to_message()), qos=0)
        except PatchCastError as exc:
            self.log.debug("outcome_publish_failed", code=exc.code)

    async def _handle(self, seq: int, sample: Sample) -> None:
        try:
            record = await self.process(seq, sample)
        except PatchCastError:
            return  # logged in process(); the image is skipped
        finally:
            self._in_flight.release()
        self.outcomes.append(record)
        self._window.append(record)
        if self.on_outcome is not None:
            self.on_outcome(record)
        await self._publish_outcome(record)

    async def run(self, samples: Iterable[Sample], *, stop_at: float | None = None) -> None:
        """Send ``samples`` at ``edge.rate_hz`` (0: as fast as the in-flight window allows), then wait
        for the last answers. ``stop_at`` (monotonic) ends sending early."""
        await self.transport.subscribe(self.reply_topic, qos=1)
        await self.transport.wait_connected()
        interval = 1.0 / self.edge.rate_hz if self.edge.rate_hz > 0 else 0.0
        async with asyncio.TaskGroup() as outer:
            metrics = outer.create_task(self._metrics_loop(), name=f"{self.device_id}-metrics")
            async with asyncio.TaskGroup() as images:
                next_at = time.monotonic()
                for seq, sample in enumerate(samples):
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if stop_at is not None and time.monotonic() >= stop_at:
                        break
                    await self._in_flight.acquire()  # backpressure: at most W images in progress
                    images.create_task(self._handle(seq, sample), name=f"{self.device_id}-{seq}")
                    # A device that fell behind (window full) does not burst to catch up.
                    next_at = max(next_at + interval, time.monotonic())
            metrics.cancel()
        await self._publish_metrics()

    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(self.edge.metrics_interval_s)
            await self._publish_metrics()

    async def _publish_metrics(self) -> None:
        now = time.monotonic()
        message = edge_metrics(self.device_id, self._window, now - self._window_started)
        self._window, self._window_started = [], now
        try:
            await self.transport.publish(self.metrics_topic, encode(message), qos=0)
        except PatchCastError as exc:
            self.log.debug("metrics_publish_failed", code=exc.code)

    async def close(self) -> None:
        await self.transport.close([Outgoing(self.topics.availability("edge", self.device_id),
                                             self._availability("offline"), retain=True)])
