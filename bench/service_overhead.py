"""CPU per request outside the model, stage by stage, beside Mosquitto's own CPU per message.

    .venv/bin/python bench/service_overhead.py                # zoo:cifar10-server, 2,000 requests
    .venv/bin/python bench/service_overhead.py --requests 500 # a quicker run

Requests are real PatchRequests as a device builds them (natural-looking images at the model's input
size, ~83 % of the patches kept as the zoo edge keeps them, the default ``jpeg-mosaic`` codec). One
run, one process, CPU time (``time.thread_time``) per request for:

* **worker stages, in-process**: msgpack decode + validation of the request and its MQTT properties,
  pixel decode, the model forward (batches of ``--batch``, the worker's engine: reported, and left out
  of the overhead), reply build + msgpack encode, reply publish properties + packet-size check;
* **MQTT through a real Mosquitto**: one :class:`shared.transport.Transport` publishing QoS 1 messages
  of the request's size to a second Transport in the same process that receives them (what one
  request's receive plus one reply's publish cost the worker's client, PUBACKs included), against
  Mosquitto's own CPU (``/proc/<pid>/stat`` utime + stime) for the same messages: the floor.

The ratio printed last, PatchCast's CPU per request outside the model ÷ Mosquitto's CPU per message,
is the figure to shrink.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import natural_image
from inference_worker.engine import PatchSet, ServerEngine
from patchcast.broker import BrokerProcess
from shared.config import load_config
from shared.logs import configure
from shared.machine import machine_info
from shared.models import build_model
from shared.protocol import (
    DEFAULT_LIMITS,
    PatchRequest,
    Reply,
    build_request,
    check_properties,
    check_request_owner,
    check_response_topic,
    decode_patches,
    decode_request,
    encode,
)
from shared.topics import V1
from shared.transport import Incoming, Transport, publish_properties

DEVICE = "bench-device"


def cpu_us(fn: Callable[[], Any], count: int) -> float:
    """Thread CPU µs per call of ``fn`` over ``count`` calls."""
    t0 = time.thread_time()
    for _ in range(count):
        fn()
    return (time.thread_time() - t0) * 1e6 / count


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_requests(size: int, patch: int, count: int, keep: float) -> list[PatchRequest]:
    n = (size // patch) ** 2
    rng = np.random.default_rng(0)
    images = [natural_image(size, size, s) for s in range(16)]
    out = []
    for i in range(count):
        idx = np.sort(rng.choice(n, size=max(1, round(keep * n)), replace=False))
        out.append(build_request(device_id=DEVICE, request_id=f"{DEVICE}.{i:06d}", pixels=images[i % 16],
                                 indices=idx, patch_size=patch, codec="jpeg-mosaic", codec_params={"q": 90},
                                 topk_ids=[1, 2, 3, 4, 5], topk_probs=[0.3, 0.2, 0.1, 0.1, 0.1],
                                 uncertainty=1.0, sent_at=time.time()))
    return out


def worker_stages(requests: list[PatchRequest], engine: ServerEngine, batch: int) -> dict[str, float]:
    payloads = [encode(r) for r in requests]
    count = len(payloads)
    own_reply = V1.reply(DEVICE)
    it = iter(range(10**9))

    def validate() -> None:
        i = next(it) % count
        check_properties(b"corr-0001", (), DEFAULT_LIMITS)
        check_response_topic(own_reply, own_reply)
        check_request_owner(decode_request(payloads[i], limits=DEFAULT_LIMITS), DEVICE)

    decoded = [decode_request(p) for p in payloads]
    pix = iter(range(10**9))
    stages = {"decode_validate_us": cpu_us(validate, count),
              "pixel_decode_us": cpu_us(lambda: decode_patches(decoded[next(pix) % count]), count)}
    sets = [PatchSet(decode_patches(r), r.indices) for r in decoded]
    engine.logits_checked(sets[:batch])  # warm
    t0 = time.thread_time()
    for start in range(0, count, batch):
        engine.logits_checked(sets[start:start + batch])
    stages["model_forward_us"] = (time.thread_time() - t0) * 1e6 / count

    def reply() -> None:
        r = decoded[next(pix) % count]
        message = Reply(request_id=r.request_id, label=3, topk_ids=(3, 1, 2, 4, 5),
                        topk_probs=(0.5, 0.2, 0.1, 0.1, 0.05), queue_ms=1.0, infer_ms=2.0, total_ms=3.0,
                        worker_id="bench-worker", batch_size=batch)
        encode(message, limits=DEFAULT_LIMITS)
        publish_properties(correlation_data=b"corr-0001").pack()  # type: ignore[union-attr]

    stages["reply_encode_us"] = cpu_us(reply, count)
    return stages


async def mqtt_round(port: int, broker_pid: int, payload_bytes: int, count: int, window: int) -> dict[str, float]:
    """``count`` QoS 1 publishes (``window`` outstanding) from one Transport to another through Mosquitto."""
    cfg = load_config(environ={}, overrides={"broker": {"port": port}}).broker
    got = asyncio.Event()
    received = 0

    def on_message(msg: Incoming) -> None:
        nonlocal received
        received += 1
        if received == count:
            got.set()

    topic = V1.request("bench", DEVICE)
    sub = Transport(cfg, client_id="bench-sub", handler=on_message)
    pub = Transport(cfg, client_id="bench-pub", handler=None, max_in_flight=window)
    payload = os.urandom(payload_bytes)
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(sub.run(), name="sub"), tg.create_task(pub.run(), name="pub")]
        await sub.subscribe(topic, qos=1)
        await sub.wait_connected()
        await pub.wait_connected()
        slots = asyncio.Semaphore(window)

        async def one() -> None:
            try:
                await pub.publish(topic, payload, qos=1, response_topic=V1.reply(DEVICE), correlation_data=b"corr-0001")
            finally:
                slots.release()

        broker0, own0, wall0 = proc_cpu_s(broker_pid), time.process_time(), time.monotonic()
        for _ in range(count):
            await slots.acquire()
            tg.create_task(one())
        await asyncio.wait_for(got.wait(), 300)
        wall = time.monotonic() - wall0
        own, broker = time.process_time() - own0, proc_cpu_s(broker_pid) - broker0
        for t in tasks:
            t.cancel()
    # Each message: one publish (+ its PUBACK) on one client, one receive (+ the PUBACK it sends) on the
    # other: what a worker's client does for one request received and one reply sent.
    return {"client_us_per_request": own * 1e6 / count, "mosquitto_us_per_message": broker * 1e6 / (2 * count),
            "messages_per_s": count / wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:cifar10-server")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--keep", type=float, default=0.83, help="kept fraction of the patches")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--window", type=int, default=10, help="QoS 1 publishes outstanding in the MQTT round")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    configure("console", "warning")
    import torch

    torch.set_num_threads(1)
    loaded = build_model(args.model, role="server")
    cfg = load_config(environ={})
    engine = ServerEngine(loaded, cfg.batching, "fp32", prepack=False, device="cpu")
    requests = make_requests(loaded.preprocess.input_size, loaded.patch_size, args.requests, args.keep)
    stages = worker_stages(requests, engine, args.batch)
    with BrokerProcess(port=0) as broker:
        mqtt = asyncio.run(mqtt_round(broker.port, broker.pid or 0, len(encode(requests[0])), args.requests,
                                      args.window))
    outside = (stages["decode_validate_us"] + stages["pixel_decode_us"] + stages["reply_encode_us"]
               + mqtt["client_us_per_request"])
    result = {"model": args.model, "requests": args.requests, "payload_bytes": len(encode(requests[0])),
              **stages, **mqtt, "outside_model_us_per_request": outside,
              # /proc counts in clock ticks (10 ms): a short run may see none of Mosquitto's CPU
              "ratio_to_mosquitto": outside / mqtt["mosquitto_us_per_message"] if mqtt["mosquitto_us_per_message"]
              else None, **machine_info()}
    print(f"model {args.model}, {args.requests} requests of {result['payload_bytes']} bytes "
          f"({args.keep:.0%} of the patches, jpeg-mosaic q90); CPU µs per request (thread/process time):")
    for key in ("decode_validate_us", "pixel_decode_us", "reply_encode_us", "client_us_per_request",
                "outside_model_us_per_request", "model_forward_us", "mosquitto_us_per_message"):
        print(f"  {key:<32}{result[key]:>10.1f}")
    print(f"  MQTT round: {mqtt['messages_per_s']:.0f} messages/s through Mosquitto")
    ratio = result["ratio_to_mosquitto"]
    print("ratio (PatchCast per request outside the model ÷ Mosquitto per message): "
          + (f"{ratio:.1f}" if ratio is not None else "n/a (Mosquitto used under one clock tick: use more requests)"))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
