"""The inference worker: one process, one MQTT client, one inference thread.

Flow of one request::

    shared subscription ─▶ _on_message (event loop, cheap): decode + validate the msgpack request,
        check topic/geometry, start pixel decoding on the decoder (threads, or child processes with
        worker.decode_processes), submit to the batcher (bounded: full → 'busy' error reply)
    batcher ─▶ inference thread (inference_worker.inference.BatchInference): wait for the batch's
        pixels, embed, forward (packed/padded), top-k; with worker.engine_process (on for CUDA) the
        embed and forward run in a child process
    ─▶ outbox ─▶ sender: Reply/ErrorReply to the request's response topic with its correlation data

Nothing a message holds can stop the worker: every failure stays that message's, becomes an
ErrorReply with the error's code and a count (logged at most every few seconds per code), and a
failure to publish a reply is counted the same way. Replies go to the reply topic of the device that
the request topic names (the broker authenticated its publisher), never to a topic the message
chooses: a request must name exactly that topic as its MQTT response topic, carry one of its device's
own request ids and bounded MQTT properties (docs/protocol.md), or it is refused. A request without a
response topic is refused on the worker's errors topic. A request whose deadline the queue ahead
cannot meet is refused ``busy`` at once; one whose deadline passes while it waits is dropped before
its batch runs (counted ``expired``), and a result ready only after its deadline is not published
(counted ``late``): nobody waits for it.
Background loops run in one TaskGroup with task names; :meth:`InferenceWorker.stop` (SIGTERM,
SIGINT) unsubscribes, drains the queue within ``shutdown_grace_s``, publishes offline
availability and leaves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import secrets
import signal
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool as BrokenExecutor

import numpy as np
import torch

from inference_worker.batcher import Batcher
from inference_worker.decoders import new_decoder
from inference_worker.dedupe import RecentRequests, Seen, dedupe_key
from inference_worker.engine import ServerEngine, configure_threads
from inference_worker.engine_process import EngineClient, EngineProcess
from inference_worker.exchanges import Exchange, ExchangeTable
from inference_worker.inference import BatchInference, inference_pool
from inference_worker.prometheus import WorkerSnapshot, worker_families
from inference_worker.stats import WorkerStats
from inference_worker.work import OutboxEntry, Prediction, WorkItem
from shared.bitmask import pack_mask
from shared.config import Config
from shared.errors import (
    BadGeometryError,
    BadTopicError,
    BusyError,
    InferenceError,
    PatchCastError,
)
from shared.heap import retain_freed_memory, settle_gc
from shared.logs import get_logger
from shared.metrics_http import MetricsServer
from shared.models import LoadedModel, build_model
from shared.naming import default_worker_id, model_id
from shared.percentiles import percentiles
from shared.precision import probe_once, resolve
from shared.protocol import (
    DEFAULT_LIMITS,
    Availability,
    ErrorReply,
    Message,
    PatchRequest,
    ProtocolLimits,
    RegionRequest,
    Reply,
    WorkerMetrics,
    check_properties,
    check_request_owner,
    check_response_topic,
    decode_patches,
    decode_request,
    encode,
)
from shared.region import decode_global
from shared.topics import V1, Topics
from shared.transport import Incoming, Outgoing, Transport

_DECODER_RESTART_S = 5.0  # a broken decoder process pool is replaced at most this often
_REFUSAL_LOG_EVERY_S = 5.0  # refusals are logged at most this often per code (with the count since)
# A reply published later than this before its request's deadline would reach the device after it:
# it is not published (the broker hop and the device's own loop take a few ms on a LAN).
DELIVERY_MARGIN_S = 0.02


class InferenceWorker:
    """A pool member. Build with a loaded server model; run :meth:`run` until :meth:`stop`."""

    def __init__(self, config: Config, server: LoadedModel, *, worker_id: str | None = None,
                 topics: Topics = V1, limits: ProtocolLimits = DEFAULT_LIMITS,
                 infer_pool: ThreadPoolExecutor | None = None, engine: EngineClient | None = None) -> None:
        """``infer_pool``: the single-thread executor to infer on (the worker takes it over and shuts it
        down); by default a new one. See :func:`inference_pool` for why torch work stays on it.
        ``engine``: this worker's link to a shared engine process (``worker.frontends``); by default the
        worker builds its own engine."""
        self.config = config
        self.worker_id = worker_id or config.worker.worker_id or default_worker_id()
        self.model_id = model_id(config.models.server, config.models.model_id)
        self.topics = topics
        self.limits = limits
        self._infer_pool = infer_pool or inference_pool()
        try:
            self.engine: ServerEngine | EngineProcess | EngineClient
            if engine is not None:
                self.engine = engine
                self.precision = engine.precision
            elif config.worker.uses_engine_process:
                # The model runs in a child process (inference_worker.engine_process); this one never
                # touches the device. Started from the inference thread, which then waits on its pipe.
                self.engine = self._infer_pool.submit(
                    EngineProcess, server, config.batching, config.worker.precision,
                    prepack=config.worker.prepack_weights, device=config.worker.device,
                    threads=config.worker.threads).result()
                self.precision = self.engine.precision
            else:
                # The precision probe and the bf16 weight copy run torch kernels: on the inference thread too.
                self.precision = self._infer_pool.submit(resolve, config.worker.precision,
                                                         config.worker.device).result()
                self.engine = self._infer_pool.submit(ServerEngine, server, config.batching, self.precision,
                                                      prepack=config.worker.prepack_weights,
                                                      device=config.worker.device).result()
        except BaseException:
            self._infer_pool.shutdown(wait=False, cancel_futures=True)
            raise
        self.stats = WorkerStats()
        self.log = get_logger("patchcast.worker", worker_id=self.worker_id, model=self.model_id)
        self.subscription = topics.worker_subscription(config.worker.group, self.model_id)
        self.region = config.region
        self.region_subscription = topics.region_filter(self.worker_id)
        self.exchanges = ExchangeTable(config.region.max_pending, config.region.timeout_s)
        self.recent = RecentRequests.from_config(config.worker)  # re-sends: answered again, not recomputed
        self._exchange_prefix = f"x{secrets.token_hex(3)}."  # exchange ids are unique per worker start
        self._exchange_seq = 0
        availability = topics.availability("worker", self.worker_id)
        self.transport = Transport(
            config.broker, client_id=f"worker-{self.worker_id}", handler=self._on_message,
            will=Outgoing(availability, self._availability("offline"), qos=1, retain=True),
            birth=[Outgoing(availability, self._availability("online"), qos=1, retain=True)],
            max_in_flight=config.worker.max_publish_in_flight, log_context={"worker_id": self.worker_id})
        self._decode_pool = new_decoder(self.config.worker)
        self._decoder_replaced_at = -math.inf
        self.decoder_replacements = 0  # decoder process pools replaced after one broke
        self.batcher: Batcher[WorkItem, Prediction] = Batcher(
            BatchInference(self.engine, config.region), config.batching, capacity=config.worker.queue_capacity,
            executor=self._infer_pool, on_batch=self.stats.on_batch, admission=config.worker.admission)
        # Replies plus refusals: bounded by the queue capacity and the broker's inflight window in
        # normal operation; the cap only matters under a flood of unreadable messages.
        self._outbox: asyncio.Queue[OutboxEntry] = asyncio.Queue(
            maxsize=4 * config.worker.queue_capacity + 64)
        self._publish_slots = asyncio.Semaphore(config.worker.max_publish_in_flight)
        self._stop = asyncio.Event()
        self._accepting = True
        self._refused_since_log: collections.Counter[str] = collections.Counter()
        self._refused_logged_at: dict[str, float] = {}
        self._sending = 0  # replies being published right now
        self._sent_all = asyncio.Event()
        self._sent_all.set()
        self.ready = asyncio.Event()  # set once subscribed: requests are being served
        self.last_metrics: WorkerMetrics | None = None

    # ---- wire helpers ------------------------------------------------------------------------
    def _availability(self, state: str) -> bytes:
        return encode(Availability("worker", self.worker_id, state, time.time()))  # type: ignore[arg-type]

    def _refuse(self, msg: Incoming, reply_to: str | None, correlation: bytes | None, request_id: str | None,
                exc: PatchCastError | Exception) -> None:
        """Answer a request that will not be served (to ``reply_to``, the sending device's own reply
        topic, or without one to the worker's errors topic, where it stays visible); never raises."""
        self._count_failure(getattr(exc, "code", "internal"), exc, msg.topic, request_id)
        reply = ErrorReply.from_error(exc, request_id=request_id, worker_id=self.worker_id)
        self._post(OutboxEntry(reply_to or self.topics.errors("worker", self.worker_id), correlation, reply))

    def _count_failure(self, code: str, exc: BaseException, topic: str, request_id: str | None,
                       event: str = "requests_failed") -> None:
        """Count a failure by its code; log it rate-limited per code (a flood of busy or malformed
        messages, or one failed batch of 32, must not flood the logs). Never raises."""
        code = code if isinstance(code, str) else "internal"
        self.stats.on_error(code)
        self._refused_since_log[code] += 1
        now = time.monotonic()
        if now - self._refused_logged_at.get(code, -math.inf) >= _REFUSAL_LOG_EVERY_S:
            self.log.warning(event, code=code, count=self._refused_since_log[code],
                             last_error=f"{type(exc).__name__}: {exc}"[:300], last_topic=topic[:200],
                             last_request_id=request_id, queue_capacity=self.config.worker.queue_capacity)
            self._refused_since_log[code], self._refused_logged_at[code] = 0, now

    def _post(self, entry: OutboxEntry) -> None:
        try:
            self._outbox.put_nowait(entry)
        except asyncio.QueueFull:
            self.stats.on_error("reply_dropped")

    # ---- intake (event loop; must stay cheap) ------------------------------------------------
    def _on_message(self, msg: Incoming) -> None:
        """Every message, on the event loop. Never raises: whatever goes wrong is that message's."""
        try:
            self._intake(msg)
        except Exception as exc:  # a bug met by one message: counted and logged, the next one is served
            self._count_failure("internal", exc, msg.topic, None, event="intake_failed")

    def _intake(self, msg: Incoming) -> None:
        request_id: str | None = None
        exchange: Exchange | None = None
        reply_to: str | None = None  # the sending device's own reply topic, once the topic names it
        correlation: bytes | None = None  # echoed only once its length is checked
        try:
            region_topic = self.topics.parse_region(msg.topic)
            if region_topic is not None and region_topic[0] != self.worker_id:
                raise BadTopicError(f"region topic {msg.topic[:200]!r} is not this worker's")
            _level, device = self.topics.parse_request(msg.topic) if region_topic is None else region_topic
            own_reply = self.topics.reply(device)
            if msg.response_topic is not None:  # no response topic: the device asked for no answer
                reply_to = own_reply
            check_properties(msg.correlation_data, msg.user_properties, self.limits)
            correlation = msg.correlation_data
            check_response_topic(msg.response_topic, own_reply)
            request = decode_request(msg.payload, limits=self.limits)
            request_id = request.request_id
            check_request_owner(request, device)
            self._check_geometry(request)
            if (region_topic is None) != (request.exchange is None):
                raise BadTopicError("a region (a request with an exchange) goes to the worker that asked for it, "
                                    "on its region topic, and only a region does")
            if request.exchange is not None:
                exchange = self.exchanges.claim(request, time.monotonic())  # ProtocolError: unknown, expired, …
            if self._seen_before(reply_to, correlation, request):
                return
            if not self._accepting:
                raise PatchCastError("worker is shutting down", code="shutdown")
            if self.batcher.full:  # refuse before spending a pixel decode on it
                raise BusyError(f"request queue full ({self.config.worker.queue_capacity} waiting)")
        except PatchCastError as exc:
            self._refuse(msg, reply_to, correlation, request_id, exc)
            return
        assert reply_to is not None
        patch_indices = None  # the request's own: unpacked when the batch needs them, off the event loop
        deadline = None
        if request.deadline is not None:  # device wall clock → this host's monotonic clock
            deadline = time.monotonic() + (request.deadline - time.time())
            if deadline <= time.monotonic():  # nobody waits for it (or the device's clock is off): no answer
                self._count_failure("expired", PatchCastError("deadline passed before the request arrived",
                                                              code="expired"), msg.topic, request_id)
                return
        try:
            if request.downscale is not None:
                pixels = self._decode_pool.submit(decode_global, request, self.engine.patch_size)
                patch_indices = np.arange(self.engine.num_patches, dtype=np.int64)
            else:
                pixels = self._decode_pool.submit(decode_patches, request)
        except BrokenExecutor as exc:  # a decoder process died (a crash in an image library)
            self._replace_decoder()
            self._refuse(msg, reply_to, correlation, request_id, InferenceError(f"pixel decoder failed: {exc}"))
            return
        item = WorkItem(request, pixels, patch_indices, reply_to, correlation, msg.received_at, deadline=deadline,
                        offers_region=request.downscale is not None and (
                            self.engine.maps_available or self.region.placement == "centre"),
                        exchange=exchange, offer=None if request.offer is None else request.offered)
        kept = request.kept if patch_indices is None else int(patch_indices.size)
        if exchange is not None and exchange.tokens is not None:  # a top-up: its first patches and these
            tokens = exchange.tokens + kept + 1
        else:
            tokens = (self.engine.num_patches if exchange is not None and self.region.fusion != "probs"
                      else kept) + 1
        try:
            future = self.batcher.submit_nowait(  # admitted only if it can be answered in time
                item, tokens, deadline=None if deadline is None else deadline - DELIVERY_MARGIN_S)
        except BusyError as exc:
            pixels.cancel()
            self._refuse(msg, reply_to, correlation, request_id, exc)
            return
        self.stats.on_request(time.time() - request.sent_at)
        if (key := dedupe_key(request)) is not None:
            self.recent.begin(key, time.monotonic())
        future.add_done_callback(lambda f, it=item: self._on_done(it, f))  # type: ignore[misc]

    def _seen_before(self, reply_to: str | None, correlation: bytes | None, request: PatchRequest) -> bool:
        """A re-send (same device and request id) of a request this worker holds: answered again from
        memory, or dropped while the first is in progress (its reply answers it). inference_worker.dedupe"""
        key = dedupe_key(request)
        if key is None:
            return False
        seen, reply = self.recent.check(key, time.monotonic())
        if seen is Seen.ANSWERED and reply is not None and reply_to is not None:
            self._post(OutboxEntry(reply_to, correlation, reply))
        return seen is not Seen.NEW

    def _check_geometry(self, request: PatchRequest) -> None:
        """The request's image must be this model's input: as sent, or upsampled (a global request)."""
        size, p = self.engine.input_size, self.engine.patch_size
        scale = request.downscale or 1
        if request.patch_size * scale != p or (request.height * scale, request.width * scale) != (size, size):
            shown = f" downscaled by {scale}" if scale > 1 else ""
            raise BadGeometryError(
                f"request is {request.height}×{request.width}{shown} in {request.patch_size}-pixel patches; "
                f"this worker's model takes {size}×{size} in {p}-pixel patches")

    def _ask_for_region(self, item: WorkItem, prediction: Prediction) -> bool:
        """Open an exchange for an uncertain glance and post its RegionRequest; False when the table is
        full (the glance then answers alone)."""
        assert prediction.window is not None and prediction.probs is not None
        request = item.request
        self._exchange_seq += 1
        exchange = Exchange(
            exchange_id=f"{self._exchange_prefix}{self._exchange_seq}", device_id=request.device_id,
            request_id=request.request_id, mask=pack_mask(prediction.window, self.engine.num_patches),
            global_probs=prediction.probs, global_patches=prediction.global_patches,
            expires_at=time.monotonic() + self.region.timeout_s, first_indices=prediction.first_indices)
        if not self.exchanges.open(exchange):
            self.stats.on_region("table_full")
            return False
        self.stats.on_region("asked")
        grid = self.engine.input_size // self.engine.patch_size
        ask = RegionRequest(
            request_id=request.request_id, exchange=exchange.exchange_id, patch_size=self.engine.patch_size,
            grid=(grid, grid), mask=exchange.mask, topk_ids=prediction.topk_ids, topk_probs=prediction.topk_probs,
            uncertainty=prediction.uncertainty, worker_id=self.worker_id, ttl_s=self.region.timeout_s)
        self._post(OutboxEntry(item.response_topic, item.correlation, ask,
                               response_topic=self.topics.region(self.worker_id, request.device_id),
                               deadline=item.deadline))
        return True

    def _on_done(self, item: WorkItem, future: asyncio.Future[Prediction]) -> None:
        try:
            self._answer(item, future)
        except Exception as exc:  # contained like intake failures: one request's, counted
            self._count_failure("internal", exc, item.response_topic, item.request.request_id, event="answer_failed")

    def _answer(self, item: WorkItem, future: asyncio.Future[Prediction]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        rid = item.request.request_id
        if exc is not None:
            if (key := dedupe_key(item.request)) is not None:
                self.recent.forget(key)  # a re-send is served afresh
            code = getattr(exc, "code", "internal")
            self._count_failure(code, exc, item.response_topic, rid)
            if code == "expired":  # its deadline passed while it waited: nobody waits for an answer
                return
            error = exc if isinstance(exc, Exception) else Exception(exc)
            reply = ErrorReply.from_error(error, request_id=rid, worker_id=self.worker_id)
            self._post(OutboxEntry(item.response_topic, item.correlation, reply, arrived=item.arrived,
                                   deadline=item.deadline))
            return
        prediction = future.result()
        if prediction.window is not None and self._accepting and self._ask_for_region(item, prediction):
            return
        if item.exchange is not None:
            self.stats.on_region("answered")
        # The Reply itself is built at publish time so that total_ms covers the wait in the outbox.
        self._post(OutboxEntry(item.response_topic, item.correlation, None, arrived=item.arrived, item=item,
                               prediction=prediction, deadline=item.deadline))

    # ---- pixel decoding ----------------------------------------------------------------------
    def _replace_decoder(self) -> None:
        """A broken decoder process pool fails its pending requests; later ones get a new pool, at
        most once per ``_DECODER_RESTART_S`` (a payload that crashes the decoder must not spin it)."""
        now = time.monotonic()
        if now - self._decoder_replaced_at < _DECODER_RESTART_S:
            return
        self._decoder_replaced_at = now
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._decode_pool = new_decoder(self.config.worker)
        self.decoder_replacements += 1
        self.log.warning("decoder_replaced", replacements=self.decoder_replacements)

    async def _start_decoder(self) -> None:
        """Start every decoder process before serving (each imports numpy and Pillow: ~1 s)."""
        pool = self._decode_pool
        if isinstance(pool, ProcessPoolExecutor):
            await asyncio.gather(*(asyncio.wrap_future(pool.submit(os.getpid))
                                   for _ in range(self.config.worker.decode_processes)))

    # ---- background loops --------------------------------------------------------------------
    def _send(self, entry: OutboxEntry, tg: asyncio.TaskGroup) -> None:
        """Publish one outbox entry: started at once, its PUBACK handled by a callback (no task per reply),
        or, when the transport cannot start it now, by a task that waits. Never raises: a reply that
        cannot be published is counted ``reply_failed`` and logged rate-limited, whatever the cause."""
        try:
            message = self._message(entry)
            if message is None:
                self._sent()
                return
            payload = encode(message, limits=self.limits)
            ack = self.transport.publish_nowait(entry.topic, payload, qos=1, correlation_data=entry.correlation,
                                                response_topic=entry.response_topic,
                                                on_done=lambda done: self._acknowledged(entry, message, done))
        except Exception as exc:  # TransportError (too large), or a bug met by this entry: its own
            self._count_failure("reply_failed", exc, entry.topic, None, event="reply_failed")
            self._sent()
            return
        if ack is None:
            tg.create_task(self._send_waiting(entry, message, payload), name="reply")

    def _message(self, entry: OutboxEntry) -> Message | None:
        """What to publish for ``entry`` (a Reply is built now, so that total_ms covers the wait in the
        outbox); ``None`` when its deadline has passed (a result counted ``late``)."""
        if entry.deadline is not None and time.monotonic() > entry.deadline - DELIVERY_MARGIN_S:
            if entry.message is None or isinstance(entry.message, RegionRequest):  # a result, too late
                self._count_failure("late", PatchCastError("answer ready after the request's deadline",
                                                           code="late"), entry.topic,
                                    entry.item.request.request_id if entry.item else None)
            return None  # (an error reply's code was counted when it was posted)
        message = entry.message
        if message is None and entry.prediction is not None and entry.item is not None:
            p, arrived = entry.prediction, entry.item.arrived
            now = time.monotonic()
            message = Reply(
                request_id=entry.item.request.request_id, label=p.label, topk_ids=p.topk_ids,
                topk_probs=p.topk_probs, queue_ms=max(0.0, (p.batch_started - arrived) * 1000.0),
                infer_ms=p.infer_ms, total_ms=max(0.0, (now - arrived) * 1000.0),
                worker_id=self.worker_id, batch_size=p.batch_size)
            if (key := dedupe_key(entry.item.request)) is not None:
                self.recent.answer(key, message, now)
        if message is None:
            raise PatchCastError("outbox entry without a message or a prediction", code="internal")
        return message

    def _acknowledged(self, entry: OutboxEntry, message: Message, ack: asyncio.Future[int]) -> None:
        error: Exception | None = None
        try:
            self.transport.publish_result(entry.topic, ack)
        except Exception as exc:  # TransportError, RefusedError: this reply's only
            error = exc
        self._published(entry, message, error)

    async def _send_waiting(self, entry: OutboxEntry, message: Message, payload: bytes) -> None:
        error: Exception | None = None
        try:
            await self.transport.publish(entry.topic, payload, qos=1, correlation_data=entry.correlation,
                                         response_topic=entry.response_topic)
        except Exception as exc:  # TransportError, or anything the MQTT client raised: this reply's only
            error = exc
        except BaseException:  # cancelled (shutdown): its slot is freed all the same
            self._sent()
            raise
        self._published(entry, message, error)

    def _published(self, entry: OutboxEntry, message: Message, error: Exception | None) -> None:
        """The end of one entry's publish: a reply's latency counted, or the failure; its slot freed."""
        try:
            if error is not None:
                self._count_failure("reply_failed", error, entry.topic, None, event="reply_failed")
            elif isinstance(message, Reply) and entry.arrived is not None:
                self.stats.on_reply(time.monotonic() - entry.arrived)
        finally:
            self._sent()

    def _sent(self) -> None:
        """One outbox entry is done with (published, failed or dropped): its slot is free."""
        self._publish_slots.release()
        self._sending -= 1
        if self._sending == 0:
            self._sent_all.set()

    async def _sender_loop(self) -> None:
        async with asyncio.TaskGroup() as tg:
            while True:
                entry = await self._outbox.get()
                await self._publish_slots.acquire()
                self._sending += 1
                self._sent_all.clear()
                self._send(entry, tg)
                self._outbox.task_done()

    def metrics_message(self) -> WorkerMetrics:
        now = time.monotonic()
        f = self.stats.drain(now)
        return WorkerMetrics(
            worker_id=self.worker_id, model=self.model_id, at=time.time(), window_s=f.window_s,
            queue_depth=self.batcher.depth, queue_capacity=self.config.worker.queue_capacity,
            oldest_queued_ms=self.batcher.oldest_age_s(now) * 1000.0, requests=f.replies,
            requests_per_s=f.requests_per_s, batches=f.batches, batch_size_mean=f.batch_size_mean,
            batch_size_max=f.batch_size_max, tokens_per_batch_mean=f.tokens_per_batch_mean,
            busy_fraction=f.busy_fraction, service_ms_p50=f.service_p50_ms, service_ms_p95=f.service_p95_ms,
            service_ms_p99=f.service_p99_ms, errors_by_code=f.errors_by_code, arrival_ms_p95=f.arrival_p95_ms)

    def prometheus_snapshot(self) -> WorkerSnapshot:
        """This worker's counters and queue now, for one ``/metrics`` scrape (on the event loop)."""
        stats, recent = self.stats, self.recent.stats
        return WorkerSnapshot(
            worker_id=self.worker_id, model_id=self.model_id, requests=stats.requests, replies=stats.replies,
            batches=stats.batches, queue_depth=self.batcher.depth,
            queue_capacity=self.config.worker.queue_capacity, oldest_queued_s=self.batcher.oldest_age_s(),
            engine_restarts=self.engine.restarts, decoder_replacements=self.decoder_replacements,
            resends_replayed=recent.replayed, resends_dropped=recent.dropped, regions=stats.regions,
            errors_by_code=stats.errors_by_code, last_metrics=self.last_metrics)

    async def _metrics_loop(self) -> None:
        topic = self.topics.metrics("worker", self.worker_id)
        while True:
            await asyncio.sleep(self.config.worker.metrics_interval_s)
            self.last_metrics = self.metrics_message()
            try:
                await self.transport.publish(topic, encode(self.last_metrics), qos=0, retain=True)
            except PatchCastError as exc:
                self.log.warning("metrics_publish_failed", code=exc.code, error=exc.message)

    async def _expiry_loop(self) -> None:
        """Forget exchanges whose region did not come in time (the device answers with the glance)."""
        while True:
            await asyncio.sleep(min(1.0, self.region.timeout_s / 4))
            for _ in range(self.exchanges.expire(time.monotonic())):
                self.stats.on_region("expired")

    async def _subscribe(self) -> None:
        # Registered before the first connect: the transport subscribes, then announces 'online',
        # so online availability means "serving"; it re-subscribes after every reconnect.
        await self.transport.subscribe(self.region_subscription, qos=1)  # before any exchange can open
        await self.transport.subscribe(self.subscription, qos=1)
        await self.transport.wait_connected(math.inf)
        percentiles((1.0,), (50.0,))  # numpy imports numpy.ma on the first percentile: now, not in the first window
        settle_gc()  # start-up is over: the collector no longer walks the model and the imports
        self.ready.set()
        here = self.engine.device.type == "cpu" and isinstance(self.engine, ServerEngine)
        probe = probe_once() if self.config.worker.precision == "auto" and here else None  # cached: measured at start
        self.log.info("worker_ready", subscription=self.subscription, precision=self.precision,
                      engine_process="shared" if isinstance(self.engine, EngineClient) else
                      isinstance(self.engine, EngineProcess),
                      precision_setting=self.config.worker.precision,
                      bf16_speedup=None if probe is None else round(probe.speedup, 2),
                      device=str(self.engine.device), attention=self.engine.attention,
                      policy=self.config.batching.policy, prepacked=self.engine.prepacked,
                      region_windows=self.engine.maps_available,
                      threads=torch.get_num_threads(),
                      heap=retain_freed_memory().reason if self.config.worker.retain_heap else "glibc defaults")

    # ---- lifecycle ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the worker to shut down gracefully (safe from a signal handler on the loop)."""
        self._stop.set()

    async def run(self) -> None:
        """Serve until :meth:`stop`; then drain, say offline, disconnect."""
        try:
            await self._start_decoder()
            async with asyncio.TaskGroup() as tg:
                subscribe = tg.create_task(self._subscribe(), name="subscribe")
                loops = [tg.create_task(self.transport.run(), name="mqtt"),
                         tg.create_task(self.batcher.run(), name="batcher"),
                         tg.create_task(self._sender_loop(), name="sender"),
                         tg.create_task(self._metrics_loop(), name="metrics"),
                         tg.create_task(self._expiry_loop(), name="exchanges")]
                if self.config.worker.metrics_port:
                    endpoint = MetricsServer(lambda: worker_families(self.prometheus_snapshot()), "0.0.0.0",
                                             self.config.worker.metrics_port)
                    loops.append(tg.create_task(endpoint.run(), name="prometheus"))
                await self._stop.wait()
                subscribe.cancel()
                await self._shutdown()
                for task in loops:
                    task.cancel()
        finally:
            self._infer_pool.shutdown(wait=True, cancel_futures=True)
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
            self.engine.close()

    async def _shutdown(self) -> None:
        grace = self.config.worker.shutdown_grace_s
        self.log.info("worker_stopping", queued=self.batcher.depth, grace_s=grace)
        with contextlib.suppress(PatchCastError):
            await self.transport.unsubscribe(self.subscription)  # no new work from the pool
        # Messages the broker had already sent us are still accepted and answered.
        await asyncio.sleep(0.05)
        self._accepting = False
        self.batcher.drain()
        try:
            async with asyncio.timeout(grace):
                await self.batcher.wait_idle()
                await self._outbox.join()
                await self._sent_all.wait()
        except TimeoutError:
            failed = self.batcher.fail_all(PatchCastError("worker shut down before serving it",
                                                          code="shutdown"))
            self.log.warning("shutdown_grace_expired", unanswered=failed)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._outbox.join()
        await self.transport.close([Outgoing(self.topics.availability("worker", self.worker_id),
                                             self._availability("offline"), qos=1, retain=True)])
        self.log.info("worker_stopped", replies=self.stats.replies, errors=dict(self.stats.errors_by_code))


def load_server(config: Config) -> LoadedModel:
    return build_model(config.models.server, pretrained=config.models.pretrained, role="server")


async def run_worker(config: Config, *, server: LoadedModel | None = None, worker_id: str | None = None,
                     handle_signals: bool = True, started: asyncio.Event | None = None,
                     stop: asyncio.Event | None = None, engine: EngineClient | None = None) -> InferenceWorker:
    """Load the server model (unless given), serve until SIGTERM/SIGINT (or ``stop`` is set), then
    shut down gracefully and return the worker (its ``stats`` hold the run's counters).

    The entry point for ``patchcast worker`` and for supervisors that run workers in-process.
    ``started`` is set once the worker is subscribed and serving.
    """
    configure_threads(config.worker.threads)
    if config.worker.retain_heap:
        retain_freed_memory()  # before any thread allocates; reported in worker_ready
    loop = asyncio.get_running_loop()
    pool = inference_pool()
    try:
        # Loading and the bf16-vs-fp32 probe run torch kernels: on the inference thread, off the loop.
        if server is None:
            server = await loop.run_in_executor(pool, load_server, config)
        worker_cfg = config.worker
        if worker_cfg.precision == "auto" and worker_cfg.device == "cpu" and not worker_cfg.uses_engine_process:
            await loop.run_in_executor(pool, probe_once)
        worker = InferenceWorker(config, server, worker_id=worker_id, infer_pool=pool, engine=engine)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)

    async def announce_ready(event: asyncio.Event) -> None:
        await worker.ready.wait()
        event.set()

    async def stop_when(event: asyncio.Event) -> None:
        await event.wait()
        worker.stop()

    control = [asyncio.create_task(announce_ready(started), name="worker-ready")] if started is not None else []
    if stop is not None:
        control.append(asyncio.create_task(stop_when(stop), name="worker-stop"))
    try:
        await worker.run()
    finally:
        for task in control:
            task.cancel()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    return worker
