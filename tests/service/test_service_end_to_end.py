"""End to end over a real Mosquitto: 2 workers (asyncio services in this process) and 8 devices
(the fleet simulator) over 200 images, with small random-init models."""

from __future__ import annotations

import asyncio
import collections

import numpy as np
import pytest
import torch
from service_helpers import async_test, service_config, with_section
from waiting import wait_until_async

from edge_node.engine import EdgeEngine
from edge_node.fleet import run_fleet
from inference_worker.decoders import DecodeInBatch, DecodeThreads
from inference_worker.service import InferenceWorker
from shared import datasets
from shared.datasets import normalize
from shared.models import build_model
from shared.protocol import (
    Availability,
    ErrorReply,
    PatchRequest,
    Reply,
    WorkerMetrics,
    decode,
    decode_patches,
)
from shared.subset import forward_patch_sets
from shared.topics import V1
from shared.transport import Incoming, Transport

DEVICES, PER_DEVICE = 8, 25


@pytest.mark.any_broker  # also over rumqttd (other_brokers.py)
@async_test(180)
async def test_two_workers_eight_devices_every_request_answered_once_on_its_own_topic(
        broker, model_files, image_folder, unique) -> None:
    edge_path, server_path = model_files
    cfg = service_config(broker.port, edge_path, server_path, image_folder,
                         models={"model_id": f"tiny-{unique}"}, worker={"group": f"pool-{unique}"},
                         edge={"devices": DEVICES, "limit": PER_DEVICE, "device_prefix": f"{unique}cam",
                               "max_in_flight": 4, "rate_hz": 0.0})
    edge = build_model(cfg.models.edge, role="edge")
    server = build_model(cfg.models.server, role="server")
    dataset = datasets.load(image_folder)
    # η = the median uncertainty of these images: about half stay at the edge, half go to the pool.
    engine = EdgeEngine(edge, cfg.gate, cfg.selection, cfg.codec)
    eta = float(np.median([d.uncertainty for d in engine.run(list(dataset.samples))]))
    cfg = with_section(cfg, "gate", threshold=eta)

    seen: list[Incoming] = []
    spy = Transport(cfg.broker, client_id=f"{unique}-spy", handler=seen.append)
    # One worker decodes pixels in its batches (a CPU's default), the other on a decoder thread (CUDA's).
    workers = [InferenceWorker(with_section(cfg, "worker", decode_threads=threads), server, worker_id=f"{unique}-w{i}")
               for i, threads in enumerate(("auto", 1))]
    assert isinstance(workers[0]._decode_pool, DecodeInBatch) and isinstance(workers[1]._decode_pool, DecodeThreads)
    async with asyncio.TaskGroup() as tg:
        spy_task = tg.create_task(spy.run(), name="spy")
        await spy.wait_connected()
        for topic_filter in (V1.request_filter(cfg.models.model_id), "patchcast/v1/reply/+",
                             V1.availability_filter("worker"), V1.metrics_filter("worker")):
            await spy.subscribe(topic_filter)
        worker_tasks = [tg.create_task(w.run(), name=w.worker_id) for w in workers]
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in workers)), 30)
        result = await run_fleet(cfg, edge=edge, dataset=dataset)
        answered = {r.request_id for r in result.outcomes if r.status != "edge"}
        ids = {w.worker_id for w in workers}

        def spied() -> bool:  # the spy's copies of every reply, and a metrics report of the load from each worker
            messages = [decode(m.payload) for m in seen]
            busy = {m.worker_id for m in messages if isinstance(m, WorkerMetrics) and m.requests_per_s > 0}
            return {m.request_id for m in messages if isinstance(m, Reply | ErrorReply)} >= answered and busy == ids

        await wait_until_async(spied, 30, 0.1, message="the spy's copies of the replies and the workers' metrics")
        for w in workers:
            w.stop()
        await asyncio.gather(*worker_tasks)

        def offline() -> set[str]:
            return {m.ident for m in (decode(x.payload) for x in seen if "/availability/" in x.topic)
                    if isinstance(m, Availability) and m.state == "offline"}

        await wait_until_async(lambda: offline() == ids, 10, message="both workers' offline availability")
        spy_task.cancel()

    s = result.summary
    assert s["images"] == DEVICES * PER_DEVICE
    assert 0 < s["offloaded"] < s["images"], "the gate should keep some images and send others"
    assert s["replies"] == s["offloaded"] and s["timeouts"] == 0 and s["errors"] == 0
    assert s["replies_late"] == s["replies_foreign"] == s["replies_duplicate"] == s["replies_malformed"] == 0
    assert set(s["workers"]) == {w.worker_id for w in workers}, "the shared subscription spreads the load"
    assert all(w.stats.replies > 0 for w in workers), "each decoder answered some of the requests checked below"

    # Every sent request answered exactly once, on its own device's reply topic.
    sent = {r.request_id for r in result.outcomes if r.status != "edge"}
    assert len(sent) == s["offloaded"]
    for device in result.devices:
        mine = {rid for rid in sent if rid.startswith(device.device_id + ".")}
        assert dict(device.ledger.answered) == dict.fromkeys(mine, 1)
    replies: dict[str, tuple[str, Reply]] = {}
    requests: dict[str, PatchRequest] = {}
    availability: dict[str, list[str]] = collections.defaultdict(list)
    metrics_from: set[str] = set()
    arrival_ms: list[float] = []
    for msg in seen:
        message = decode(msg.payload)
        if isinstance(message, Reply | ErrorReply):
            assert isinstance(message, Reply), f"unexpected error reply {message}"
            assert message.request_id not in replies, "a request was answered twice"
            replies[message.request_id] = (msg.topic, message)
        elif isinstance(message, PatchRequest):
            requests[message.request_id] = message
            assert msg.response_topic == V1.reply(message.device_id)
            assert msg.correlation_data == message.request_id.encode()
        elif isinstance(message, Availability):
            availability[message.ident].append(message.state)
        elif isinstance(message, WorkerMetrics):
            metrics_from.add(message.worker_id)
            if message.requests_per_s > 0:
                arrival_ms.append(message.arrival_ms_p95)
    assert set(replies) == sent == set(requests)
    for rid, (topic, _reply) in replies.items():
        assert topic == V1.reply(rid.split(".")[0]), "a reply went to another device's topic"

    # Each server label equals the label the same model gives in-process on the same decoded patches.
    order = sorted(requests)
    patches = [normalize(torch.from_numpy(decode_patches(requests[r])), server.preprocess) for r in order]
    with torch.inference_mode():
        logits = forward_patch_sets(server.model, patches,
                                    [torch.tensor(requests[r].indices) for r in order])
    expected = logits.argmax(-1).tolist()
    got = [replies[r][1].label for r in order]
    top2 = logits.topk(2, dim=-1).values
    clear = ((top2[:, 0] - top2[:, 1]) > 1e-3).tolist()  # fp32, batched vs not: ≤ 1e-4 apart
    assert sum(clear) >= 0.95 * len(order)
    assert [g for g, c in zip(got, clear, strict=True) if c] == [e for e, c in zip(expected, clear, strict=True) if c]
    # Outcomes carry the server's label, and what the same requests would have cost with the full image.
    for record in result.outcomes:
        if record.status == "server":
            assert record.final_label == replies[record.request_id][1].label
            assert record.full_bytes is not None and record.full_bytes > 0
            assert record.to_message().full_bytes == record.full_bytes
        if record.status == "edge":
            assert record.full_bytes is None

    # Availability: online while serving, offline after a graceful stop; metrics from both workers.
    for w in workers:
        assert availability[w.worker_id][0] == "online" and availability[w.worker_id][-1] == "offline"
        assert w.worker_id in metrics_from
        assert w.stats.errors_by_code == {}
    # Arrival lateness (device sent_at → worker receipt, same host clock here): measured, and small.
    assert arrival_ms and max(arrival_ms) > 0 and min(arrival_ms) < 5_000
