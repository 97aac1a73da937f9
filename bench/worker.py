"""Worker throughput through the broker vs the same batches run in-process.

    .venv/bin/python bench/worker.py                 # DeiT-Base shape (random init), 256 requests
    .venv/bin/python bench/worker.py --quick         # DeiT-Tiny shape, a smoke run

Requests are real PatchRequests: natural-looking 224×224 images, patches kept at a mix of ~75 %
and ~32 % of 196 (alternating), JPEG-encoded, all built before timing. Two measurements, in one
run, on one machine:

* **broker**: a local Mosquitto (the project's broker/mosquitto.conf), one InferenceWorker in this
  process, and a load generator in a child process (as devices are: it shares the CPU, not this
  process's GIL; ``--same-process-load`` puts it on the worker's event loop, the method before)
  that keeps ``--in-flight`` requests outstanding (so the batcher always has work). Replies/s from
  the first request to the last reply. Includes msgpack decode and validation, pixel decode
  (decode thread), batching, inference, reply encode and publish.
* **in-process**: the *same batches* (the sizes the worker formed, over the same requests in order)
  through the same :class:`ServerEngine` on pixels decoded beforehand: the model alone.

Their ratio is what the service costs on top of the model (target: ≥ 0.90).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference_worker.batcher import BatchReport
from inference_worker.engine import PatchSet, ServerEngine, configure_threads, resolve_precision
from inference_worker.service import InferenceWorker
from patchcast.broker import BrokerProcess
from shared.config import BatchingConfig, BrokerConfig, load_config
from shared.heap import retain_freed_memory
from shared.logs import configure
from shared.models import LoadedModel, build_model
from shared.protocol import PatchRequest, Reply, build_request, decode_patches, decode_reply, encode
from shared.topics import V1
from shared.transport import Incoming, Transport

T = TypeVar("T")
SCRIPT = Path(__file__).resolve()


def natural_image(size: int, seed: int) -> np.ndarray:
    """Smooth colour gradients, blobs and mild noise: JPEG sizes like photos, deterministic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = np.zeros((size, size, 3))
    for c in range(3):
        img[..., c] = 128 + 70 * np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y)
                                        + rng.uniform(0, 6.3))
    for _ in range(6):
        cy, cx, r = rng.uniform(0, 1, 3) * (1, 1, 0.25) + (0, 0, 0.05)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - blob) + rng.uniform(0, 255, 3) * blob
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def make_requests(loaded: LoadedModel, count: int, keeps: list[float], codec: str, quality: int,
                  devices: list[str]) -> list[PatchRequest]:
    """``count`` requests, dealt round-robin to ``devices`` (one load-generator process each)."""
    size, p, n = loaded.preprocess.input_size, loaded.patch_size, loaded.num_patches
    rng = np.random.default_rng(0)
    images = [natural_image(size, s) for s in range(16)]
    requests = []
    for i in range(count):
        k = max(1, round(keeps[i % len(keeps)] * n))
        idx = np.sort(rng.choice(n, size=k, replace=False))
        requests.append(build_request(
            device_id=devices[i % len(devices)], request_id=f"r{i:06d}", pixels=images[i % len(images)],
            indices=idx, patch_size=p,
            codec=codec, codec_params={"q": quality} if codec.startswith(("jpeg", "webp")) else None,
            topk_ids=[0], topk_probs=[0.5], uncertainty=1.0, sent_at=time.time()))
    return requests


async def generate_load(broker_cfg: BrokerConfig, device: str, model: str, items: list[tuple[str, bytes]],
                        in_flight: int) -> tuple[float, float]:
    """Publish every request (keeping ``in_flight`` outstanding) and wait for every reply: the
    ``time.monotonic()`` (one clock for every process of the machine) of the first publish and of
    the last reply."""
    done = asyncio.Event()
    answered: set[str] = set()
    slots = asyncio.Semaphore(in_flight)

    def on_reply(msg: Incoming) -> None:
        reply = decode_reply(msg.payload)
        assert isinstance(reply, Reply), reply
        if reply.request_id not in answered:
            answered.add(reply.request_id)
            slots.release()
        if len(answered) == len(items):
            done.set()

    client = Transport(broker_cfg, client_id=device, handler=on_reply)
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(client.run(), name="load-client")
        await client.subscribe(V1.reply(device))
        await client.wait_connected()
        start = time.monotonic()

        async def send(request_id: str, payload: bytes) -> None:
            await client.publish(V1.request(model, device), payload, qos=1, response_topic=V1.reply(device),
                                 correlation_data=request_id.encode())

        for request_id, payload in items:
            await slots.acquire()
            tg.create_task(send(request_id, payload))
        await done.wait()
        end = time.monotonic()
        runner.cancel()
    return start, end


def load_generator_main(folder: Path) -> int:
    """Child process: the devices' side of a broker round (``--load-generator FOLDER``)."""
    spec = json.loads((folder / "spec.json").read_text())
    items = [(str(rid), bytes(payload)) for rid, payload in msgpack.unpackb((folder / "payloads").read_bytes())]
    broker_cfg = load_config(environ={}, overrides={"broker": {"port": spec["port"]}}).broker
    start, end = asyncio.run(generate_load(broker_cfg, spec["device"], spec["model"], items, spec["in_flight"]))
    print(json.dumps({"start": start, "end": end, "replies": len(items)}))
    return 0


async def through_broker(cfg, server: LoadedModel, requests: list[PatchRequest], in_flight: int,  # type: ignore[no-untyped-def]
                         model: str, same_process: bool = False) -> tuple[float, list[int], dict[str, float]]:
    """One broker round: the worker in this process; the load generator in a child process (as
    devices are: no share of this process's GIL) or, with ``same_process``, on this event loop."""
    payloads = [encode(r) for r in requests]
    by_device: dict[str, list[tuple[str, bytes]]] = {}
    for r, p in zip(requests, payloads, strict=True):
        by_device.setdefault(r.device_id, []).append((r.request_id, p))
    reports: list[BatchReport] = []
    worker = InferenceWorker(cfg, server, worker_id="bench-worker")
    worker.batcher.on_batch = lambda r: (worker.stats.on_batch(r), reports.append(r))  # type: ignore[func-returns-value]

    async def child(folder: Path, device: str, items: list[tuple[str, bytes]]) -> tuple[float, float]:
        (folder / "payloads").write_bytes(msgpack.packb(items))
        (folder / "spec.json").write_text(json.dumps({"port": cfg.broker.port, "device": device, "model": model,
                                                      "in_flight": max(1, in_flight // len(by_device))}))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPT), "--load-generator", str(folder),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 1800)
        if proc.returncode != 0:
            raise SystemExit(f"load generator failed ({proc.returncode}):\n{err.decode()[-2000:]}")
        figures = json.loads(out.decode().strip().splitlines()[-1])
        return float(figures["start"]), float(figures["end"])

    async with asyncio.TaskGroup() as tg:
        serving = tg.create_task(worker.run(), name="worker")
        await asyncio.wait_for(worker.ready.wait(), 60)
        if same_process:
            (device, items), = by_device.items()
            spans = [await generate_load(cfg.broker, device, model, items, in_flight)]
        else:
            with tempfile.TemporaryDirectory(prefix="patchcast-load-") as tmp:
                folders = [Path(tmp) / str(i) for i in range(len(by_device))]
                for folder in folders:
                    folder.mkdir()
                spans = list(await asyncio.gather(*(child(f, d, items) for f, (d, items)
                                                    in zip(folders, by_device.items(), strict=True))))
        # From the first publish of any load generator to the last reply to any.
        elapsed = max(end for _, end in spans) - min(start for start, _ in spans)
        worker.stop()
        await serving
    figures = {"elapsed_s": elapsed, "bytes_mean": float(np.mean([len(p) for p in payloads])),
               "busy_s": worker.batcher.busy_s}
    return len(requests) / elapsed, [r.size for r in reports], figures


def _run_batches(engine: ServerEngine, sets: list[PatchSet], batch_sizes: list[int]) -> tuple[float, float]:
    start, i = time.perf_counter(), 0
    for size in batch_sizes:
        engine.logits_checked(sets[i:i + size])
        i += size
    elapsed = time.perf_counter() - start
    return i / elapsed, elapsed


def on_a_passing_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a thread that ends when it returns."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-setup") as pool:
        return pool.submit(fn, *args, **kwargs).result()


def in_process(engine: ServerEngine, sets: list[PatchSet], batch_sizes: list[int]) -> tuple[float, float]:
    """Replies/s of the model alone, on a dedicated thread like the worker's inference thread (the
    thread matters: torch's intra-op pool behaves differently from the main thread)."""
    return on_a_passing_thread(_run_batches, engine, sets, batch_sizes)


def ratio_summary(ratios: list[float]) -> dict[str, float]:
    """Mean, standard error, median and range of the per-round ratios: on a shared VM a single round's
    ratio swings by ±10 % (the two halves of a pair run seconds apart), so judge the mean by its error."""
    arr = np.asarray(ratios, dtype=np.float64)
    sem = float(arr.std(ddof=1) / np.sqrt(len(arr))) if len(arr) > 1 else float("nan")
    return {"ratio_mean": float(arr.mean()), "ratio_sem": sem, "ratio_median": float(np.median(arr)),
            "ratio_min": float(arr.min()), "ratio_max": float(arr.max())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="timm:deit_base_patch16_224", help="server model (random init for timm:)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--keep", default="0.75,0.32", help="kept fractions of the patches, cycled")
    ap.add_argument("--codec", default="jpeg")
    ap.add_argument("--quality", type=int, default=90)
    defaults = BatchingConfig()
    ap.add_argument("--max-batch", type=int, default=defaults.max_batch, help="default: the worker's config default")
    ap.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="default: the worker's config default")
    ap.add_argument("--max-delay-ms", type=float, default=defaults.max_delay_ms,
                    help="default: the worker's config default")
    ap.add_argument("--policy", default="packed", choices=["packed", "padded", "sequential"])
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--device", default="cpu", help="worker.device: cpu, cuda or cuda:N")
    ap.add_argument("--decode-threads", type=int, default=1, help="worker.decode_threads (pixel decode)")
    ap.add_argument("--switch-interval-ms", type=float, default=None,
                    help="Python's GIL switch interval for this process (default: Python's, 5 ms)")
    ap.add_argument("--in-flight", type=int, default=96, help="requests the load generator keeps outstanding")
    ap.add_argument("--rounds", type=int, default=6,
                    help="broker / in-process pairs to measure (one pair's ratio is noisy: ±10 %% on a shared VM)")
    ap.add_argument("--quick", action="store_true", help="DeiT-Tiny shape and 96 requests (smoke run)")
    ap.add_argument("--same-process-load", action="store_true",
                    help="run the load generator on the worker's event loop (the method before: it shares "
                         "the worker's GIL, which devices never do)")
    ap.add_argument("--load-processes", type=int, default=1,
                    help="load-generator processes, each a device with its share of the requests and of "
                         "--in-flight (one Python process of MQTT traffic tops out at a few hundred requests/s)")
    ap.add_argument("--json", type=Path, help="write the figures as JSON")
    ap.add_argument("--load-generator", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_processes < 1 or (args.same_process_load and args.load_processes > 1):
        ap.error("--load-processes must be ≥ 1, and 1 with --same-process-load")
    if args.load_generator:
        return load_generator_main(args.load_generator)
    if args.quick:
        args.model, args.requests = "timm:deit_tiny_patch16_224", min(args.requests, 96)
    configure("console", "warning")
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    heap = retain_freed_memory()  # as run_worker does with the default worker.retain_heap
    threads = configure_threads(args.threads)
    # Torch work only on threads that end (as the worker keeps it on its inference thread): a thread
    # that ran a parallel op keeps an OpenMP team while it lives, and with more OpenMP threads than
    # cores libgomp stops spinning at barriers (see inference_worker.service.inference_pool).
    loaded = on_a_passing_thread(build_model, args.model, role="server")
    keeps = [float(k) for k in args.keep.split(",")]
    model_id = "bench"
    with BrokerProcess(port=0) as broker:
        cfg = load_config(environ={}, overrides={
            "broker": {"port": broker.port},
            "models": {"server": args.model, "model_id": model_id},
            "batching": {"max_batch": args.max_batch, "max_tokens": args.max_tokens,
                         "max_delay_ms": args.max_delay_ms, "policy": args.policy},
            "worker": {"threads": args.threads, "precision": args.precision, "queue_capacity": 1024,
                       "metrics_interval_s": 5.0, "device": args.device, "decode_threads": args.decode_threads}})
        devices = [f"bench-device-{i}" for i in range(args.load_processes)] if args.load_processes > 1 else \
            ["bench-device"]
        requests = make_requests(loaded, args.requests, keeps, args.codec, args.quality, devices)
        engine = on_a_passing_thread(lambda: ServerEngine(
            loaded, cfg.batching, resolve_precision(args.precision, args.device),
            prepack=cfg.worker.prepack_weights, device=args.device))
        t0 = time.perf_counter()
        sets = [PatchSet(decode_patches(r), r.indices) for r in requests]
        decode_ms = (time.perf_counter() - t0) * 1000 / len(requests)
        # Warm both paths (oneDNN primitive creation, allocator) on a few batches first.
        in_process(engine, sets, [min(args.max_batch, len(sets))] * 2)
        # Alternate the two paths (broker, then the same batches in-process) for --rounds rounds: on a
        # shared machine the load drifts, and each pair is measured under similar conditions.
        rounds = []
        for _ in range(args.rounds):
            broker_rps, sizes, figures = asyncio.run(through_broker(cfg, loaded, requests, args.in_flight,
                                                                    model_id, args.same_process_load))
            inproc_rps, _ = in_process(engine, sets, sizes)
            rounds.append({"broker_replies_per_s": broker_rps, "in_process_replies_per_s": inproc_rps,
                           "ratio": broker_rps / inproc_rps, "batches": len(sizes),
                           "batch_size_mean": float(np.mean(sizes)),
                           "worker_busy_fraction": figures["busy_s"] / figures["elapsed_s"]})
    tokens = [r.kept + 1 for r in requests]
    result = {
        "model": args.model, "precision": engine.precision, "policy": args.policy, "threads": threads,
        "device": str(engine.device), "attention": engine.attention, "decode_threads": args.decode_threads,
        "switch_interval_ms": sys.getswitchinterval() * 1000,
        "load_generator": "same process" if args.same_process_load else f"{args.load_processes} child process(es)",
        "heap": heap.reason, "requests": len(requests), "tokens_mean": float(np.mean(tokens)),
        "payload_bytes_mean": figures["bytes_mean"],
        "pixel_decode_ms_per_request": decode_ms, "rounds": rounds,
        **ratio_summary([r["ratio"] for r in rounds]),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
    }
    print(f"model {args.model} ({engine.precision}, {args.policy}, {threads} threads, {engine.device}, attention "
          f"{engine.attention}, {args.decode_threads} decode thread(s), GIL switch interval "
          f"{sys.getswitchinterval() * 1000:g} ms), {len(requests)} requests, "
          f"mean {result['tokens_mean']:.0f} tokens, {result['payload_bytes_mean'] / 1024:.1f} KiB each; "
          f"pixel decode {decode_ms:.2f} ms/request; heap: {heap.reason}; load generator: "
          f"{result['load_generator']}")
    print(f"{'round':<7}{'batches':>9}{'mean size':>11}{'in-process/s':>14}{'broker/s':>11}{'ratio':>8}{'busy':>7}")
    for i, r in enumerate(rounds, 1):
        print(f"{i:<7}{r['batches']:>9}{r['batch_size_mean']:>11.1f}{r['in_process_replies_per_s']:>14.2f}"
              f"{r['broker_replies_per_s']:>11.2f}{r['ratio']:>8.3f}{r['worker_busy_fraction']:>7.2f}")
    spread = (f" ± {result['ratio_sem']:.3f} (standard error), median {result['ratio_median']:.3f}, "
              f"range {result['ratio_min']:.3f}–{result['ratio_max']:.3f}" if len(rounds) > 1 else "")
    print(f"mean ratio (broker ÷ in-process): {result['ratio_mean']:.3f}{spread}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
