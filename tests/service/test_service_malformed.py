"""Hostile and broken requests, published with the real ``mosquitto_pub`` CLI (MQTT v5, response
topic and correlation data as properties): each gets an ErrorReply with the protocol error's code
where a reply topic is known, and the worker keeps serving."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import msgpack
import pytest
from service_helpers import async_test, service_config, valid_request
from waiting import wait_until_async

from inference_worker.service import InferenceWorker
from shared.models import build_model
from shared.protocol import ErrorReply, Reply, decode_reply
from shared.topics import V1
from shared.transport import Incoming, Transport

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto_pub not installed")


def mosquitto_pub(port: int, topic: str, payload: bytes, tmp: Path, *, response_topic: str | None,
                  correlation: str | None) -> None:
    path = tmp / "payload.bin"
    path.write_bytes(payload)
    cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "-q", "1", "-t", topic, "-f", str(path)]
    if response_topic:
        cmd += ["-D", "publish", "response-topic", response_topic]
    if correlation:
        cmd += ["-D", "publish", "correlation-data", correlation]
    subprocess.run(cmd, check=True, timeout=20, capture_output=True)


# The same answers when pixels decode in child processes (errors pickled back) and the model runs in one.
CHILDREN = [{}, {"decode_processes": 2, "engine_process": "on"}]


@pytest.mark.parametrize("children", CHILDREN, ids=["threads", "child-processes"])
@async_test(120)
async def test_malformed_requests_get_error_replies_and_never_stop_the_worker(
        broker, model_files, image_folder, unique, tmp_path, children) -> None:
    edge_path, server_path = model_files
    model = f"tiny-{unique}"
    cfg = service_config(broker.port, edge_path, server_path, image_folder, models={"model_id": model},
                         worker={"group": f"pool-{unique}", **children})
    worker = InferenceWorker(cfg, build_model(cfg.models.server, role="server"), worker_id=f"{unique}-w")
    dev = f"{unique}dev"
    reply_topic = V1.reply(dev)
    req_topic = V1.request(model, dev)
    cases = {
        # correlation → (payload, MQTT response topic, expected code); every answer goes to dev's reply topic
        "c-garbage": (b"this is not msgpack \xff\x00", reply_topic, "malformed"),
        "c-version": (msgpack.packb({"v": 9, "t": "req"}), reply_topic, "bad_version"),
        "c-mask": (valid_request(dev, "r-mask", m=b"\xff" * 3), reply_topic, "bad_mask"),
        "c-codec": (valid_request(dev, "r-codec", c="gif"), reply_topic, "unknown_codec"),
        "c-field": (valid_request(dev, "r-field", h="32"), reply_topic, "bad_field"),
        "c-topic": (valid_request("someone-else", "r-topic"), reply_topic, "bad_topic"),
        "c-geometry": (valid_request(dev, "r-geo", h=64, w=64, g=[16, 16], p=4, m=b"\x80" + b"\x00" * 31),
                       reply_topic, "bad_geometry"),
        # Valid envelope, pixels that do not decode: refused on the decode thread, not at intake.
        "c-payload": (valid_request(dev, "r-payload", x=b"\x00" * 50), reply_topic, "bad_payload"),
        # A wildcard response topic once made the worker's MQTT client raise and the worker exit.
        "c-wildcard": (valid_request(dev, "r-wild"), "x/#", "bad_topic"),
        # Another device's reply topic and request id: steering an answer into its pending request.
        "c-steer": (valid_request(dev, "r-steer", r="victim.000777"), V1.reply("victim"), "bad_topic"),
        "c-foreign-id": (valid_request(dev, "r-id", r="victim.000777"), reply_topic, "foreign_id"),
    }
    received: list[Incoming] = []
    spy = Transport(cfg.broker, client_id=f"{unique}-spy", handler=received.append)
    async with asyncio.TaskGroup() as tg:
        spy_task = tg.create_task(spy.run())
        await spy.wait_connected()
        await spy.subscribe(reply_topic)
        await spy.subscribe(V1.errors("worker", worker.worker_id))
        worker_task = tg.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 30)
        for correlation, (payload, response_topic, _code) in cases.items():
            await asyncio.to_thread(mosquitto_pub, broker.port, req_topic, payload, tmp_path,
                                    response_topic=response_topic, correlation=correlation)
        # No response topic: the device cannot be told; the worker reports on its errors topic.
        await asyncio.to_thread(mosquitto_pub, broker.port, req_topic, b"\x00", tmp_path, response_topic=None,
                                correlation=None)
        # …and the worker still serves a good request afterwards.
        await asyncio.to_thread(mosquitto_pub, broker.port, req_topic, valid_request(dev, "r-good"), tmp_path,
                                response_topic=reply_topic, correlation="c-good")
        await wait_until_async(lambda: len(received) >= len(cases) + 2, 10, 0.1,
                               message=f"{len(cases) + 2} answers (every case, the orphan report, the good request)")
        worker.stop()
        await worker_task
        spy_task.cancel()

    by_correlation = {m.correlation_data: (m.topic, decode_reply(m.payload)) for m in received}
    for correlation, (_payload, _topic, code) in cases.items():
        topic, reply = by_correlation[correlation.encode()]
        assert topic == reply_topic
        assert isinstance(reply, ErrorReply), correlation
        assert reply.code == code, (correlation, reply.message)
        assert reply.worker_id == worker.worker_id
    topic, good = by_correlation[b"c-good"]
    assert isinstance(good, Reply) and good.request_id == f"{dev}.r-good" and topic == reply_topic
    orphan = [decode_reply(m.payload) for m in received if m.topic == V1.errors("worker", worker.worker_id)]
    # MQTT-level fields are checked before the payload: no response topic is the first fault found.
    assert len(orphan) == 1 and isinstance(orphan[0], ErrorReply) and orphan[0].code == "bad_topic"
    assert sum(worker.stats.errors_by_code.values()) == len(cases) + 1
    assert worker.stats.replies == 1


@async_test(120)
async def test_overflow_answers_busy_and_counts_it(broker, model_files, image_folder, unique) -> None:
    edge_path, server_path = model_files
    model = f"tiny-{unique}"
    cfg = service_config(broker.port, edge_path, server_path, image_folder, models={"model_id": model},
                         worker={"group": f"pool-{unique}", "queue_capacity": 2},
                         batching={"max_batch": 1, "max_delay_ms": 0.0, "policy": "sequential"})
    worker = InferenceWorker(cfg, build_model(cfg.models.server, role="server"), worker_id=f"{unique}-w")
    dev = f"{unique}dev"
    received: list[Incoming] = []
    client = Transport(cfg.broker, client_id=dev, handler=received.append)
    total = 40
    async with asyncio.TaskGroup() as tg:
        client_task = tg.create_task(client.run())
        await client.wait_connected()
        await client.subscribe(V1.reply(dev))
        worker_task = tg.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 30)
        await asyncio.gather(*(client.publish(V1.request(model, dev), valid_request(dev, f"r{i}"),
                                              response_topic=V1.reply(dev), correlation_data=f"r{i}".encode())
                               for i in range(total)))
        await wait_until_async(lambda: len(received) >= total, 10, 0.1,
                               message=f"an answer to each of the {total} requests")
        worker.stop()
        await worker_task
        client_task.cancel()
    replies = [decode_reply(m.payload) for m in received]
    busy = [r for r in replies if isinstance(r, ErrorReply) and r.code == "busy"]
    served = [r for r in replies if isinstance(r, Reply)]
    assert len(replies) == total, "every request is answered: served or refused, never dropped"
    assert busy and served and len(busy) + len(served) == total
    assert worker.stats.errors_by_code["busy"] == len(busy)
