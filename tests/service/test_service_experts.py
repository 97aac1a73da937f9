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

import torch
from service_helpers import SERVER_ARCH, async_test, random_model, service_config
from waiting import wait_until_async

from edge_node.fleet import run_fleet
from inference_worker.service import InferenceWorker
from shared import datasets
from shared.models import build_model, save_checkpoint
from shared.protocol import PatchRequest, Reply, decode, decode_patches
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

    pools: dict[str, InferenceWorker] = {}  # model id → its worker
    for seed, (name, classes) in enumerate(EXPERTS.items(), start=10):
        expert_cfg = service_config(broker.port, edge_path, _specialist(tmp_path, name, classes, seed), image_folder,
                                    models={"model_id": f"{unique}-{name}"}, worker={"group": f"{unique}-{name}"})
        pools[expert_cfg.models.model_id] = InferenceWorker(
            expert_cfg, build_model(expert_cfg.models.server), worker_id=f"{unique}-w-{name}")
    pools[cfg.models.model_id] = InferenceWorker(cfg, build_model(cfg.models.server), worker_id=f"{unique}-w-general")

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
    general = InferenceWorker(cfg, build_model(cfg.models.server), worker_id=f"{unique}-w-general")
    seen: list[Incoming] = []
    spy = Transport(cfg.broker, client_id=f"{unique}-spy", handler=seen.append)
    async with asyncio.TaskGroup() as tg:
        spy_task = tg.create_task(spy.run(), name="spy")
        await spy.wait_connected()
        await spy.subscribe(V1.request_filter(f"{unique}-nobody"))
        await spy.subscribe(V1.request_filter(cfg.models.model_id))
        task = tg.create_task(general.run(), name=general.worker_id)
        await asyncio.wait_for(general.ready.wait(), 30)
        result = await run_fleet(cfg, edge=build_model(cfg.models.edge, role="edge"),
                                 dataset=datasets.load(image_folder))
        # The spy's copies of the 16 requests: each image to the missing pool, then to the general one.
        await wait_until_async(lambda: len(seen) >= 16, 30, message="the spy's copies of the 16 requests")
        general.stop()
        await task
        spy_task.cancel()

    s = result.summary
    assert s["images"] == s["offloaded"] == 8 and s["replies"] == 8 and s["errors"] == 0
    for record in result.outcomes:  # first attempt lost to the missing pool, the re-send answered
        assert record.status == "server" and record.attempts == 2 and record.worker_id == general.worker_id
    topics = collections.Counter(V1.parse_request(m.topic)[0] for m in seen)
    assert topics == {f"{unique}-nobody": 8, cfg.models.model_id: 8}
    # the re-send carries the first attempt's request id (a worker that answered it answers it again)
    ids = collections.defaultdict(set)
    for m in seen:
        ids[V1.parse_request(m.topic)[0]].add(m.correlation_data)
    assert ids[f"{unique}-nobody"] == ids[cfg.models.model_id] == {r.request_id.encode() for r in result.outcomes}
