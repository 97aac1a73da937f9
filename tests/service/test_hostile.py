"""A hostile device floods a worker through a real Mosquitto while an honest device's requests flow:
the worker never stops, counts every hostile message by its code, answers every honest request
correctly, and nothing reaches the honest device but its own answers (bench/hostile_corpus.py)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from service_helpers import IMG, PATCH, async_test, service_config
from waiting import wait_until_async

from inference_worker.service import InferenceWorker
from shared.models import build_model
from shared.protocol import Reply, build_request, decode_reply, encode
from shared.topics import V1
from shared.transport import Incoming, Transport

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from hostile_corpus import Corpus, Geometry, expected_counts, send


def honest_requests(device: str, images: int, count: int) -> list[tuple[str, int, bytes]]:
    """``count`` requests of ``device`` over ``images`` distinct images: (request id, image, payload)."""
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (IMG, IMG, 3), dtype=np.uint8) for _ in range(images)]
    n = (IMG // PATCH) ** 2
    out = []
    for i in range(count):
        rid = f"{device}.{i:06d}"
        now = time.time()
        req = build_request(device_id=device, request_id=rid, pixels=pixels[i % images], indices=np.arange(0, n, 2),
                            patch_size=PATCH, codec="jpeg-mosaic", topk_ids=[0], topk_probs=[0.5], uncertainty=1.0,
                            sent_at=now, deadline=now + 60.0)
        out.append((rid, i % images, encode(req)))
    return out


async def hostile_run(broker, model_files, image_folder, unique: str, *, hostile: int, honest: int,
                      rate_hz: float) -> None:
    edge_path, server_path = model_files
    model = f"tiny-{unique}"
    cfg = service_config(broker.port, edge_path, server_path, image_folder, models={"model_id": model},
                         worker={"group": f"pool-{unique}"})
    worker = InferenceWorker(cfg, build_model(cfg.models.server, role="server"), worker_id=f"{unique}-w")
    honest_dev, evil = f"{unique}cam", f"{unique}evil"
    corpus = Corpus(model=model, device=evil, victim=honest_dev, geometry=Geometry(IMG, PATCH),
                    worker_id=worker.worker_id, seed=hash(unique) % 1000)
    messages = list(corpus.messages(hostile))
    assert set(corpus.kinds) <= {m.kind for m in messages} or hostile < len(corpus.kinds)
    received: list[Incoming] = []
    device = Transport(cfg.broker, client_id=honest_dev, handler=received.append)
    requests = honest_requests(honest_dev, images=4, count=honest + 4)

    async def ask(rid: str, payload: bytes) -> None:
        await device.publish(V1.request(model, honest_dev), payload, response_topic=V1.reply(honest_dev),
                             correlation_data=rid.encode())

    async with asyncio.TaskGroup() as tg:
        device_task = tg.create_task(device.run())
        await device.wait_connected()
        await device.subscribe(V1.reply(honest_dev))
        worker_task = tg.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 30)
        for rid, _image, payload in requests[:4]:  # one answer per image before the flood: the reference
            await ask(rid, payload)
        flood = tg.create_task(asyncio.to_thread(send, messages, "127.0.0.1", broker.port, client_id=evil,
                                                 rate_hz=rate_hz, timeout_s=120.0))
        pace = max(hostile / rate_hz, 1.0) / honest  # the honest requests spread over the flood
        for rid, _image, payload in requests[4:]:
            await ask(rid, payload)
            await asyncio.sleep(pace)  # not a wait: spreading the honest requests over the flood
        acked = await flood

        def all_handled() -> bool:
            assert not worker_task.done(), "the worker stopped"
            return (sum(worker.stats.errors_by_code.values()) >= len(messages)
                    and len([m for m in received if m.topic == V1.reply(honest_dev)]) >= len(requests))

        await wait_until_async(all_handled, 120, message="every message handled: counted, answered")
        assert not worker_task.done(), "the worker stopped"
        worker.stop()
        await worker_task
        device_task.cancel()

    assert acked == len(messages)
    assert dict(worker.stats.errors_by_code) == dict(expected_counts(messages))
    answers = {m.correlation_data: decode_reply(m.payload) for m in received}
    assert len(received) == len(requests) == len(answers), "exactly one answer per honest request, nothing else"
    reference = {image: answers[rid.encode()] for rid, image, _ in requests[:4]}
    for rid, image, _ in requests:
        answer = answers[rid.encode()]
        assert isinstance(answer, Reply) and answer.request_id == rid, answer
        ref = reference[image]
        assert isinstance(ref, Reply) and answer.label == ref.label
    assert worker.stats.replies == len(requests)


@async_test(180)
async def test_hostile_corpus_while_real_requests_flow(broker, model_files, image_folder, unique) -> None:
    await hostile_run(broker, model_files, image_folder, unique, hostile=600, honest=40, rate_hz=1000.0)


@pytest.mark.slow
@async_test(600)
async def test_hostile_corpus_of_ten_thousand_messages(broker, model_files, image_folder, unique) -> None:
    await hostile_run(broker, model_files, image_folder, unique, hostile=10_000, honest=200, rate_hz=800.0)
