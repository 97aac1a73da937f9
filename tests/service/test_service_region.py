"""Server-driven region retransmission over a real Mosquitto: devices send a downsampled glance, the
worker asks for the window of its own attention, the device sends those full-resolution patches, and
the worker answers with the fused result. Checked against the same computation done here by hand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from service_helpers import HandDevice, async_test, exchange_config, with_section
from waiting import wait_until_async

from edge_node.engine import EdgeEngine
from edge_node.fleet import device_samples, run_fleet
from inference_worker.service import InferenceWorker
from shared import datasets
from shared.bitmask import pack_mask
from shared.config import Config
from shared.datasets import normalize
from shared.models import LoadedModel, build_model
from shared.packing import forward_packed
from shared.protocol import (
    ErrorReply,
    PatchRequest,
    RegionRequest,
    Reply,
    build_request,
    decode,
    decode_device_message,
)
from shared.region import centre_window, choose_window, downsample, hybrid_patches, to_patches, upsample, window_side
from shared.subset import embed_patches
from shared.topics import V1
from shared.transport import Incoming, Transport

DEVICES, PER_DEVICE = 2, 8
GRID = 8  # the test models: 32×32 images in 4-px patches


def region_config(broker_port: int, model_files, image_folder, unique: str, **region: object) -> Config:
    return exchange_config(broker_port, model_files, image_folder, unique, offload="region", devices=DEVICES,
                           per_device=PER_DEVICE, region={"downscale": 2, "side": 0.5, **region})


def forward(server: LoadedModel, patches: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and CLS attention of one patch set, unbatched, fp32 (the reference)."""
    with torch.inference_mode():
        pixels = normalize(torch.from_numpy(patches), server.preprocess)
        tokens = embed_patches(server.model, pixels.unsqueeze(0), torch.from_numpy(indices).unsqueeze(0))[0]
        maps: list[torch.Tensor] = []
        logits = forward_packed(server.model, [tokens], cls_attention=maps)
    return torch.softmax(logits[0], -1).numpy(), maps[0].numpy()


def sample_pixels(engine: EdgeEngine, dataset: datasets.Dataset, request_id: str) -> np.ndarray:
    """The image a fleet device sent under ``request_id`` (``<prefix>-<device>.<seq>``)."""
    device, seq = request_id.rsplit(".", 1)
    index = int(device.rsplit("-", 1)[1])
    return engine.pixels(list(device_samples(dataset, index, DEVICES, PER_DEVICE))[int(seq)])


def reference(server: LoadedModel, pixels: np.ndarray, fusion: str = "image", placement: str = "attention"
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(glance probabilities, window, fused probabilities) for one full image."""
    every = np.arange(GRID * GRID, dtype=np.int64)
    glance = to_patches(upsample(downsample(pixels, 2), 2), 4)
    glance_probs, attention = forward(server, glance, every)
    side = window_side(GRID, 0.5)
    window = (choose_window(attention, (GRID, GRID), side) if placement == "attention"
              else centre_window((GRID, GRID), side))
    full = to_patches(pixels, 4)
    if fusion == "probs":
        region_probs, _ = forward(server, full[window], window)
        return glance_probs, window, (glance_probs + region_probs) / 2
    fused_probs, _ = forward(server, hybrid_patches(glance, full[window], window), every)
    return glance_probs, window, fused_probs


async def run_with_spy(cfg: Config, server: LoadedModel, unique: str, edge: LoadedModel,
                       dataset: datasets.Dataset, extra: Sequence[str] = ()
                       ) -> tuple[InferenceWorker, object, list[Incoming]]:
    seen: list[Incoming] = []
    spy = Transport(cfg.broker, client_id=f"{unique}-spy", handler=seen.append)
    worker = InferenceWorker(cfg, server, worker_id=f"{unique}-w0")
    async with asyncio.TaskGroup() as tg:
        spy_task = tg.create_task(spy.run(), name="spy")
        await spy.wait_connected()
        await spy.subscribe("patchcast/v1/reply/+")
        await spy.subscribe("patchcast/v1/region/+/+")
        for topic in extra:  # more of what goes over the wire (a test's own filters)
            await spy.subscribe(topic)
        worker_task = tg.create_task(worker.run(), name="worker")
        await asyncio.wait_for(worker.ready.wait(), 30)
        result = await run_fleet(cfg, edge=edge, dataset=dataset)
        answered = {r.request_id for r in result.outcomes if r.status == "server"}

        def spied() -> bool:  # the spy's copy of every final answer (it follows its exchange's messages)
            return {m.request_id for m in (decode_device_message(i.payload) for i in seen
                                           if i.topic.startswith("patchcast/v1/reply/"))
                    if isinstance(m, Reply)} >= answered

        await wait_until_async(spied, 30, 0.1, message="the spy's copies of the replies")
        worker.stop()
        await worker_task
        spy_task.cancel()
    return worker, result, seen


def spied_asks(seen: list[Incoming]) -> dict[str, RegionRequest]:
    """The RegionRequests the spy saw on the devices' reply topics, by request id."""
    return {m.request_id: m for m in (decode_device_message(i.payload) for i in seen
                                      if i.topic.startswith("patchcast/v1/reply/")) if isinstance(m, RegionRequest)}


def spied_regions(seen: list[Incoming]) -> dict[str, PatchRequest]:
    """The requests the spy saw on the region topics (the second legs of exchanges), by request id."""
    return {r.request_id: r for r in (decode(i.payload) for i in seen if "/region/" in i.topic)
            if isinstance(r, PatchRequest)}


@pytest.mark.parametrize(("engine_process", "fusion", "placement"),
                         [("off", "image", "attention"), ("on", "probs", "attention"), ("off", "image", "centre")])
@async_test(120)
async def test_every_uncertain_glance_gets_its_attention_window_and_a_fused_answer(
        broker, model_files, image_folder, unique, engine_process, fusion, placement) -> None:
    cfg = region_config(broker.port, model_files, image_folder, unique, threshold=0.0, fusion=fusion,
                        placement=placement)
    cfg = with_section(cfg, "worker", engine_process=engine_process)
    edge, server = build_model(cfg.models.edge, role="edge"), build_model(cfg.models.server, role="server")
    dataset = datasets.load(image_folder)
    worker, result, seen = await run_with_spy(cfg, server, unique, edge, dataset)

    s = result.summary  # type: ignore[attr-defined]
    assert s["images"] == s["offloaded"] == DEVICES * PER_DEVICE  # gate η = 0: every image goes
    assert s["replies"] == s["offloaded"] and s["timeouts"] == s["errors"] == 0
    assert worker.stats.regions["asked"] == worker.stats.regions["answered"] == s["offloaded"] == s["regions_sent"]
    assert s["retries"] == 0, "a region is part of its exchange, not a re-send"
    assert len(worker.exchanges) == 0
    for device in result.devices:  # type: ignore[attr-defined]
        assert set(device.ledger.regions.values()) == {1}, "one RegionRequest per exchange"
        assert set(device.ledger.answered.values()) == {1}, "one final answer per exchange"

    # What went over the wire, against the computation done here by hand.
    asks, regions = spied_asks(seen), spied_regions(seen)
    assert set(asks) == set(regions) and len(asks) == s["offloaded"]
    engine = EdgeEngine(edge, cfg.gate, cfg.selection, cfg.codec)
    checked = 0
    for record in result.outcomes:  # type: ignore[attr-defined]
        pixels = sample_pixels(engine, dataset, record.request_id)
        glance_probs, window, fused_probs = reference(server, pixels, fusion, placement)
        ask, region = asks[record.request_id], regions[record.request_id]
        assert ask.mask == pack_mask(window, GRID * GRID), "the window of the server's own attention"
        assert ask.topk_ids[0] == int(glance_probs.argmax())
        assert isinstance(region, PatchRequest) and region.exchange == ask.exchange and region.mask == ask.mask
        assert region.downscale is None and (region.height, region.width) == (32, 32)
        top2 = np.sort(fused_probs)[-2:]
        if top2[1] - top2[0] > 1e-4:  # not a numerical tie between the batched and unbatched forward
            assert record.final_label == int(fused_probs.argmax())
            checked += 1
        assert record.status == "server" and record.patches == 16 + 16  # 64 / 2² for the glance + the 4×4 window
        assert record.full_bytes is not None and record.bytes > 0
    assert checked >= len(result.outcomes) - 1  # type: ignore[attr-defined]


@async_test(120)
async def test_a_confident_glance_is_answered_alone(broker, model_files, image_folder, unique) -> None:
    cfg = region_config(broker.port, model_files, image_folder, unique, threshold=100.0)
    edge, server = build_model(cfg.models.edge, role="edge"), build_model(cfg.models.server, role="server")
    dataset = datasets.load(image_folder)
    worker, result, seen = await run_with_spy(cfg, server, unique, edge, dataset)

    s = result.summary  # type: ignore[attr-defined]
    assert s["replies"] == s["offloaded"] == DEVICES * PER_DEVICE
    assert worker.stats.regions["asked"] == s["regions_sent"] == 0 and not any("/region/" in i.topic for i in seen)
    engine = EdgeEngine(edge, cfg.gate, cfg.selection, cfg.codec)
    for record in result.outcomes:  # type: ignore[attr-defined]
        glance_probs, _, _ = reference(server, sample_pixels(engine, dataset, record.request_id))
        assert record.final_label == int(glance_probs.argmax()) and record.patches == 16


@async_test(120)
async def test_regions_that_were_not_asked_for_are_refused_and_unclaimed_exchanges_expire(
        broker, model_files, image_folder, unique) -> None:
    cfg = region_config(broker.port, model_files, image_folder, unique, threshold=0.0, timeout_s=0.6)
    server = build_model(cfg.models.server, role="server")
    device = f"{unique}cam-0000"
    hand = HandDevice(cfg, unique, device)
    worker = InferenceWorker(cfg, server, worker_id=f"{unique}-w0")
    pixels = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)

    def request(rid: str, *, downscale: int | None = None, exchange: str | None = None,
                window: np.ndarray | list[int] | None = None) -> PatchRequest:
        if downscale:
            return build_request(device_id=device, request_id=rid, pixels=downsample(pixels, downscale),
                                 indices=np.arange(64), patch_size=2, codec="raw", sent_at=time.time(),
                                 downscale=downscale)
        assert exchange is not None, "a region request answers an exchange"
        return build_request(device_id=device, request_id=rid, pixels=pixels,
                             indices=np.arange(16) if window is None else window, patch_size=4,
                             codec="raw", sent_at=time.time(), exchange=exchange)

    async def send(message: PatchRequest, topic: str) -> RegionRequest | Reply | ErrorReply:
        return await hand.send(message, topic, correlation=message.request_id.encode())

    async with asyncio.TaskGroup() as tg:
        client_task = await hand.start(tg)
        worker_task = tg.create_task(worker.run(), name="worker")
        await asyncio.wait_for(worker.ready.wait(), 30)
        request_topic = V1.request(cfg.models.model_id, device)
        region_topic = V1.region(worker.worker_id, device)

        ask = await send(request(f"{device}.1", downscale=2), request_topic)
        assert isinstance(ask, RegionRequest) and len(worker.exchanges) == 1
        # A region on the pool's topic, an exchange never opened, another window, another request id.
        wrong_topic = await send(request(f"{device}.1", exchange=ask.exchange, window=ask.indices), request_topic)
        unknown = await send(request(f"{device}.1", exchange="x-nope", window=ask.indices), region_topic)
        other_window = np.setdiff1d(np.arange(64), ask.indices)[:16]
        wrong_window = await send(request(f"{device}.1", exchange=ask.exchange, window=other_window), region_topic)
        wrong_request = await send(request(f"{device}.2", exchange=ask.exchange, window=ask.indices), region_topic)
        codes = [getattr(m, "code", None) for m in (wrong_topic, unknown, wrong_window, wrong_request)]
        assert codes == ["bad_topic", "no_exchange", "bad_mask", "no_exchange"]
        assert len(worker.exchanges) == 1, "a refused region leaves the exchange open for the right one"

        # The region that was asked for is answered once; a second copy finds no exchange.
        answer = await send(request(f"{device}.1", exchange=ask.exchange, window=ask.indices), region_topic)
        assert isinstance(answer, Reply) and answer.request_id == f"{device}.1"
        again = await send(request(f"{device}.1", exchange=ask.exchange, window=ask.indices), region_topic)
        assert isinstance(again, ErrorReply) and again.code == "no_exchange"

        # An exchange whose region never comes is forgotten after region.timeout_s.
        opened_after = time.monotonic()
        ask = await send(request(f"{device}.3", downscale=2), request_topic)
        assert isinstance(ask, RegionRequest)
        await wait_until_async(lambda: worker.stats.regions["expired"] == 1, 10, message="the exchange to expire")
        assert time.monotonic() - opened_after >= 0.6, "expired before region.timeout_s"
        assert len(worker.exchanges) == 0
        late = await send(request(f"{device}.3", exchange=ask.exchange, window=ask.indices), region_topic)
        assert isinstance(late, ErrorReply) and late.code == "no_exchange"
        worker.stop()
        await worker_task
        client_task.cancel()
    assert worker.stats.regions["asked"] == 2 and worker.stats.regions["answered"] == 1
