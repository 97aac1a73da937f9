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

``--end-to-end N`` adds the whole worker process, measured N times (the median printed) with
``bench/broker_throughput.py --worker-processes 1 --threads 1 --precision fp32``: one worker process on
one core serving a load generator in another process through Mosquitto, and its CPU per request outside
the engine call (event loop, pixel decode thread, inference thread's own work, the collector: everything
a stage table can miss), beside Mosquitto's CPU per message in the same runs:

    .venv/bin/python bench/service_overhead.py --requests 3000 --end-to-end 3

``--against DIR`` measures another checkout the same way, each of its runs just before one of this
checkout's (this VM's speed drifts by ±20 % between minutes: only interleaved pairs compare), and prints
both medians and their ratio:

    git worktree add ../before <commit>
    .venv/bin/python bench/service_overhead.py --requests 3000 --end-to-end 3 --against ../before

``--edge MODEL`` (repeatable) measures the **edge side** instead: CPU µs per image, batch size 1 as a
device runs it, for each stage of the path a simulated device takes (the real functions:
:class:`edge_node.engine.EdgeEngine`'s stages and :class:`edge_node.device.Device`'s request, reply and
outcome code), twice: with the gate held open, so that every image is offloaded (the costlier path,
stage by stage), and through the configured gate (``gate`` in the config: min-entropy η 0.8 by
default), where an image the gate keeps skips every stage of an offload (scores, selection, encodes,
request, its MQTT round, the reply) and pays only its outcome: the CPU per image a device spends:

    .venv/bin/python bench/service_overhead.py --edge zoo:cifar10-edge --edge zoo:imagenette-edge

the source file's decode (the dataset's JPEG or PNG, standing in for a camera's frame: the total
without it is printed too), resize + center crop, normalise, the edge ViT forward with attention
(reported, left out of the total), scores, gate + top-5, patch selection, codec encode (``jpeg-mosaic``
q90), the full-image JPEG that ``edge.measure_full_bytes`` adds, request build + msgpack encode, the
MQTT client's request publish (QoS 1, PUBACK) + reply receive through Mosquitto, the reply's decode,
the outcome record + its encode, and the outcome's QoS 0 publish. Printed, for both passes: the total
outside the forward and its ratio to the 1 ms target of docs/benchmarks.md (the configured gate's MQTT
request round counted at the share of images it sent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
EDGE_LIMIT_US = 1000.0  # target: edge CPU per image outside the edge ViT forward (docs/benchmarks.md)
EDGE_SOURCES = {"cifar10": "cifar10/test.tar", "imagenette": "imagenette2/val.tar"}
# The edge stages, in the order a device runs them; all but the forward add up to the total outside it.
EDGE_STAGES = ("source_decode_us", "resize_crop_us", "normalize_us", "edge_forward_us", "scores_us", "gate_topk_us",
               "select_us", "codec_encode_us", "full_image_bytes_us", "request_encode_us", "mqtt_request_reply_us",
               "reply_decode_us", "outcome_encode_us", "outcome_publish_us")
EDGE_OUTSIDE = tuple(s for s in EDGE_STAGES if s != "edge_forward_us")


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
        props = publish_properties(correlation_data=b"corr-0001")
        assert props is not None and props.packed

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


# ---- the edge side ------------------------------------------------------------------------------

def edge_samples(model: str, input_size: int, count: int, source: str | None) -> tuple[list[Any], str]:
    """``count`` encoded images as a device reads them: the model's dataset when it is in the data root
    (``source`` overrides it; ``synthetic``: photo-like PNGs at the model's input size), else synthetic."""
    import io

    from PIL import Image

    from shared import datasets

    name = source or next((path for key, path in EDGE_SOURCES.items() if key in model), "synthetic")
    if name != "synthetic":
        try:
            return list(datasets.load(name).spread(count).samples), name
        except Exception as exc:  # no data root here: synthetic images, said so in the output
            print(f"  {name} not loadable ({exc}); synthetic images instead", file=sys.stderr)
    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(natural_image(input_size, input_size, i)).save(buf, "PNG")
        out.append(datasets.Sample(f"synthetic-{i}", buf.getvalue(), i % 10))
    return out, "synthetic"


def edge_stages(model: str, images: int, source: str | None) -> dict[str, Any]:
    """CPU µs per image of every edge stage but the MQTT ones, batch size 1: the gate held open (every
    image offloaded) and, in ``at_gate``, the configured gate (a kept image pays no offload stage)."""
    from dataclasses import replace

    from edge_node.device import Device
    from edge_node.engine import EdgeDecision, EdgeEngine
    from edge_node.runner import EdgeRunner
    from shared.bitmask import pack_mask
    from shared.datasets import crop_uint8, decode_rgb
    from shared.topics import Topics

    cfg = load_config(environ={})
    cfg = replace(cfg, edge=replace(cfg.edge, measure_full_bytes=True))  # the default, stated
    loaded = build_model(model, role="edge")
    open_gate = replace(cfg.gate, threshold=0.0)  # min-entropy ≥ 0 always: every image is offloaded
    engine = EdgeEngine(loaded, open_gate, cfg.selection, cfg.codec, measure_full_bytes=True)
    gated = EdgeEngine(loaded, cfg.gate, cfg.selection, cfg.codec, measure_full_bytes=True)  # the configured gate
    device = Device(DEVICE, cfg, EdgeRunner(engine, batch_size=1, batch_delay_ms=0.0), Topics(), "bench")
    samples, used = edge_samples(model, loaded.preprocess.input_size, images, source)
    times = dict.fromkeys(EDGE_STAGES, 0.0)  # every image offloaded (the gate held open)
    at_gate = dict.fromkeys(EDGE_STAGES, 0.0)  # the configured gate: a kept image skips the offload's stages
    sent_by_gate = kept = 0
    request_bytes = outcome_bytes = 0
    reply = encode(Reply(request_id=f"{DEVICE}.000000", label=3, topk_ids=(3, 1, 2, 4, 5),
                         topk_probs=(0.5, 0.2, 0.1, 0.1, 0.05), queue_ms=1.0, infer_ms=2.0, total_ms=3.0,
                         worker_id="bench-worker", batch_size=8))
    clock = time.thread_time

    marks_sent = ("source_decode_us", "resize_crop_us", "normalize_us", "edge_forward_us", "gate_topk_us",
                  "scores_us", "select_us", "codec_encode_us", "full_image_bytes_us", None, "request_encode_us",
                  "reply_decode_us", "outcome_encode_us")
    marks_kept = ("source_decode_us", "resize_crop_us", "normalize_us", "edge_forward_us", "gate_topk_us",
                  "outcome_encode_us")

    def one(eng: EdgeEngine, seq: int, sample: Any, into: dict[str, float] | None) -> bool:
        """One image through ``eng`` as a device takes it (an image its gate keeps skips every stage of
        an offload); its stages' CPU added to ``into``. True when the gate sent it."""
        nonlocal kept, request_bytes, outcome_bytes
        t = [clock()]
        frame = decode_rgb(sample.data)  # eng.pixels(sample), in its two steps
        t.append(clock())
        px = crop_uint8(frame, eng.loaded.preprocess)
        t.append(clock())
        batch = eng.images([px])
        t.append(clock())
        out = eng.forward(batch)
        t.append(clock())
        gate = eng.gate_topk(out)
        t.append(clock())
        rid = f"{DEVICE}.{seq:06d}"

        def decided(**sent: Any) -> EdgeDecision:  # what engine.run hands the device (edge_ms aside)
            return EdgeDecision(edge_label=gate.topk_ids[0][0], topk_ids=gate.topk_ids[0],
                                topk_probs=gate.topk_probs[0], uncertainty=gate.uncertainty[0],
                                send=bool(gate.send), height=px.shape[0], width=px.shape[1],
                                patch_size=eng.patch_size, num_patches=eng.num_patches, **sent)

        if not gate.send:  # an image kept at the edge: its outcome only
            decision = decided()
            record = device._record(rid, decision, sample, "edge", decision.edge_label)
            outcome = encode(record.to_message())
            t.append(clock())
            if into is not None:
                for key, a, b in zip(marks_kept, t[:-1], t[1:], strict=True):
                    into[key] += (b - a) * 1e6
            return False
        scores = eng.scores(out)  # the gate sends it: its patches are scored (engine.run's order)
        t.append(clock())
        selection = eng.select(scores, gate.send)[0]
        t.append(clock())
        indices = np.asarray(selection.indices, dtype=np.int64)
        payload = eng.payload(px, indices, scores[0])
        t.append(clock())
        full = eng.full_bytes(px)
        t.append(clock())
        decision = decided(indices=indices, payload=payload, full_payload_bytes=full)
        t.append(clock())
        now = time.time()
        message = encode(device.patch_request(rid, decision, sample, pack_mask(indices, decision.num_patches),
                                              now, now + 6.0))
        t.append(clock())
        device._on_message(Incoming(device.reply_topic, reply, correlation_data=rid.encode()))
        t.append(clock())
        record = device._record(rid, decision, sample, "server", 3, nbytes=len(message), latency_ms=5.0,
                                attempts=1, worker_id="bench-worker", sent_at=time.monotonic())
        outcome = encode(record.to_message())
        t.append(clock())
        if into is None:
            return True
        # (decision built between the full-image bytes and the request: part of the request stage)
        for mark, a, b in zip(marks_sent, t[:-1], t[1:], strict=True):
            into[mark or "request_encode_us"] += (b - a) * 1e6
        if into is times:  # the open gate's pass: every image offloaded
            kept += selection.num_kept
            request_bytes += len(message)
            outcome_bytes += len(outcome)
        return True

    for i, sample in enumerate(samples[: min(20, len(samples))]):  # warm up
        one(engine, i, sample, None)
        one(gated, i, sample, None)
    whole = 0.0
    for i, sample in enumerate(samples):
        one(engine, i, sample, times)
        t0 = clock()
        engine.run([sample])  # the same image through engine.run in one call: the stages' cross-check
        whole += clock() - t0
        sent_by_gate += one(gated, i, sample, at_gate)
    n = len(samples)
    result: dict[str, Any] = {k: v / n for k, v in times.items()}
    result["at_gate"] = {k: v / n for k, v in at_gate.items()}
    result.update(model=model, images=n, source=used, input_size=loaded.preprocess.input_size,
                  patch_size=loaded.patch_size, num_patches=loaded.num_patches, kept_mean=kept / n,
                  gate_send_share=sent_by_gate / n, gate=f"{cfg.gate.kind} η={cfg.gate.threshold}",
                  selection=f"{cfg.selection.rule} {cfg.selection.value}",
                  codec=f"{cfg.codec.name} q{cfg.codec.quality}", request_bytes=request_bytes / n,
                  outcome_bytes=outcome_bytes / n, engine_run_us=whole * 1e6 / n)
    return result


async def publish_round(port: int, payload_bytes: int, count: int) -> float:
    """Client CPU µs per QoS 0 publish of ``payload_bytes`` (a device's outcome message), nobody subscribed."""
    cfg = load_config(environ={}, overrides={"broker": {"port": port}}).broker
    pub = Transport(cfg, client_id="bench-outcomes", handler=None)
    payload = os.urandom(payload_bytes)
    topic = V1.metrics("edge", DEVICE)
    task = asyncio.create_task(pub.run(), name="pub")
    await pub.wait_connected()
    for _ in range(min(50, count)):
        await pub.publish(topic, payload, qos=0)
    t0 = time.process_time()
    for _ in range(count):
        await pub.publish(topic, payload, qos=0)
    used = time.process_time() - t0
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return used * 1e6 / count


def edge_main(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)  # a device's edge model on one core
    results = []
    for model in args.edge:
        result = edge_stages(model, args.images, args.edge_source)
        with BrokerProcess(port=0) as broker:
            mqtt = asyncio.run(mqtt_round(broker.port, broker.pid or 0, round(result["request_bytes"]),
                                          args.requests, args.window))
            result["mqtt_request_reply_us"] = mqtt["client_us_per_request"]
            result["outcome_publish_us"] = asyncio.run(publish_round(broker.port, round(result["outcome_bytes"]),
                                                                     args.requests))
        outside = sum(result[s] for s in EDGE_OUTSIDE)
        # At the configured gate every image pays its outcome's publish and only a sent one the request's
        # MQTT round; the in-process stages were timed image by image through that gate.
        at_gate = result["at_gate"]
        at_gate["mqtt_request_reply_us"] = result["gate_send_share"] * result["mqtt_request_reply_us"]
        at_gate["outcome_publish_us"] = result["outcome_publish_us"]
        at_gate_outside = sum(at_gate[s] for s in EDGE_OUTSIDE)
        result.update(at_gate_outside_forward_us=at_gate_outside)
        result.update(stages=list(EDGE_STAGES), outside_stages=list(EDGE_OUTSIDE), outside_forward_us=outside,
                      ratio_to_limit=outside / EDGE_LIMIT_US,
                      limit_us=EDGE_LIMIT_US, mqtt_messages=args.requests)
        results.append(result)
        print(f"edge {model}: {result['images']} images from {result['source']} "
              f"({result['input_size']} px, {result['num_patches']} patches of {result['patch_size']} px), "
              f"batch 1, every image offloaded ({result['kept_mean']:.1f} patches kept on average, "
              f"{result['codec']}, request {result['request_bytes']:.0f} bytes). CPU µs per image:")
        for key in EDGE_STAGES:
            note = "   (left out of the total)" if key == "edge_forward_us" else ""
            print(f"  {key:<32}{result[key]:>10.1f}{note}")
        print(f"  {'outside_forward_us':<32}{outside:>10.1f}   ratio to the {EDGE_LIMIT_US:.0f} µs target: "
              f"{outside / EDGE_LIMIT_US:.2f}")
        print(f"  {'... without source_decode_us':<32}{outside - result['source_decode_us']:>10.1f}   (a camera that "
              "hands over decoded frames; the dataset's files are JPEG/PNG)")
        print(f"  at the configured gate ({result['gate']}: {result['gate_send_share']:.0%} of these images sent, "
              "a kept one skips the offload's stages), per image:")
        print(f"  {'outside_forward_us':<32}{at_gate_outside:>10.1f}   ratio to the {EDGE_LIMIT_US:.0f} µs target: "
              f"{at_gate_outside / EDGE_LIMIT_US:.2f}")
        print(f"  {'... without source_decode_us':<32}{at_gate_outside - at_gate['source_decode_us']:>10.1f}")
        print(f"  {'... and without resize_crop_us':<32}"
              f"{at_gate_outside - at_gate['source_decode_us'] - at_gate['resize_crop_us']:>10.1f}   (a camera "
              "that hands over frames at the model's input size)")
        print(f"  {'engine_run_us (cross-check)':<32}{result['engine_run_us']:>10.1f}   "
              "(engine.run on the same image: the engine's stages, forward included, in one call)")
    if args.json:
        args.json.write_text(json.dumps({"edge": results, **machine_info()}, indent=2) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:cifar10-server")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--keep", type=float, default=0.83, help="kept fraction of the patches")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--window", type=int, default=10, help="QoS 1 publishes outstanding in the MQTT round")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--edge", action="append", metavar="MODEL",
                    help="measure the edge side for this edge model instead (repeatable): zoo:cifar10-edge, "
                         "zoo:imagenette-edge; --requests is then the MQTT round's message count")
    ap.add_argument("--images", type=int, default=500, help="images per edge model (--edge)")
    ap.add_argument("--end-to-end", type=int, default=0, metavar="N",
                    help="also measure one whole worker process through Mosquitto N times (median; ~30 s each)")
    ap.add_argument("--against", type=Path, metavar="DIR",
                    help="with --end-to-end: another checkout (e.g. a git worktree of an earlier commit) measured "
                         "the same way, in turn with this one (N interleaved pairs): a before/after on a machine "
                         "whose speed drifts")
    ap.add_argument("--edge-source", help="images for --edge: a dataset path, or 'synthetic' (default: the "
                                          "model's dataset when the data root has it)")
    args = ap.parse_args()
    if args.against is not None and not (args.against / "bench" / "broker_throughput.py").is_file():
        ap.error(f"--against {args.against}: no bench/broker_throughput.py there")
    if args.against is not None and not args.end_to_end:
        ap.error("--against compares end-to-end runs: give --end-to-end N too")
    configure("console", "warning")
    if args.edge:
        return edge_main(args)
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
    if args.end_to_end:
        result["end_to_end"] = end_to_end(args.model, args.requests, args.end_to_end, args.against)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


_E2E_KEYS = ("worker_outside_engine_cpu_ms_per_request", "worker_loop_cpu_ms_per_request",
             "worker_decode_cpu_ms_per_request", "broker_cpu_ms_per_request")


def _worker_run(checkout: Path, model: str, requests: int) -> dict[str, float]:
    """One run of ``checkout``'s bench/broker_throughput.py (its own code: the script puts its checkout
    first on the path): one worker process on one core, fp32, through Mosquitto."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pool.json"
        subprocess.run([sys.executable, str(checkout / "bench" / "broker_throughput.py"), "--model", model,
                        "--codec", "jpeg-mosaic", "--keep", "0.83", "--requests", str(requests), "--rounds", "1",
                        "--in-flight", "128", "--worker-processes", "1", "--threads", "1", "--precision", "fp32",
                        "--json", str(out)], check=True, stdout=subprocess.DEVNULL, cwd=checkout)
        figures = json.loads(out.read_text())
    return {k: float(figures[k]) for k in _E2E_KEYS}


def end_to_end(model: str, requests: int, runs: int, against: Path | None = None) -> dict[str, Any]:
    """Median over ``runs`` of bench/broker_throughput.py's single-worker figures (one core, fp32); with
    ``against``, that checkout too, each run of it just before this checkout's (interleaved pairs)."""
    import statistics

    here = Path(__file__).resolve().parent.parent
    checkouts = {"this checkout": here} if against is None else {"against": against.resolve(), "this checkout": here}
    samples: dict[str, dict[str, list[float]]] = {name: {k: [] for k in _E2E_KEYS} for name in checkouts}
    for i in range(runs):
        said = []
        for name, checkout in checkouts.items():
            figures = _worker_run(checkout, model, requests)
            for k in _E2E_KEYS:
                samples[name][k].append(figures[k])
            said.append(f"{name} {figures[_E2E_KEYS[0]] * 1000:.0f}")
        print(f"  end to end, run {i + 1}/{runs}: worker outside the engine call, µs per request: "
              + ", ".join(said), file=sys.stderr)
    result: dict[str, Any] = {"runs": runs}
    for name in checkouts:
        median = {k: statistics.median(v) * 1000 for k, v in samples[name].items()}
        # Mosquitto routes two messages per request (the request, the reply), each with its PUBACKs.
        per_message = median["broker_cpu_ms_per_request"] / 2
        outside = median["worker_outside_engine_cpu_ms_per_request"]
        loop, decode = median["worker_loop_cpu_ms_per_request"], median["worker_decode_cpu_ms_per_request"]
        where = "" if against is None else f" [{name}]"
        ratio = outside / per_message if per_message else None  # /proc counts 10 ms ticks: a short run may see none
        print(f"end to end{where} (one worker process on one core, fp32, median of {runs} runs): CPU µs per request "
              f"outside the engine call {outside:.0f} (event loop {loop:.0f}, pixel decode {decode:.0f}, the rest "
              f"{outside - loop - decode:.0f}); Mosquitto {per_message:.1f} µs per message; ratio "
              + (f"{ratio:.1f}" if ratio is not None else "n/a (Mosquitto used under one clock tick)"))
        figures_of = {"samples_ms": samples[name], "median_us": median, "mosquitto_us_per_message": per_message,
                      "ratio_to_mosquitto": ratio}
        if against is None:
            result.update(figures_of)
        else:
            result[name.replace(" ", "_")] = figures_of
    if against is not None:
        before = statistics.median(samples["against"][_E2E_KEYS[0]])
        after = statistics.median(samples["this checkout"][_E2E_KEYS[0]])
        result["against"]["checkout"] = str(against)
        result["change"] = after / before - 1.0
        print(f"this checkout ÷ {against}: {after / before:.2f} ({after / before - 1.0:+.0%}) outside the engine call, "
              f"medians of {runs} interleaved pairs")
    return result

if __name__ == "__main__":
    raise SystemExit(main())
