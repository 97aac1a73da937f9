"""Expert routing over a real Mosquitto: two specialist pools and the general server, 4 devices.

Each specialist is a small random-init server model over 5 of the 10 classes, saved with the global
class ids its outputs stand for. Devices route every sent image by the edge's top-k mass; the test
reads the requests off the broker and checks each went to the pool the routing rule names, was
answered by that pool only, and came back with a label among that expert's classes (mapped from
the specialist's own output index to the global id).
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from service_helpers import SERVER_ARCH, async_test, random_model, service_config
from waiting import wait_until_async

from edge_node.fleet import run_fleet
from inference_worker.service import InferenceWorker
from shared import datasets
from shared.config import Config
from shared.models import build_model, save_checkpoint
from shared.protocol import PatchRequest, RegionRequest, Reply, decode, decode_patches
from shared.routing import ExpertRouter, parse_experts
from shared.subset import forward_patch_sets
from shared.topics import V1
from shared.transport import Incoming, Transport

EXPERTS = {"vehicles": (0, 1, 8, 9, 2), "animals": (3, 4, 5, 6, 7)}
DEVICES, PER_DEVICE = 4, 20


def _specialist(folder: Path, name: str, classes: tuple[int, ...], seed: int) -> Path:
    arch = replace(SERVER_ARCH, num_classes=len(classes))
    loaded = random_model(arch, seed, name)
    loaded.class_names = [f"c{c}" for c in classes]
    loaded.class_ids = list(classes)
    path = folder / f"{name}.safetensors"
    save_checkpoint(path, loaded, arch=arch)
    return path


def _pools(cfg: Config, edge_path: Path, image_folder: Path, unique: str, tmp_path: Path,
           **sections: dict) -> dict[str, InferenceWorker]:
    """A worker per specialist of EXPERTS (each its own pool) and one for the general server: model id →
    its worker; ``sections`` go into the specialists' configs."""
    pools: dict[str, InferenceWorker] = {}
    for seed, (name, classes) in enumerate(EXPERTS.items(), start=10):
        expert_cfg = service_config(cfg.broker.port, edge_path, _specialist(tmp_path, name, classes, seed),
                                    image_folder, models={"model_id": f"{unique}-{name}"},
                                    worker={"group": f"{unique}-{name}"}, **sections)
        pools[expert_cfg.models.model_id] = InferenceWorker(
            expert_cfg, build_model(expert_cfg.models.server), worker_id=f"{unique}-w-{name}")
    pools[cfg.models.model_id] = InferenceWorker(cfg, build_model(cfg.models.server), worker_id=f"{unique}-w-general")
    return pools


@async_test(180)
async def test_devices_route_each_image_to_the_expert_with_the_most_top_k_mass(
        broker, model_files, image_folder, unique, tmp_path) -> None:
    edge_path, server_path = model_files
    table = "; ".join(f"{unique}-{name}={','.join(map(str, classes))}" for name, classes in EXPERTS.items())
    cfg = service_config(broker.port, edge_path, server_path, image_folder,
                         models={"model_id": f"{unique}-general"}, routing={"experts": table, "top_k": 5},
                         edge={"devices": DEVICES, "limit": PER_DEVICE, "device_prefix": f"{unique}cam",
                               "rate_hz": 0.0})
    router = ExpertRouter(parse_experts(cfg.routing.experts), fallback=cfg.models.model_id, top_k=5)
    edge = build_model(cfg.models.edge, role="edge")
    dataset = datasets.load(image_folder)

    pools = _pools(cfg, edge_path, image_folder, unique, tmp_path)

    seen: list[Incoming] = []
    spy = Transport(cfg.broker, client_id=f"{unique}-spy", handler=seen.append)
    async with asyncio.TaskGroup() as tg:
        spy_task = tg.create_task(spy.run(), name="spy")
        await spy.wait_connected()
        for model_id in pools:
            await spy.subscribe(V1.request_filter(model_id))
        await spy.subscribe("patchcast/v1/reply/+")
        tasks = [tg.create_task(w.run(), name=w.worker_id) for w in pools.values()]
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in pools.values())), 30)
        result = await run_fleet(cfg, edge=edge, dataset=dataset)
        sent = {r.request_id for r in result.outcomes if r.status != "edge"}

        def spied() -> bool:  # the spy's copies of every request and of every reply
            messages = [decode(m.payload) for m in seen]
            return ({m.request_id for m in messages if isinstance(m, PatchRequest)} >= sent
                    and {m.request_id for m in messages if isinstance(m, Reply)} >= sent)

        await wait_until_async(spied, 30, 0.1, message="the spy's copies of the requests and replies")
        for w in pools.values():
            w.stop()
        await asyncio.gather(*tasks)
        spy_task.cancel()

    s = result.summary
    assert s["images"] == DEVICES * PER_DEVICE and s["offloaded"] == s["images"]  # η = 0: every image is sent
    assert s["replies"] == s["offloaded"] and s["timeouts"] == 0 and s["errors"] == 0

    routed: dict[str, str] = {}  # request id → the model id of the topic it was published on
    requests: dict[str, PatchRequest] = {}
    replies: dict[str, Reply] = {}
    for msg in seen:
        message = decode(msg.payload)
        if isinstance(message, PatchRequest):
            model_id, _device = V1.parse_request(msg.topic)
            routed[message.request_id] = model_id
            requests[message.request_id] = message
        elif isinstance(message, Reply):
            replies[message.request_id] = message
    assert set(routed) == set(replies) and len(routed) == s["offloaded"]
    # Every request on the topic the routing rule names, from the edge's own top-k in the request.
    for rid, req in requests.items():
        assert routed[rid] == router.route(req.topk_ids, req.topk_probs), rid
    per_pool = collections.Counter(routed.values())
    assert all(per_pool[f"{unique}-{name}"] > 0 for name in EXPERTS), per_pool  # both experts in use
    # Answered by that pool's worker, with a global label among the expert's classes ...
    worker_of = {model_id: w.worker_id for model_id, w in pools.items()}
    classes_of = {f"{unique}-{name}": set(classes) for name, classes in EXPERTS.items()}
    for rid, reply in replies.items():
        assert reply.worker_id == worker_of[routed[rid]]
        if routed[rid] in classes_of:
            assert reply.label in classes_of[routed[rid]] and set(reply.topk_ids) <= classes_of[routed[rid]]
    # ... namely the specialist's own argmax on the same patches, mapped through its class ids.
    for model_id, w in pools.items():
        mine = sorted(r for r in requests if routed[r] == model_id)
        if not mine or model_id not in classes_of:
            continue
        loaded = w.engine.loaded
        patches = [datasets.normalize(torch.from_numpy(decode_patches(requests[r])), loaded.preprocess) for r in mine]
        with torch.inference_mode():
            logits = forward_patch_sets(loaded.model, patches, [torch.tensor(requests[r].indices) for r in mine])
        top2 = logits.topk(2, dim=-1).values
        for r, row, (a, b) in zip(mine, logits.argmax(-1).tolist(), top2.tolist(), strict=True):
            if a - b > 1e-3:  # batched vs alone: fp32, ≤ 1e-4 apart
                assert replies[r].label == loaded.class_ids[row]
    # What the devices recorded is what the experts answered.
    for record in result.outcomes:
        assert record.status == "server" and record.final_label == replies[record.request_id].label


@async_test(120)
async def test_a_missing_expert_pool_costs_one_timeout_then_the_general_pool_answers(
        broker, model_files, image_folder, unique) -> None:
    edge_path, server_path = model_files
    # Every class belongs to an expert nobody serves; the general pool is the only worker.
    cfg = service_config(broker.port, edge_path, server_path, image_folder,
                         models={"model_id": f"{unique}-general"},
                         routing={"experts": f"{unique}-nobody={','.join(map(str, range(10)))}"},
                         edge={"devices": 2, "limit": 4, "device_prefix": f"{unique}cam", "rate_hz": 0.0,
                               "retries": 1, "reply_timeout_s": 1.0})
    # The spy's copies of the 16 requests: each image to the missing pool, then to the general one.
    result, seen, general_id = await _fleet_beside_general_pool(
        cfg, unique, image_folder, [V1.request_filter(f"{unique}-nobody"), V1.request_filter(cfg.models.model_id)],
        copies=16)

    s = result.summary
    assert s["images"] == s["offloaded"] == 8 and s["replies"] == 8 and s["errors"] == 0
    for record in result.outcomes:  # first attempt lost to the missing pool, the re-send answered
        assert record.status == "server" and record.attempts == 2 and record.worker_id == general_id
    topics = collections.Counter(V1.parse_request(m.topic)[0] for m in seen)
    assert topics == {f"{unique}-nobody": 8, cfg.models.model_id: 8}
    # the re-send carries the first attempt's request id (a worker that answered it answers it again)
    ids = collections.defaultdict(set)
    for m in seen:
        ids[V1.parse_request(m.topic)[0]].add(m.correlation_data)
    assert ids[f"{unique}-nobody"] == ids[cfg.models.model_id] == {r.request_id.encode() for r in result.outcomes}


async def _fleet_beside_general_pool(cfg: Config, unique: str, image_folder: Path, topic_filters: list[str], *,
                                     copies: int) -> tuple[Any, list[Incoming], str]:
    """One worker of the general pool and a spy on ``topic_filters``; the fleet runs to its end and the
    spy to ``copies`` messages. (The fleet's result, the spy's messages, the worker's id.)"""
    general = InferenceWorker(cfg, build_model(cfg.models.server), worker_id=f"{unique}-w-general")
    seen: list[Incoming] = []
    spy = Transport(cfg.broker, client_id=f"{unique}-spy", handler=seen.append)
    async with asyncio.TaskGroup() as tg:
        spy_task = tg.create_task(spy.run(), name="spy")
        await spy.wait_connected()
        for topic_filter in topic_filters:
            await spy.subscribe(topic_filter)
        task = tg.create_task(general.run(), name=general.worker_id)
        await asyncio.wait_for(general.ready.wait(), 30)
        result = await run_fleet(cfg, edge=build_model(cfg.models.edge, role="edge"),
                                 dataset=datasets.load(image_folder))
        await wait_until_async(lambda: len(seen) >= copies, 30, message=f"the spy's {copies} copies")
        general.stop()
        await task
        spy_task.cancel()
    return result, seen, general.worker_id


def _top_up_sections(unique: str) -> dict[str, dict]:
    """The top-up on raw pixels (the reference sees what the worker saw), every worker always unsure."""
    return {"codec": {"name": "raw"}, "region": {"top_up_threshold": 0.0},
            "selection": {"rule": "topk", "value": 16, "offer_rule": "topk", "offer_value": 40}}


@async_test(180)
async def test_a_top_up_goes_to_the_routed_expert_which_asks_and_answers_on_the_union(
        broker, model_files, image_folder, unique, tmp_path) -> None:
    edge_path, server_path = model_files
    table = "; ".join(f"{unique}-{name}={','.join(map(str, classes))}" for name, classes in EXPERTS.items())
    sections = _top_up_sections(unique)
    cfg = service_config(broker.port, edge_path, server_path, image_folder, models={"model_id": f"{unique}-general"},
                         routing={"experts": table, "top_k": 5}, **sections,
                         edge={"devices": 2, "limit": 12, "device_prefix": f"{unique}cam", "rate_hz": 0.0,
                               "offload": "top_up"})
    router = ExpertRouter(parse_experts(cfg.routing.experts), fallback=cfg.models.model_id, top_k=5)
    pools = _pools(cfg, edge_path, image_folder, unique, tmp_path, **sections)
    seen: list[Incoming] = []
    spy = Transport(cfg.broker, client_id=f"{unique}-spy", handler=seen.append)
    async with asyncio.TaskGroup() as tg:
        spy_task = tg.create_task(spy.run(), name="spy")
        await spy.wait_connected()
        for topic_filter in ("patchcast/v1/req/#", "patchcast/v1/region/#", "patchcast/v1/reply/+"):
            await spy.subscribe(topic_filter)
        tasks = [tg.create_task(w.run(), name=w.worker_id) for w in pools.values()]
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in pools.values())), 30)
        result = await run_fleet(cfg, edge=build_model(cfg.models.edge, role="edge"),
                                 dataset=datasets.load(image_folder))
        await wait_until_async(lambda: sum(isinstance(decode(m.payload), Reply) for m in seen) >= 24, 30,
                               message="the spy's copies of the 24 replies")
        for w in pools.values():
            w.stop()
        await asyncio.gather(*tasks)
        spy_task.cancel()

    s = result.summary
    assert s["images"] == s["offloaded"] == s["replies"] == 24 and s["errors"] == s["timeouts"] == 0
    first: dict[str, tuple[str, PatchRequest]] = {}  # request id → (pool model id, the offer)
    second: dict[str, PatchRequest] = {}
    asks: dict[str, RegionRequest] = {}
    replies: dict[str, Reply] = {}
    for msg in seen:
        message = decode(msg.payload)
        if isinstance(message, PatchRequest) and message.exchange is None:
            first[message.request_id] = (V1.parse_request(msg.topic)[0], message)
        elif isinstance(message, PatchRequest):
            second[message.request_id] = message
        elif isinstance(message, RegionRequest):
            asks[message.request_id] = message
        elif isinstance(message, Reply):
            replies[message.request_id] = message
    assert set(first) == set(second) == set(asks) == set(replies) and len(first) == 24
    worker_of = {model_id: w.worker_id for model_id, w in pools.items()}
    classes_of = {f"{unique}-{name}": set(classes) for name, classes in EXPERTS.items()}
    used = collections.Counter(pool for pool, _ in first.values())
    assert all(used[f"{unique}-{name}"] > 0 for name in EXPERTS), used
    for rid, (pool, request) in first.items():
        assert pool == router.route(request.topk_ids, request.topk_probs), rid  # routed by the edge's top-k
        assert asks[rid].worker_id == replies[rid].worker_id == worker_of[pool]  # that pool asked and answered
        assert np.array_equal(second[rid].indices, request.offered)  # exactly the offered patches it lacked
        if pool in classes_of:
            assert replies[rid].label in classes_of[pool]
        # The answer is that worker's model on the union of both legs (raw pixels: exact).
        loaded = pools[pool].engine.loaded
        union = np.concatenate([request.indices, second[rid].indices])
        order = np.argsort(union)
        pixels = np.concatenate([decode_patches(request), decode_patches(second[rid])])[order]
        with torch.inference_mode():
            logits = forward_patch_sets(loaded.model, [datasets.normalize(torch.from_numpy(pixels), loaded.preprocess)],
                                        [torch.from_numpy(union[order])])
        a, b = logits[0].topk(2).values.tolist()
        if a - b > 1e-3:  # batched vs alone: fp32, ≤ 1e-4 apart
            assert replies[rid].label == loaded.global_class(int(logits[0].argmax()))
    for record in result.outcomes:
        assert record.status == "server" and record.attempts == 1 and record.region


@pytest.mark.parametrize("listener", [True, False], ids=["silent-listener", "no-subscriber"])
@async_test(120)
async def test_a_top_up_whose_expert_pool_is_missing_goes_to_the_general_pool(
        broker, model_files, image_folder, unique, listener) -> None:
    """The missing pool's topic has a listener that never answers (the first message times out after
    edge.reply_timeout_s), or nobody (Mosquitto's PUBACK says so: the device goes on at once, well
    before a reply timeout of 20 s)."""
    edge_path, server_path = model_files
    cfg = service_config(broker.port, edge_path, server_path, image_folder, models={"model_id": f"{unique}-general"},
                         routing={"experts": f"{unique}-nobody={','.join(map(str, range(10)))}"},
                         **_top_up_sections(unique),
                         edge={"devices": 2, "limit": 4, "device_prefix": f"{unique}cam", "rate_hz": 0.0,
                               "offload": "top_up", "reply_timeout_s": 1.0 if listener else 20.0,
                               "deadline_s": 60.0})
    missing = [V1.request_filter(f"{unique}-nobody")] if listener else []
    result, seen, general_id = await _fleet_beside_general_pool(
        cfg, unique, image_folder, [*missing, V1.request_filter(cfg.models.model_id), "patchcast/v1/region/#"],
        copies=24 if listener else 16)

    s = result.summary
    assert s["images"] == s["offloaded"] == s["replies"] == 8 and s["errors"] == s["timeouts"] == 0
    for record in result.outcomes:  # first message lost to the missing pool, then the general pool's exchange
        assert record.status == "server" and record.attempts == 2 and record.region
        assert record.worker_id == general_id
        assert record.latency_ms is not None and (listener or record.latency_ms < 20_000)  # no wait for nobody
    topics = collections.Counter(V1.parse_request(m.topic)[0] if "/req/" in m.topic else "region" for m in seen)
    expected = {f"{unique}-nobody": 8 if listener else 0, cfg.models.model_id: 8, "region": 8}
    assert topics == collections.Counter(expected)
