"""The server's top-up over a real Mosquitto: devices send their attention-chosen patches with an offer
of more; a worker unsure on the first patches asks for the offered ones it lacks, the device sends
exactly those, and the worker answers on all of them with one forward. Checked against the same forward
done here, unbatched, on what went over the wire."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import numpy as np
import pytest
from service_helpers import HandDevice, async_test, exchange_config
from test_service_region import forward, run_with_spy, sample_pixels, spied_asks, spied_regions
from waiting import wait_until_async

from edge_node.engine import EdgeEngine
from edge_node.fleet import run_fleet
from inference_worker.service import InferenceWorker
from shared import datasets
from shared.bitmask import pack_mask, unpack_mask
from shared.config import Config
from shared.models import build_model
from shared.protocol import (
    ErrorReply,
    PatchRequest,
    RegionRequest,
    Reply,
    build_request,
    decode,
    encode,
)
from shared.region import to_patches
from shared.topics import V1
from shared.transport import Incoming, Transport

DEVICES, PER_DEVICE = 2, 8
N = 64  # the test models: 32×32 images in 4-px patches
FIRST, OFFERED = 16, 40


def top_up_config(broker_port: int, model_files, image_folder, unique: str, threshold: float) -> Config:
    return exchange_config(broker_port, model_files, image_folder, unique, offload="top_up", devices=DEVICES,
                           per_device=PER_DEVICE, region={"top_up_threshold": threshold},
                           selection={"rule": "topk", "value": FIRST, "offer_rule": "topk", "offer_value": OFFERED})


def first_requests(seen: list[Incoming]) -> dict[str, PatchRequest]:
    out = {}
    for message in seen:
        if "/req/" in message.topic:
            request = decode(message.payload)
            assert isinstance(request, PatchRequest)
            out[request.request_id] = request
    return out


@pytest.mark.parametrize("engine_process", ["off", "on"])
@async_test(120)
async def test_an_unsure_worker_asks_for_the_offered_patches_and_answers_on_all_of_them(
        broker, model_files, image_folder, unique, engine_process) -> None:
    cfg = top_up_config(broker.port, model_files, image_folder, unique, threshold=0.0)  # always unsure
    cfg = replace(cfg, worker=replace(cfg.worker, engine_process=engine_process))
    edge, server = build_model(cfg.models.edge, role="edge"), build_model(cfg.models.server, role="server")
    dataset = datasets.load(image_folder)
    worker, result, seen = await run_with_spy(cfg, server, unique, edge, dataset, extra=[V1.request_filter(
        cfg.models.model_id)])

    s = result.summary
    assert s["images"] == s["offloaded"] == s["replies"] == DEVICES * PER_DEVICE  # gate η = 0: every image goes
    assert s["timeouts"] == s["errors"] == s["retries"] == 0
    assert worker.stats.regions["asked"] == worker.stats.regions["answered"] == s["offloaded"] == s["regions_sent"]
    assert len(worker.exchanges) == 0

    firsts = first_requests(seen)
    asks, seconds = spied_asks(seen), spied_regions(seen)
    assert set(firsts) == set(asks) == set(seconds) and len(firsts) == s["offloaded"]
    engine = EdgeEngine(edge, cfg.gate, cfg.selection, cfg.codec)
    checked = 0
    for record in result.outcomes:
        first, ask, second = firsts[record.request_id], asks[record.request_id], seconds[record.request_id]
        sent, offer = first.indices, unpack_mask(first.offer or b"", N)
        assert sent.size == FIRST and offer.size == OFFERED and np.isin(sent, offer).all()
        assert ask.mask == pack_mask(np.setdiff1d(offer, sent), N), "the offered patches the worker lacks"
        assert second.mask == ask.mask and second.exchange == ask.exchange and second.offer is None
        full = to_patches(sample_pixels(engine, dataset, record.request_id), 4)
        first_probs, _ = forward(server, full[sent], sent.copy())
        assert ask.topk_ids[0] == int(first_probs.argmax())
        union_probs, _ = forward(server, full[offer], offer.copy())
        top2 = np.sort(union_probs)[-2:]
        if top2[1] - top2[0] > 1e-4:  # not a numerical tie between the batched and unbatched forward
            assert record.final_label == int(union_probs.argmax())
            checked += 1
        assert record.status == "server" and record.patches == OFFERED, "both legs' patches, each once"
        assert record.full_bytes is not None and record.bytes > 0
    assert checked >= len(result.outcomes) - 1


@async_test(120)
async def test_a_sure_worker_answers_the_first_patches_alone(broker, model_files, image_folder, unique) -> None:
    cfg = top_up_config(broker.port, model_files, image_folder, unique, threshold=100.0)
    edge, server = build_model(cfg.models.edge, role="edge"), build_model(cfg.models.server, role="server")
    dataset = datasets.load(image_folder)
    worker, result, seen = await run_with_spy(cfg, server, unique, edge, dataset, extra=[V1.request_filter(
        cfg.models.model_id)])

    s = result.summary
    assert s["replies"] == s["offloaded"] == DEVICES * PER_DEVICE
    assert worker.stats.regions["asked"] == s["regions_sent"] == 0 and not any("/region/" in i.topic for i in seen)
    firsts = first_requests(seen)
    engine = EdgeEngine(edge, cfg.gate, cfg.selection, cfg.codec)
    for record in result.outcomes:
        sent = firsts[record.request_id].indices
        probs, _ = forward(server, to_patches(sample_pixels(engine, dataset, record.request_id), 4)[sent], sent.copy())
        top2 = np.sort(probs)[-2:]
        if top2[1] - top2[0] > 1e-4:
            assert record.final_label == int(probs.argmax())
        assert record.patches == FIRST


@async_test(120)
async def test_a_top_up_gives_only_what_was_asked_and_hostile_offers_are_refused(
        broker, model_files, image_folder, unique) -> None:
    cfg = top_up_config(broker.port, model_files, image_folder, unique, threshold=0.0)
    server = build_model(cfg.models.server, role="server")
    device = f"{unique}cam-0000"
    hand = HandDevice(cfg, unique, device)
    send = hand.send
    worker = InferenceWorker(cfg, server, worker_id=f"{unique}-w0")
    pixels = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    sent, offer = np.arange(0, 64, 4), np.arange(0, 64, 2)

    def request(rid: str, indices: np.ndarray, *, exchange: str | None = None) -> PatchRequest:
        return build_request(device_id=device, request_id=rid, pixels=pixels, indices=indices, patch_size=4,
                             codec="raw", sent_at=time.time(), exchange=exchange)

    def with_offer(message: PatchRequest, offer_mask: bytes) -> bytes:
        """The request's wire form with an ``of`` key the validator has not seen (a hostile device's)."""
        import msgpack

        body = msgpack.unpackb(encode(message), raw=False)
        body["of"] = offer_mask
        return msgpack.packb(body, use_bin_type=True)

    async with asyncio.TaskGroup() as tg:
        client_task = await hand.start(tg)
        worker_task = tg.create_task(worker.run(), name="worker")
        await asyncio.wait_for(worker.ready.wait(), 30)
        request_topic = V1.request(cfg.models.model_id, device)
        region_topic = V1.region(worker.worker_id, device)

        # Offers that do not hold every sent patch, hold nothing more, or have the wrong length: refused.
        for bad in (pack_mask(np.arange(1, 64, 2), N), pack_mask(sent, N), b"\xff" * 9):
            refused = await send(with_offer(request(f"{device}.0", sent), bad), request_topic)
            assert isinstance(refused, ErrorReply) and refused.code == "bad_mask"
        assert len(worker.exchanges) == 0

        ask = await send(with_offer(request(f"{device}.1", sent), pack_mask(offer, N)), request_topic)
        assert isinstance(ask, RegionRequest) and len(worker.exchanges) == 1
        assert np.array_equal(ask.indices, np.setdiff1d(offer, sent))
        # More than was asked for, or patches already sent, are not the top-up: refused, the exchange stays.
        wrong = await send(request(f"{device}.1", offer, exchange=ask.exchange), region_topic)
        assert isinstance(wrong, ErrorReply) and wrong.code == "bad_mask" and len(worker.exchanges) == 1
        answer = await send(request(f"{device}.1", ask.indices, exchange=ask.exchange), region_topic)
        assert isinstance(answer, Reply) and answer.request_id == f"{device}.1"
        probs, _ = forward(server, to_patches(pixels, 4)[offer], offer)
        assert answer.topk_ids[0] == int(probs.argmax())
        np.testing.assert_allclose(answer.topk_probs, np.sort(probs)[::-1][:len(answer.topk_probs)], atol=1e-5)
        await wait_until_async(lambda: len(worker.exchanges) == 0, 5, message="the exchange to close")
        worker.stop()
        await worker_task
        client_task.cancel()
    assert worker.stats.regions["asked"] == worker.stats.regions["answered"] == 1


@async_test(120)
async def test_a_device_refuses_a_top_up_ask_for_patches_it_did_not_offer(
        broker, model_files, image_folder, unique) -> None:
    """A hostile (or broken) worker asks for patches already sent, or not offered: the device sends nothing
    more, records ``bad_region`` and keeps the top-1 the ask carries; every image is accounted for."""
    cfg = top_up_config(broker.port, model_files, image_folder, unique, threshold=0.0)
    cfg = replace(cfg, edge=replace(cfg.edge, devices=1, limit=4))
    edge = build_model(cfg.models.edge, role="edge")
    fake = Transport(cfg.broker, client_id=f"{unique}-fake-worker", handler=None)
    asked: list[str] = []
    regions: list[Incoming] = []

    def ask_badly(message: Incoming) -> None:
        if "/region/" in message.topic:
            regions.append(message)
            return
        request = decode(message.payload)
        assert isinstance(request, PatchRequest) and request.offer is not None
        offer = unpack_mask(request.offer, N)
        # alternately: patches already sent (with the missing ones), and patches outside the offer
        wanted = offer if len(asked) % 2 == 0 else np.setdiff1d(np.arange(N), offer)
        ask = RegionRequest(request_id=request.request_id, exchange=f"x{len(asked)}", patch_size=4, grid=(8, 8),
                            mask=pack_mask(wanted, N), topk_ids=(3, 1), topk_probs=(0.6, 0.3), uncertainty=2.0,
                            worker_id="fake", ttl_s=5.0)
        asked.append(request.request_id)
        assert message.response_topic is not None
        fake.publish_nowait(message.response_topic, encode(ask), qos=1, correlation_data=message.correlation_data,
                            response_topic=V1.region("fake", request.device_id))

    fake.handler = ask_badly
    async with asyncio.TaskGroup() as tg:
        fake_task = tg.create_task(fake.run(), name="fake-worker")
        await fake.wait_connected()
        await fake.subscribe(V1.request_filter(cfg.models.model_id))
        await fake.subscribe("patchcast/v1/region/fake/+")
        result = await run_fleet(cfg, edge=edge, dataset=datasets.load(image_folder))
        fake_task.cancel()

    s = result.summary
    assert s["images"] == s["offloaded"] == len(asked) == 4
    assert s["errors"] == 4 and s["errors_by_code"] == {"bad_region": 4} and s["regions_sent"] == 0
    assert not regions, "nothing more was sent"
    assert all(r.final_label == 3 and r.patches == FIRST for r in result.outcomes)
