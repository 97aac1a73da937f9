"""Delivery over a real Mosquitto: a device's re-send carries the same request id; the worker answers a
re-send from memory (computed once) and drops one that arrives while the first is in progress; the
device hands its application exactly one answer per image however many replies arrive."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import numpy as np
import pytest
from service_helpers import IMG, PATCH, async_test, service_config
from waiting import wait_until_async

from edge_node.fleet import run_fleet
from inference_worker.dedupe import RecentRequests, Seen
from inference_worker.service import InferenceWorker
from shared import datasets
from shared.models import build_model
from shared.naming import device_id
from shared.protocol import PatchRequest, Reply, build_request, decode, encode
from shared.topics import V1
from shared.transport import NO_SUBSCRIBERS, Incoming, Transport


def request(device: str, seq: int) -> PatchRequest:
    rng = np.random.default_rng(seq)
    n = (IMG // PATCH) ** 2
    return build_request(device_id=device, request_id=f"{device}.{seq:06d}",
                         pixels=rng.integers(0, 256, (IMG, IMG, 3), dtype=np.uint8), indices=np.arange(0, n, 2),
                         patch_size=PATCH, codec="jpeg-mosaic", topk_ids=[3, 1], topk_probs=[0.5, 0.2],
                         uncertainty=1.0, sent_at=time.time(), deadline=time.time() + 30.0)


def test_recent_requests_bounded_with_ttl() -> None:
    recent = RecentRequests(capacity=2, ttl_s=10.0)
    reply = Reply(request_id="d.1", label=1, topk_ids=(1,), topk_probs=(0.9,), queue_ms=0.0, infer_ms=1.0,
                  total_ms=1.0, worker_id="w", batch_size=1)
    assert recent.check(("d", "d.1"), 0.0) == (Seen.NEW, None)
    recent.begin(("d", "d.1"), 0.0)
    assert recent.check(("d", "d.1"), 1.0) == (Seen.PENDING, None)
    recent.answer(("d", "d.1"), reply, 2.0)
    assert recent.check(("d", "d.1"), 3.0) == (Seen.ANSWERED, reply)
    assert recent.check(("d", "d.1"), 12.5)[0] is Seen.NEW, "past its TTL an entry is forgotten"
    for i in range(2, 6):
        recent.begin(("d", f"d.{i}"), 20.0)
    assert len(recent) == 2 and recent.stats.evicted == 2, "the oldest go first beyond the capacity"
    recent.forget(("d", "d.5"))
    assert recent.check(("d", "d.5"), 21.0)[0] is Seen.NEW
    assert (recent.stats.replayed, recent.stats.dropped) == (1, 1)


@pytest.mark.any_broker  # also over rumqttd (other_brokers.py)
@async_test(90)
async def test_resend_after_a_dropped_reply_is_answered_from_memory_and_computed_once(
        broker, model_files, image_folder, unique) -> None:
    edge_path, server_path = model_files
    model = f"tiny-{unique}"
    # A 300 ms batching delay keeps the first request in progress while its re-send arrives.
    cfg = service_config(broker.port, edge_path, server_path, image_folder, models={"model_id": model},
                         worker={"group": f"pool-{unique}"}, batching={"max_delay_ms": 300.0, "max_batch": 64})
    worker = InferenceWorker(cfg, build_model(cfg.models.server, role="server"), worker_id=f"{unique}-w")
    device = f"{unique}cam-0000"
    replies: list[Incoming] = []
    client = Transport(cfg.broker, client_id=device, handler=replies.append)
    topic = V1.request(model, device)

    async def send(req: PatchRequest) -> None:
        await client.publish(topic, encode(req), qos=1, response_topic=V1.reply(device),
                             correlation_data=req.request_id.encode(), expiry_s=30)

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(client.run(), name="device"), tg.create_task(worker.run(), name="worker")]
        await client.wait_connected()
        await asyncio.wait_for(worker.ready.wait(), 30)
        first = request(device, 1)
        # 1. The device is not subscribed yet: the broker drops the worker's reply (a lost reply).
        await send(first)
        await wait_until_async(lambda: worker.stats.replies == 1, 10, 0.02, message="the worker's first reply")
        await client.subscribe(V1.reply(device))
        await send(first)  # the re-send: same request id
        await wait_until_async(lambda: len(replies) == 1, 10, 0.02, message="the re-send answered")
        # 2. A re-send while the first is still in progress (held by the 300 ms batching delay).
        second = request(device, 2)
        await send(second)
        await send(second)
        await wait_until_async(lambda: len(replies) == 2, 10, 0.02, message="the second request answered")
        await asyncio.sleep(0.5)  # not a wait: a negative check, a second reply to either would be here by now
        worker.stop()
        await tasks[1]
        tasks[0].cancel()

    answers = [decode(m.payload) for m in replies]
    assert [a.request_id for a in answers if isinstance(a, Reply)] == [first.request_id, second.request_id]
    assert [m.correlation_data for m in replies] == [first.request_id.encode(), second.request_id.encode()]
    assert worker.stats.requests == 2, "each request computed once"
    assert worker.stats.batches == 2
    assert (worker.recent.stats.replayed, worker.recent.stats.dropped) == (1, 1)


@pytest.mark.any_broker  # also over rumqttd (other_brokers.py)
@async_test(90)
async def test_device_resends_under_the_same_id_and_hands_one_answer_per_image(
        broker, model_files, image_folder, unique) -> None:
    """A stand-in worker ignores each request's first copy and answers its re-send twice: every image
    gets one server answer after two attempts; the extra replies are counted, never handed on."""
    edge_path, server_path = model_files
    model = f"tiny-{unique}"
    cfg = service_config(broker.port, edge_path, server_path, image_folder, models={"model_id": model},
                         gate={"threshold": 0.0},
                         edge={"devices": 2, "limit": 4, "device_prefix": f"{unique}cam", "reply_timeout_s": 0.5,
                               "retries": 2, "retry_backoff_s": 0.05})
    copies: collections.Counter[str] = collections.Counter()
    outbox: asyncio.Queue[tuple[str, bytes, PatchRequest]] = asyncio.Queue()

    def on_request(msg: Incoming) -> None:
        req = decode(msg.payload)
        assert isinstance(req, PatchRequest) and msg.response_topic is not None
        copies[req.request_id] += 1
        if copies[req.request_id] == 2:
            outbox.put_nowait((msg.response_topic, msg.correlation_data or b"", req))

    fake = Transport(cfg.broker, client_id=f"{unique}-fake", handler=on_request)

    async def answer_twice() -> None:
        while True:
            topic, correlation, req = await outbox.get()
            reply = Reply(request_id=req.request_id, label=7, topk_ids=(7,), topk_probs=(0.9,), queue_ms=0.0,
                          infer_ms=1.0, total_ms=1.0, worker_id="fake", batch_size=1)
            for _ in range(2):
                await fake.publish(topic, encode(reply), correlation_data=correlation)

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(fake.run(), name="fake"), tg.create_task(answer_twice(), name="answers")]
        await fake.wait_connected()
        await fake.subscribe(V1.request_filter(model))
        result = await run_fleet(cfg)
        for task in tasks:
            task.cancel()

    s = result.summary
    assert s["images"] == s["offloaded"] == 8 and s["replies"] == 8 and s["fallbacks"] == 0
    assert collections.Counter(r.request_id for r in result.outcomes) == dict.fromkeys(copies, 1)
    assert set(copies.values()) == {2}, "a re-send carries the first attempt's request id"
    assert all(r.attempts == 2 and r.final_label == 7 for r in result.outcomes)
    # each image: one reply handed on, one counted as a duplicate (on the wire, never to the application);
    # a device's last image may be closed before its second reply comes in
    assert 6 <= s["replies_duplicate"] <= 8 and s["retries"] == 8


@async_test(90)
async def test_a_request_that_reached_no_worker_is_resent_without_waiting_out_the_reply_timeout(
        broker, model_files, image_folder, unique, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool subscribes only after the devices have started sending (as after a broker restart):
    the broker's PUBACK says 'no matching subscribers', and the devices re-send after a short backoff,
    well before their 5-s reply timeout, without spending a re-send."""
    edge_path, server_path = model_files
    model = f"tiny-{unique}"
    cfg = service_config(broker.port, edge_path, server_path, image_folder, models={"model_id": model},
                         worker={"group": f"pool-{unique}"},
                         edge={"devices": 2, "limit": 6, "device_prefix": f"{unique}cam", "reply_timeout_s": 5.0,
                               "retries": 0, "deadline_s": 0.0, "retry_backoff_s": 0.05})
    worker = InferenceWorker(cfg, build_model(cfg.models.server, role="server"), worker_id=f"{unique}-w")
    edge, dataset = build_model(cfg.models.edge, role="edge"), datasets.load(image_folder)
    # The event to wait for: each device's request accepted by the broker and delivered to nobody (the
    # PUBACK's "no matching subscribers"). A subscribing spy would itself be a matching subscriber, so
    # the devices' own publishes are watched instead.
    to_nobody: set[str] = set()
    publish = Transport.publish

    async def watched_publish(self: Transport, topic: str, payload: bytes, **kw: Any) -> int:
        code = await publish(self, topic, payload, **kw)
        if code == NO_SUBSCRIBERS:
            to_nobody.add(topic)
        return code

    monkeypatch.setattr(Transport, "publish", watched_publish)
    every_device = {V1.request(model, device_id(f"{unique}cam", i)) for i in range(2)}
    async with asyncio.TaskGroup() as tg:
        fleet = tg.create_task(run_fleet(cfg, edge=edge, dataset=dataset), name="fleet")
        await wait_until_async(lambda: every_device <= to_nobody, 60,
                               message="every device's request delivered to nobody (an empty pool)")
        task = tg.create_task(worker.run(), name="worker")
        result = await fleet
        worker.stop()
        await task

    s = result.summary
    assert s["images"] == s["offloaded"] == 12 and s["replies"] == 12 and s["fallbacks"] == 0
    early = [r for r in result.outcomes if r.attempts > 1]
    assert early, "the first images went out before the pool subscribed"
    assert s["retries"] == sum(r.attempts - 1 for r in result.outcomes) > 0
    # with retries = 0 a re-send after a reply timeout was impossible: these re-sends followed the
    # broker's 'no matching subscribers', and came long before the 5-s reply timeout
    assert max(r.latency_ms or 0.0 for r in early) < 4_000
