"""Graceful shutdown: stop taking work, answer everything queued, publish offline, leave."""

from __future__ import annotations

import asyncio

from service_helpers import async_test, service_config, valid_request
from waiting import wait_until_async

from inference_worker.service import InferenceWorker
from shared.models import build_model
from shared.protocol import Reply, decode_availability, decode_reply
from shared.topics import V1
from shared.transport import Incoming, Transport


@async_test(90)
async def test_stop_answers_what_is_queued_then_goes_offline(broker, model_files, image_folder, unique) -> None:
    edge_path, server_path = model_files
    model = f"tiny-{unique}"
    # Requests wait up to 2 s for batch-mates: they are still queued when the stop comes.
    cfg = service_config(broker.port, edge_path, server_path, image_folder, models={"model_id": model},
                         worker={"group": f"pool-{unique}"}, batching={"max_batch": 64, "max_delay_ms": 2000.0})
    worker = InferenceWorker(cfg, build_model(cfg.models.server, role="server"), worker_id=f"{unique}-w")
    dev = f"{unique}dev"
    replies: list[Incoming] = []
    states: list[str] = []
    client = Transport(cfg.broker, client_id=dev, handler=replies.append)
    watcher = Transport(cfg.broker, client_id=f"{unique}-watch",
                        handler=lambda m: states.append(decode_availability(m.payload).state))
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(client.run()), tg.create_task(watcher.run())]
        await client.subscribe(V1.reply(dev))
        await watcher.subscribe(V1.availability("worker", worker.worker_id))
        await client.wait_connected()
        await watcher.wait_connected()
        worker_task = tg.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 30)
        await asyncio.gather(*(client.publish(V1.request(model, dev), valid_request(dev, f"r{i}"),
                                              response_topic=V1.reply(dev), correlation_data=f"r{i}".encode())
                               for i in range(10)))
        await wait_until_async(lambda: worker.batcher.depth == 10, 10, 0.01, message="the ten requests queued")
        worker.stop()
        await worker_task
        await wait_until_async(lambda: len(replies) >= 10 and states[-1:] == ["offline"], 10,
                               message="the ten replies and the offline availability")
        for t in tasks:
            t.cancel()
    answers = [decode_reply(m.payload) for m in replies]
    assert len(answers) == 10 and all(isinstance(a, Reply) for a in answers)
    assert states == ["online", "offline"]
    assert worker.stats.replies == 10 and not worker.stats.errors_by_code
