"""One edge device: its own MQTT client id and reply topic, up to W requests in flight.

Per image: edge model (shared runner) → keep the edge label, or publish the kept patches with
response topic = this device's reply topic, correlation data = the request id and message expiry =
the time left to the image's deadline, then await the reply.

Delivery (docs/reliability.md): an attempt that gets no reply within ``edge.reply_timeout_s``, or a
'busy' refusal, is re-sent under the **same request id** (``edge.retries`` times, jittered
exponential backoff), so a worker that already answered it answers again from its memory instead
of computing it twice. A publish that fails because the broker is away is tried again, waiting for
the reconnect, and one that reached no worker (PUBACK "no matching subscribers": the pool is down,
or not subscribed again yet after a broker restart) is re-sent after the backoff; neither counts
as a re-send. Whichever reply comes first is the image's answer:
later replies to it are counted (``ReplyLedger.duplicate``) and dropped, so the application sees
exactly one final answer per image. At the image's deadline (``edge.deadline_s``, carried in the
request) the device keeps the edge label. With expert routing the first attempt goes to the routed
expert's pool and every re-send to the general pool, so a specialist pool that is down or
overloaded costs one timeout, not the image (a top-up's first message too, see :meth:`Device._exchange`).
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

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
    OutcomeStatus,
    PatchRequest,
    RegionRequest,
    Reply,
    decode_device_message,
    encode,
)
from shared.routing import ExpertRouter, parse_experts
from shared.topics import Topics
from shared.transport import NO_SUBSCRIBERS, Incoming, Outgoing, Transport

_RETRYABLE_PUBLISH = ("timeout", "transport")  # too_large etc. would fail again
Answer = Reply | ErrorReply | RegionRequest  # what arrives on a device's reply topic


_FINISHED_KEPT = 4096  # request ids of finished images remembered per device, to tell duplicates from late replies


@dataclass
class ReplyLedger:
    """What arrived on this device's reply topic (the tests check it: exactly once, right device)."""

    answered: collections.Counter[str] = field(default_factory=collections.Counter)  # request id → replies
    late: int = 0  # replies to images no longer awaited (kept the edge label at their deadline)
    duplicate: int = 0  # further Replies to an image already answered (re-sends answered twice): dropped
    foreign: int = 0  # replies on another topic or for another device's request id
    malformed: int = 0
    regions: collections.Counter[str] = field(default_factory=collections.Counter)  # RegionRequests per request id


@dataclass(eq=False)
class _Awaiting:
    """The answers that came for one request id while its image waits: the first Reply is final; an
    ErrorReply or RegionRequest is handed to the attempt that waits (``other``)."""

    reply: Reply | None = None
    other: ErrorReply | RegionRequest | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self, seconds: float) -> None:
        """Until an answer is here or ``seconds`` have passed."""
        if self.reply is not None or self.other is not None or seconds <= 0:
            return
        self.wake.clear()
        try:
            async with asyncio.timeout(seconds):
                await self.wake.wait()
        except TimeoutError:
            pass


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
        self.started = 0  # images taken in; each ends as exactly one outcome (or an edge-model failure, logged)
        self._pending: dict[bytes, _Awaiting] = {}
        self._finished: collections.OrderedDict[str, bool] = collections.OrderedDict()  # request id → server answered
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
        self._stopping = False
        self._prepared = False

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
        awaiting = self._pending.get(msg.correlation_data or rid.encode())
        if awaiting is None:
            if isinstance(reply, Reply) and self._finished.get(rid):
                self.ledger.duplicate += 1  # a re-send answered too: the application already has its answer
            else:
                self.ledger.late += 1
            return
        if isinstance(reply, Reply):
            if awaiting.reply is not None:
                self.ledger.duplicate += 1
                return
            awaiting.reply = reply
        else:
            awaiting.other = reply
        awaiting.wake.set()

    def _await(self, rid: str) -> _Awaiting:
        awaiting = _Awaiting()
        self._pending[rid.encode()] = awaiting
        return awaiting

    def _done_waiting(self, rid: str, answered: bool) -> None:
        self._pending.pop(rid.encode(), None)
        self._finished[rid] = answered or self._finished.get(rid, False)
        while len(self._finished) > _FINISHED_KEPT:
            self._finished.popitem(last=False)

    def _backoff(self, resend: int) -> float:
        """Jittered exponential backoff before re-send number ``resend`` (1, 2, …)."""
        return self.edge.retry_backoff_s * 2 ** min(resend - 1, 10) * random.uniform(0.5, 1.0)

    # ---- one image ---------------------------------------------------------------------------
    async def _request(self, request: PatchRequest, topic: str, wait_s: float, *,
                       no_workers_ends: bool = False) -> tuple[Answer | None, int, str | None]:
        """One attempt of an exchange leg: publish and wait up to ``wait_s`` for its answer
        (answer or None, bytes, error code). ``no_workers_ends``: a publish that reached no worker
        ends the attempt at once (code ``no_workers``) instead of waiting out ``wait_s``."""
        rid = request.request_id
        awaiting = self._await(rid)
        answered = False
        payload = encode(request)
        try:
            async with asyncio.timeout(wait_s):
                reason = await self.transport.publish(topic, payload, qos=1, response_topic=self.reply_topic,
                                                      correlation_data=rid.encode(), expiry_s=wait_s)
            if no_workers_ends and reason == NO_SUBSCRIBERS:
                return None, len(payload), "no_workers"
            await awaiting.wait(wait_s)
            answer = awaiting.reply or awaiting.other
            answered = isinstance(answer, Reply)
            return answer, len(payload), None if answer is not None else "timeout"
        except TimeoutError:
            return None, len(payload), "timeout"
        except PatchCastError as exc:
            return None, 0, exc.code
        finally:
            self._done_waiting(rid, answered)

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

    def patch_request(self, rid: str, decision: EdgeDecision, sample: Sample, mask: bytes, sent_at: float,
                      deadline: float) -> PatchRequest:
        """One attempt's request for the kept patches of ``decision`` (``mask``: its packed indices)."""
        assert decision.payload is not None
        engine = self.runner.engine
        return PatchRequest(
            device_id=self.device_id, request_id=rid, height=decision.height, width=decision.width,
            patch_size=decision.patch_size, grid=(decision.height // decision.patch_size,
                                                  decision.width // decision.patch_size),
            mask=mask, codec=engine.codec_name, codec_params=engine.codec_params, payload=decision.payload,
            topk_ids=decision.topk_ids, topk_probs=decision.topk_probs, uncertainty=decision.uncertainty,
            uncertainty_kind=self.config.gate.kind, sent_at=sent_at, label=sample.label, deadline=deadline,
            offer=None if decision.offer is None else pack_mask(decision.offer, decision.num_patches))

    async def _offload(self, base_id: str, decision: EdgeDecision, sample: Sample) -> OutcomeRecord:
        assert decision.indices is not None and decision.payload is not None
        if decision.downscale is not None or decision.offer is not None:
            return await self._exchange(base_id, decision, sample)
        mask = pack_mask(decision.indices, decision.num_patches)
        topic = self._routed_topic(decision)
        rid = base_id
        budget = self.edge.image_deadline_s
        deadline = time.monotonic() + budget  # the image's deadline, from its first publish
        wall_deadline = time.time() + budget
        total_bytes = 0
        code: str | None = None
        attempts = 0  # requests the broker accepted
        delivered = 0  # … and delivered to a pool (edge.retries bounds the re-sends of these)
        tries = 0  # publishes tried (one that failed or reached no worker is tried again without counting)
        first_sent: float | None = None
        awaiting = self._await(rid)
        try:
            while awaiting.reply is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    code = "timeout"
                    break
                if delivered > self.edge.retries:  # every attempt sent and the last one refused
                    break
                if tries:
                    delay = self._backoff(tries)
                    if code == "busy":
                        delay = max(delay, self.edge.busy_retry_delay_s)
                    await awaiting.wait(min(delay, remaining))  # a reply to an earlier attempt ends the wait
                    if awaiting.reply is not None:
                        break
                    awaiting.other = None
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        code = "timeout"
                        break
                    topic = self.request_topic  # an expert pool that timed out or was busy: the general pool retries
                tries += 1
                sent_at = time.time()
                payload = encode(self.patch_request(rid, decision, sample, mask, sent_at, wall_deadline))
                if first_sent is None:
                    first_sent = time.monotonic()
                try:
                    # While the broker is away this waits for the reconnect (bounded by the deadline).
                    async with asyncio.timeout(remaining):
                        reached = await self.transport.publish(
                            topic, payload, qos=1, response_topic=self.reply_topic, correlation_data=rid.encode(),
                            expiry_s=remaining) != NO_SUBSCRIBERS
                except TimeoutError:
                    code = "timeout"
                    continue
                except PatchCastError as exc:
                    code = exc.code
                    if code not in _RETRYABLE_PUBLISH:
                        break
                    continue
                attempts += 1
                total_bytes += len(payload)
                if not reached:  # no worker subscribed (a pool down, or not back yet after a broker restart)
                    code = "no_workers"
                    continue
                delivered += 1
                remaining = deadline - time.monotonic()
                last = delivered > self.edge.retries
                await awaiting.wait(remaining if last else min(self.edge.reply_timeout_s, remaining))
                if awaiting.reply is not None:
                    break
                answer, awaiting.other = awaiting.other, None
                if isinstance(answer, RegionRequest):  # this device offered no region
                    code = "bad_region"
                    break
                if isinstance(answer, ErrorReply):
                    code = answer.code
                    if code != "busy":
                        break
                    continue
                code = "timeout"
        finally:
            self._done_waiting(rid, awaiting.reply is not None)
        reply = awaiting.reply
        latency_ms = None if first_sent is None else (time.monotonic() - first_sent) * 1000.0
        if reply is not None:
            return self._record(rid, decision, sample, "server", reply.label, nbytes=total_bytes,
                                latency_ms=latency_ms, attempts=attempts, worker_id=reply.worker_id,
                                sent_at=first_sent)
        status: OutcomeStatus = "timeout" if code == "timeout" else "error"
        return self._record(base_id, decision, sample, status, decision.edge_label, nbytes=total_bytes,
                            attempts=attempts, error_code=code, sent_at=first_sent)

    def _routed_topic(self, decision: EdgeDecision) -> str:
        """The request topic of the pool expert routing names for this image (the general pool's without
        routing.experts)."""
        if not self.router.experts:
            return self.request_topic
        return self.topics.request(self.router.route(decision.topk_ids, decision.topk_probs), self.device_id)

    async def _exchange(self, rid: str, decision: EdgeDecision, sample: Sample) -> OutcomeRecord:
        """Region retransmission: send the glance; if the worker asks for a region, send it the window's
        full-resolution patches and take the fused answer. If the region leg fails, the glance's answer
        (carried by the RegionRequest) is kept: the server has seen the image, at low resolution.

        The server's top-up is the same exchange: the first message is the attention-chosen patches with
        the offer, the second the offered patches the worker asked for; if that leg fails, the answer on
        the first patches (carried by the RegionRequest) is kept. With expert routing the first message
        goes to the routed expert's pool (its worker then asks, and answers, itself); one that reaches no
        worker there, gets no answer within ``edge.reply_timeout_s`` or is refused ``busy`` goes once to
        the general pool."""
        assert decision.payload is not None and decision.pixels is not None and decision.indices is not None
        engine = self.runner.engine
        sent_at = time.time()
        if decision.downscale is None:  # the top-up
            glance = self.patch_request(rid, decision, sample, pack_mask(decision.indices, decision.num_patches),
                                        sent_at, sent_at + self.edge.image_deadline_s)
        else:
            glance = PatchRequest(
                device_id=self.device_id, request_id=rid, height=decision.height, width=decision.width,
                patch_size=decision.patch_size, grid=(decision.height // decision.patch_size,
                                                      decision.width // decision.patch_size),
                mask=pack_mask(decision.indices, decision.num_patches), codec=engine.codec_name,
                codec_params=engine.codec_params, payload=decision.payload, topk_ids=decision.topk_ids,
                topk_probs=decision.topk_probs, uncertainty=decision.uncertainty,
                uncertainty_kind=self.config.gate.kind, sent_at=sent_at, label=sample.label,
                deadline=sent_at + self.edge.image_deadline_s, downscale=decision.downscale)
        started = time.monotonic()
        attempts = 1  # of the first message
        expert = self._routed_topic(decision) if decision.downscale is None else self.request_topic
        if expert != self.request_topic:  # a top-up routed to an expert pool: the general pool if it fails
            answer, nbytes, code = await self._request(
                glance, expert, min(self.edge.reply_timeout_s, self.edge.image_deadline_s), no_workers_ends=True)
            left = self.edge.image_deadline_s - (time.monotonic() - started)
            if left > 0 and (answer is None or (isinstance(answer, ErrorReply) and answer.code == "busy")):
                answer, more, code = await self._request(glance, self.request_topic, left)
                nbytes += more
                attempts += 1
        else:
            answer, nbytes, code = await self._request(glance, self.request_topic, self.edge.image_deadline_s)
        # patches sent, counted in full-resolution patches: the glance is worth N / s² of them
        patches = decision.kept if decision.downscale is None else -(-decision.num_patches // decision.downscale**2)
        asked: RegionRequest | None = None
        sent_region = False
        if isinstance(answer, RegionRequest):
            asked = answer
            region, code = await self._region(rid, asked, decision, sample)
            answer = None
            if region is not None:
                sent_region = True
                patches += region.kept
                answer, more, code = await self._request(region, self.topics.region(asked.worker_id, self.device_id),
                                                         min(self.edge.image_deadline_s, asked.ttl_s))
                nbytes += more
        latency_ms = (time.monotonic() - started) * 1000.0
        full_bytes = None
        if decision.full_payload_bytes is not None and nbytes:  # the glance's message with the full image instead
            full_bytes = attempts * (len(encode(glance)) - len(decision.payload) + decision.full_payload_bytes)
        kept = min(patches, decision.num_patches)
        if isinstance(answer, Reply):
            return self._record(rid, decision, sample, "server", answer.label, nbytes=nbytes, latency_ms=latency_ms,
                                attempts=attempts, worker_id=answer.worker_id, patches=kept, full_bytes=full_bytes,
                                region=sent_region)
        if isinstance(answer, ErrorReply):
            code = answer.code
        elif isinstance(answer, RegionRequest):
            code = "bad_region"  # a worker asks once per exchange
        final = asked.topk_ids[0] if asked is not None else decision.edge_label
        return self._record(rid, decision, sample, "timeout" if code == "timeout" else "error", final,
                            nbytes=nbytes, attempts=attempts, error_code=code, patches=kept, full_bytes=full_bytes,
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
        if decision.offer is not None and (decision.indices is None or np.setdiff1d(
                indices, np.setdiff1d(decision.offer, decision.indices)).size):
            self.log.warning("region_request_refused", request_id=rid, worker_id=asked.worker_id,
                             reason="asks for patches sent already or not offered")
            return None, "bad_region"
        payload = await asyncio.to_thread(engine.codec.encode, decision.pixels, indices, p, engine.codec_params)
        sent_at = time.time()
        return PatchRequest(
            device_id=self.device_id, request_id=rid, height=h, width=w, patch_size=p, grid=asked.grid,
            mask=asked.mask, codec=engine.codec_name, codec_params=engine.codec_params, payload=payload,
            topk_ids=decision.topk_ids, topk_probs=decision.topk_probs, uncertainty=decision.uncertainty,
            uncertainty_kind=self.config.gate.kind, sent_at=sent_at, label=sample.label,
            deadline=sent_at + min(self.edge.image_deadline_s, asked.ttl_s), exchange=asked.exchange), None

    def _record(self, rid: str, decision: EdgeDecision, sample: Sample, status: OutcomeStatus, final_label: int, *,
                nbytes: int = 0, latency_ms: float | None = None, attempts: int = 0, worker_id: str | None = None,
                error_code: str | None = None, patches: int | None = None,
                full_bytes: int | None = None, region: bool = False, sent_at: float | None = None) -> OutcomeRecord:
        kept = 0 if status == "edge" else decision.kept if patches is None else patches
        if status != "edge" and nbytes == 0 and kept == 0:
            kept = 1  # keep the Outcome invariant: only an image kept at the edge sent nothing
        if status == "edge":
            full_bytes = None  # nothing was sent, so there is no full-image cost
        elif full_bytes is None and attempts and decision.full_payload_bytes is not None \
                and decision.payload is not None:
            # the same attempts, each with the full image as the payload instead of the kept patches
            full_bytes = nbytes + attempts * (decision.full_payload_bytes - len(decision.payload))
        return OutcomeRecord(
            device_id=self.device_id, request_id=rid, at=time.time(), status=status, patches=kept,
            num_patches=decision.num_patches, bytes=nbytes, latency_ms=latency_ms, edge_label=decision.edge_label,
            final_label=final_label, ground_truth=sample.label, uncertainty=decision.uncertainty,
            error_code=error_code, full_bytes=full_bytes, attempts=attempts, worker_id=worker_id,
            edge_ms=decision.edge_ms, region=region, sent_at=sent_at, done_at=time.monotonic())

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

    async def prepare(self) -> None:
        """Register the reply subscription, so that it goes out with the connection (once)."""
        if not self._prepared:
            await self.transport.subscribe(self.reply_topic, qos=1)
            self._prepared = True

    async def run(self, samples: Iterable[Sample], *, stop_at: float | None = None) -> None:
        """Send ``samples`` at ``edge.rate_hz`` (0: as fast as the in-flight window allows), then wait
        for the last answers. ``stop_at`` (monotonic) ends sending early."""
        await self.prepare()
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
                    if self._stopping or (stop_at is not None and time.monotonic() >= stop_at):
                        break
                    await self._in_flight.acquire()  # backpressure: at most W images in progress
                    self.started += 1
                    images.create_task(self._handle(seq, sample), name=f"{self.device_id}-{seq}")
                    # A device that fell behind (window full) does not burst to catch up.
                    next_at = max(next_at + interval, time.monotonic())
            metrics.cancel()
        await self._publish_metrics()

    def stop_sending(self) -> None:
        """Take no new image and end the metrics loop: a stop that holds even where a cancellation is
        lost (see :func:`edge_node.fleet.cancel_until_done`)."""
        self._stopping = True

    async def _metrics_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.edge.metrics_interval_s)
            if self._window:  # an idle device stays quiet: ten thousand of them would flood the broker
                await self._publish_metrics()

    async def _publish_metrics(self) -> None:
        now = time.monotonic()
        message = edge_metrics(self.device_id, self._window, now - self._window_started)
        self._window, self._window_started = [], now
        try:
            await self.transport.publish(self.metrics_topic, encode(message), qos=0)
        except PatchCastError as exc:
            self.log.debug("metrics_publish_failed", code=exc.code)

    async def close(self) -> bool:
        """Say goodbye (retained offline availability) and stop reconnecting; True when the broker has it."""
        return await self.transport.close([Outgoing(self.topics.availability("edge", self.device_id),
                                             self._availability("offline"), retain=True)])
