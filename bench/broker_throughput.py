"""Worker throughput through the broker vs the same batches run in-process.

    .venv/bin/python bench/broker_throughput.py                 # DeiT-Base shape (random init), 256 requests
    .venv/bin/python bench/broker_throughput.py --quick         # DeiT-Tiny shape, a smoke run

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

``--worker-processes N`` serves from N worker *processes* instead (one shared subscription group,
one device, e.g. one GPU): the way to feed a GPU, since one worker process's event loop (MQTT
handling, validation, replies in pure Python) tops out near 1,000 requests/s. The workers stay up for
all rounds; the in-process figure is then every batch the pool formed, run back to back through one
engine in this process, and the report adds the share of the inference thread's time spent in the
engine call and each process's CPU time per request (the broker, the worker's event-loop thread, the
whole worker without its children, the load generators).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

import msgpack
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import inference_worker.service as service_module
from bench.common import natural_image
from inference_worker.batcher import BatchReport
from inference_worker.engine import PatchSet, ServerEngine, configure_threads
from inference_worker.service import InferenceWorker
from patchcast.broker import BrokerProcess
from shared.children import start_child, stop_child
from shared.config import BatchingConfig, BrokerConfig, Config, load_config
from shared.heap import retain_freed_memory
from shared.logs import configure
from shared.machine import machine_info
from shared.models import LoadedModel, build_model
from shared.precision import resolve
from shared.protocol import (
    Availability,
    PatchRequest,
    Reply,
    build_request,
    decode,
    decode_patches,
    decode_reply,
    encode,
)
from shared.topics import V1
from shared.transport import Incoming, Transport

T = TypeVar("T")
SCRIPT = Path(__file__).resolve()


def make_requests(loaded: LoadedModel, count: int, keeps: list[float], codec: str, quality: int,
                  devices: list[str]) -> list[PatchRequest]:
    """``count`` requests, dealt round-robin to ``devices`` (one load-generator process each)."""
    size, p, n = loaded.preprocess.input_size, loaded.patch_size, loaded.num_patches
    rng = np.random.default_rng(0)
    images = [natural_image(size, size, s) for s in range(16)]
    requests = []
    for i in range(count):
        k = max(1, round(keeps[i % len(keeps)] * n))
        idx = np.sort(rng.choice(n, size=k, replace=False))
        requests.append(build_request(
            device_id=devices[i % len(devices)], request_id=f"{devices[i % len(devices)]}.{i:06d}",
            pixels=images[i % len(images)],
            indices=idx, patch_size=p,
            codec=codec, codec_params={"q": quality} if codec.startswith(("jpeg", "webp")) else None,
            topk_ids=[0], topk_probs=[0.5], uncertainty=1.0, sent_at=time.time()))
    return requests


class LoadRoundError(RuntimeError):
    """A broker round that cannot give a timing: a worker refused a request, or replies stopped."""


async def generate_load(broker_cfg: BrokerConfig, device: str, model: str, items: list[tuple[str, bytes]],
                        in_flight: int, stall_s: float = 120.0) -> tuple[float, float]:
    """Publish every request (keeping ``in_flight`` outstanding) and wait for every reply: the
    ``time.monotonic()`` (one clock for every process of the machine) of the first publish and of
    the last reply.

    An error reply ends the round (a refused request would leave its slot taken forever, and a
    timing with refusals in it measures nothing), and so do ``stall_s`` seconds without a reply."""
    done = asyncio.Event()
    answered: set[str] = set()
    refusals: list[str] = []
    last_reply = time.monotonic()
    slots = asyncio.Semaphore(in_flight)

    def on_reply(msg: Incoming) -> None:
        nonlocal last_reply
        last_reply = time.monotonic()
        reply = decode_reply(msg.payload)
        if not isinstance(reply, Reply):
            refusals.append(f"{reply.request_id}: {reply.code}: {reply.message}")
            done.set()
            return
        if reply.request_id not in answered:
            answered.add(reply.request_id)
            slots.release()
        if len(answered) == len(items):
            done.set()

    async def watchdog() -> None:
        while not done.is_set():
            await asyncio.sleep(min(1.0, stall_s))
            if time.monotonic() - last_reply > stall_s:
                done.set()

    client = Transport(broker_cfg, client_id=device, handler=on_reply)
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(client.run(), name="load-client")
        await client.subscribe(V1.reply(device))
        await client.wait_connected()
        start = last_reply = time.monotonic()
        stall = tg.create_task(watchdog(), name="load-watchdog")

        async def send(request_id: str, payload: bytes) -> None:
            await client.publish(V1.request(model, device), payload, qos=1, response_topic=V1.reply(device),
                                 correlation_data=request_id.encode())

        async def acquire_slot() -> None:
            # a refusal or a stall frees no slot: stop waiting for one when the round has ended
            waiter = asyncio.ensure_future(slots.acquire())
            ended = asyncio.ensure_future(done.wait())
            await asyncio.wait({waiter, ended}, return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
            if not waiter.done():
                waiter.cancel()

        for request_id, payload in items:
            await acquire_slot()
            if done.is_set():
                break
            tg.create_task(send(request_id, payload))
        await done.wait()
        end = time.monotonic()
        stall.cancel()
        runner.cancel()
    if refusals:
        raise LoadRoundError(f"{len(refusals)} request(s) refused, first: {refusals[0]}")
    if len(answered) < len(items):
        raise LoadRoundError(f"replies stopped: {len(answered)} of {len(items)} answered, "
                             f"none for {stall_s:.0f} s")
    return start, end


def load_generator_main(folder: Path) -> int:
    """Child process: the devices' side of a broker round (``--load-generator FOLDER``). Writes its
    figures to ``FOLDER/result.json``; exits 2, with the reason on stderr, when the round gives no timing."""
    spec = json.loads((folder / "spec.json").read_text())
    items = [(str(rid), bytes(payload)) for rid, payload in msgpack.unpackb((folder / "payloads").read_bytes())]
    broker_cfg = load_config(environ={}, overrides={"broker": {"port": spec["port"]}}).broker
    cpu_before = process_cpu_s()  # not the imports'
    try:
        start, end = asyncio.run(generate_load(broker_cfg, spec["device"], spec["model"], items, spec["in_flight"],
                                               float(spec.get("stall_s", 120.0))))
    except LoadRoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (folder / "result.json").write_text(json.dumps({"start": start, "end": end, "replies": len(items),
                                                    "cpu_s": process_cpu_s() - cpu_before}))
    return 0


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def also_on_batch(worker: InferenceWorker, record: Callable[[BatchReport], None]) -> None:
    """Every batch report to the worker's own statistics, then to ``record``."""
    own = worker.stats.on_batch

    def both(report: BatchReport) -> None:
        own(report)
        record(report)

    worker.batcher.on_batch = both


def worker_child_main(folder: Path) -> int:
    """Child process: one worker of ``--worker-processes`` (``--worker-child FOLDER``). Creates
    ``FOLDER/ready`` once subscribed, serves until SIGTERM, then writes its batch sizes and CPU times to
    ``FOLDER/result.json``."""
    spec = json.loads((folder / "spec.json").read_text())
    configure("console", "warning")
    if spec["switch_interval_ms"] is not None:
        sys.setswitchinterval(spec["switch_interval_ms"] / 1000)
    retain_freed_memory()
    cfg = load_config(environ={}, overrides=spec["overrides"])
    configure_threads(cfg.worker.threads)
    loaded = on_a_passing_thread(build_model, cfg.models.server, role="server")
    if cfg.worker.frontends > 1:
        return frontends_child(folder, spec, loaded)
    sizes: list[int] = []

    cpu_at_ready: list[float] = []
    engine_s = [0.0]
    engine_cpu_s = [0.0]  # the calling thread's CPU in the engine call: all of the model with --threads 1
    decode_cpu_s = [0.0]  # pixel decode's CPU, on the decode thread(s)
    plain_decode = service_module.decode_patches

    def timed_decode(request: Any) -> Any:  # the worker submits this module attribute to its decode pool
        c0 = time.thread_time()
        try:
            return plain_decode(request)
        finally:
            decode_cpu_s[0] += time.thread_time() - c0

    if not cfg.worker.decode_processes:  # (a decoder process's CPU is its own: not timed here)
        service_module.decode_patches = timed_decode  # timed, for this bench only

    async def serve() -> tuple[InferenceWorker, float]:
        worker = InferenceWorker(cfg, loaded, worker_id=spec["worker_id"])
        also_on_batch(worker, lambda r: sizes.append(r.size))
        forward = worker.engine.logits_checked

        def timed_forward(sets: Any, *rest: Any) -> Any:  # the engine's share of the batch time (the rest: pixel
            t0, c0 = time.monotonic(), time.thread_time()   # waits, top-k)
            try:
                return forward(sets, *rest)
            finally:
                engine_s[0] += time.monotonic() - t0
                engine_cpu_s[0] += time.thread_time() - c0

        worker.engine.logits_checked = timed_forward  # type: ignore[assignment]  # timed, for this bench only
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, worker.stop)
        async with asyncio.TaskGroup() as tg:
            serving = tg.create_task(worker.run(), name="worker")
            await asyncio.wait_for(worker.ready.wait(), 300)
            cpu_at_ready.extend((time.thread_time(), process_cpu_s()))  # serving starts: not the imports'
            (folder / "ready").touch()
            await serving
        # This thread runs the event loop: MQTT I/O, validation, batching, replies.
        return worker, time.thread_time() - cpu_at_ready[0]

    worker, loop_cpu_s = asyncio.run(serve())
    in_this_process = isinstance(worker.engine, ServerEngine) and worker.engine.device.type == "cuda"
    gpu_mib = torch.cuda.max_memory_allocated() / 2**20 if in_this_process else 0.0  # not seen: engine process
    (folder / "result.json").write_text(json.dumps({
        "batch_sizes": sizes, "busy_s": worker.batcher.busy_s, "engine_s": engine_s[0],
        "engine_cpu_s": engine_cpu_s[0], "decode_cpu_s": decode_cpu_s[0], "replies": worker.stats.replies,
        "loop_cpu_s": loop_cpu_s, "cpu_s": process_cpu_s() - cpu_at_ready[1], "gpu_peak_mib": gpu_mib}))
    return 0


async def wait_online(broker_cfg: BrokerConfig, ids: set[str], timeout_s: float) -> None:
    """Until every worker in ``ids`` has said "online" on its retained availability topic."""
    seen: set[str] = set()
    done = asyncio.Event()

    def on_availability(msg: Incoming) -> None:
        message = decode(msg.payload)
        if isinstance(message, Availability) and message.state == "online":
            seen.add(message.ident)
            if seen >= ids:
                done.set()

    client = Transport(broker_cfg, client_id=f"bench-watch-{os.getpid()}", handler=on_availability)
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(client.run(), name="watch")
        await client.wait_connected()
        for ident in ids:
            await client.subscribe(V1.availability("worker", ident))
        await asyncio.wait_for(done.wait(), timeout_s)
        runner.cancel()


def frontends_child(folder: Path, spec: dict[str, Any], loaded: LoadedModel) -> int:
    """A ``--worker-child`` with ``--frontends``: ``patchcast worker --frontends N`` (its engine process
    and N worker processes) in this process; ``FOLDER/ready`` once all N are online. It reports no batch
    sizes (they form in its children), so the benchmark measures replies/s through the broker only."""
    from inference_worker.frontends import run_frontends

    overrides = {**spec["overrides"], "worker": {**spec["overrides"]["worker"], "worker_id": spec["worker_id"]}}
    cfg = load_config(environ={}, overrides=overrides)
    ids = {f"{spec['worker_id']}-f{i}" for i in range(1, cfg.worker.frontends + 1)}

    def announce() -> None:
        asyncio.run(wait_online(cfg.broker, ids, 600))
        (folder / "ready").touch()

    threading.Thread(target=announce, name="announce", daemon=True).start()
    code = run_frontends(cfg, server=loaded)
    (folder / "result.json").write_text(json.dumps({"frontends": cfg.worker.frontends, "exit_code": code}))
    return code


def by_device(requests: list[PatchRequest]) -> dict[str, list[tuple[str, bytes]]]:
    """Encoded requests per device (one load-generator process each)."""
    grouped: dict[str, list[tuple[str, bytes]]] = {}
    for r in requests:
        grouped.setdefault(r.device_id, []).append((r.request_id, encode(r)))
    return grouped


def open_log(path: Path) -> IO[bytes]:
    """A bench child's output file (stdout and stderr); the caller closes it."""
    return open(path, "wb")


async def run_child(argv: list[str], folder: Path, timeout_s: float) -> dict[str, Any]:
    """One bench child under the pool supervisor's own start/stop (:func:`start_child`, :func:`stop_child`):
    its output to ``FOLDER/log``, its figures from ``FOLDER/result.json``; SystemExit with the log's tail
    when it fails or outlives ``timeout_s``."""
    with open_log(folder / "log") as output:
        proc = await start_child(argv, output=output)
        try:
            async with asyncio.timeout(timeout_s):
                code = await proc.wait()
        except TimeoutError:
            code, _ = await stop_child(proc, 10.0)
    result = folder / "result.json"
    if code != 0 or not result.exists():
        raise SystemExit(f"{folder.name} failed ({code}):\n{(folder / 'log').read_text(errors='replace')[-2000:]}")
    return dict(json.loads(result.read_text()))


async def load_processes(cfg: Config, grouped: dict[str, list[tuple[str, bytes]]], in_flight: int,
                         model: str) -> list[dict[str, float]]:
    """One load-generator process per device, all at once; each one's figures (monotonic start and
    end, replies, CPU seconds)."""

    async def child(folder: Path, device: str, items: list[tuple[str, bytes]]) -> dict[str, float]:
        (folder / "payloads").write_bytes(msgpack.packb(items))
        (folder / "spec.json").write_text(json.dumps({"port": cfg.broker.port, "device": device, "model": model,
                                                      "in_flight": max(1, in_flight // len(grouped))}))
        return await run_child([sys.executable, str(SCRIPT), "--load-generator", str(folder)], folder, 1800)

    with tempfile.TemporaryDirectory(prefix="patchcast-load-") as tmp:
        folders = [Path(tmp) / f"load-{i}" for i in range(len(grouped))]
        for folder in folders:
            folder.mkdir()
        return list(await asyncio.gather(*(child(f, d, items) for f, (d, items)
                                           in zip(folders, grouped.items(), strict=True))))


async def through_broker(cfg: Config, server: LoadedModel, requests: list[PatchRequest], in_flight: int,
                         model: str, same_process: bool = False) -> tuple[float, list[int], dict[str, float]]:
    """One broker round: the worker in this process; the load generator in a child process (as
    devices are: no share of this process's GIL) or, with ``same_process``, on this event loop."""
    grouped = by_device(requests)
    payloads = [p for items in grouped.values() for _, p in items]
    reports: list[BatchReport] = []
    worker = InferenceWorker(cfg, server, worker_id="bench-worker")
    also_on_batch(worker, reports.append)

    async with asyncio.TaskGroup() as tg:
        serving = tg.create_task(worker.run(), name="worker")
        await asyncio.wait_for(worker.ready.wait(), 60)
        if same_process:
            (device, items), = grouped.items()
            spans = [await generate_load(cfg.broker, device, model, items, in_flight)]
        else:
            spans = [(float(f["start"]), float(f["end"])) for f in await load_processes(cfg, grouped,
                                                                                         in_flight, model)]
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


class WorkerPool:
    """``count`` worker processes (``--worker-child``) on one broker, one shared-subscription group,
    started and stopped as the scaler's process pool does (:func:`start_child`, :func:`stop_child`)."""

    def __init__(self, count: int, folder: Path) -> None:
        self.folders = [folder / f"worker-{i}" for i in range(count)]
        self.procs: list[asyncio.subprocess.Process] = []
        self.logs: list[IO[bytes]] = []

    async def start(self, overrides: dict[str, Any], switch_interval_ms: float | None) -> None:
        for i, sub in enumerate(self.folders):
            sub.mkdir()
            (sub / "spec.json").write_text(json.dumps({"overrides": overrides, "worker_id": f"bench-worker-{i}",
                                                         "switch_interval_ms": switch_interval_ms}))
            self.logs.append(open_log(sub / "log"))  # closed in stop()
            self.procs.append(await start_child([sys.executable, str(SCRIPT), "--worker-child", str(sub)],
                                                output=self.logs[-1]))

    async def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Until every worker has created its ``ready`` file; SystemExit with its log when one exits first
        or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        for proc, sub in zip(self.procs, self.folders, strict=True):
            while not (sub / "ready").exists():
                if proc.returncode is not None or time.monotonic() > deadline:
                    raise SystemExit(f"worker process {sub.name} did not start ({proc.returncode}):\n"
                                     f"{(sub / 'log').read_text(errors='replace')[-2000:]}")
                await asyncio.sleep(0.1)  # a file appearing has no event to wait on

    async def stop(self, timeout_s: float = 120.0) -> list[tuple[int, dict[str, Any] | None]]:
        """SIGTERM every worker (each drains and leaves; SIGKILL after ``timeout_s``): each one's exit code
        and result file (None where it wrote none)."""
        stopped = await asyncio.gather(*(stop_child(proc, timeout_s) for proc in self.procs))
        for log in self.logs:
            log.close()
        return [(code, json.loads((sub / "result.json").read_text()) if (sub / "result.json").exists() else None)
                for (code, _), sub in zip(stopped, self.folders, strict=True)]

    def results(self, stopped: list[tuple[int, dict[str, Any] | None]]) -> list[dict[str, Any]]:
        """The result files of a clean stop; SystemExit with the log of the first worker that failed."""
        for (code, result), sub in zip(stopped, self.folders, strict=True):
            if code != 0 or result is None:
                raise SystemExit(f"worker process {sub.name} failed ({code}):\n"
                                 f"{(sub / 'log').read_text(errors='replace')[-2000:]}")
        return [result for _, result in stopped if result is not None]


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_pool(args: argparse.Namespace, overrides: dict[str, Any], cfg: Config, engine: ServerEngine,
             requests: list[PatchRequest], sets: list[PatchSet], model_id: str, broker_pid: int) -> dict[str, Any]:
    """``--worker-processes``: the pool through the broker for ``--rounds`` rounds, then every batch
    it formed through one engine in this process."""
    grouped = by_device(requests)
    rounds: list[dict[str, float]] = []

    async def serve() -> list[dict[str, Any]]:
        with tempfile.TemporaryDirectory(prefix="patchcast-pool-") as tmp:
            pool = WorkerPool(args.worker_processes, Path(tmp))
            try:
                await pool.start(overrides, args.switch_interval_ms)
                await pool.wait_ready()
                for _ in range(args.rounds):
                    broker_cpu = process_tree_cpu_s(broker_pid)
                    loads = await load_processes(cfg, grouped, args.in_flight, model_id)
                    elapsed = max(f["end"] for f in loads) - min(f["start"] for f in loads)
                    rounds.append({"broker_replies_per_s": len(requests) / elapsed, "elapsed_s": elapsed,
                                   "load_cpu_s": sum(f["cpu_s"] for f in loads),
                                   "broker_cpu_s": process_tree_cpu_s(broker_pid) - broker_cpu})
            finally:
                stopped = await pool.stop()
            return pool.results(stopped)

    workers = asyncio.run(serve())
    served = len(requests) * args.rounds
    if args.frontends > 1:  # batches form inside each command's worker processes: broker figures only
        return {"worker_processes": args.worker_processes, "frontends": args.frontends, "rounds": rounds,
                "exit_codes": [w["exit_code"] for w in workers],
                "broker_cpu_ms_per_request": 1000 * sum(r["broker_cpu_s"] for r in rounds) / served,
                "load_cpu_ms_per_request": 1000 * sum(r["load_cpu_s"] for r in rounds) / served}
    sizes = [n for w in workers for n in w["batch_sizes"]]
    # Every batch the pool formed, back to back through one engine (the requests cycled: they
    # alternate between the two kept fractions, so any run of them has the same mix).
    inproc_rps, _ = in_process(engine, sets * (sum(sizes) // len(sets) + 1), sizes)
    for r in rounds:
        r["ratio"] = r["broker_replies_per_s"] / inproc_rps
    return {
        "worker_processes": args.worker_processes, "rounds": rounds, "in_process_replies_per_s": inproc_rps,
        "batches": len(sizes), "batch_size_mean": float(np.mean(sizes)),
        "replies_per_worker": [w["replies"] for w in workers],
        "worker_busy_fraction_mean": float(np.mean([w["busy_s"] for w in workers]))
        / sum(r["elapsed_s"] for r in rounds),
        "worker_engine_fraction_of_busy": sum(w["engine_s"] for w in workers) / sum(w["busy_s"] for w in workers),
        "broker_cpu_ms_per_request": 1000 * sum(r["broker_cpu_s"] for r in rounds) / served,
        "worker_loop_cpu_ms_per_request": 1000 * sum(w["loop_cpu_s"] for w in workers) / served,
        "worker_cpu_ms_per_request": 1000 * sum(w["cpu_s"] for w in workers) / served,
        # Exact with --threads 1 (torch computes in the calling thread); more torch threads leave
        # their CPU in this figure.
        "worker_outside_engine_cpu_ms_per_request":
            1000 * sum(w["cpu_s"] - w.get("engine_cpu_s", 0.0) for w in workers) / served,
        "worker_decode_cpu_ms_per_request": 1000 * sum(w.get("decode_cpu_s", 0.0) for w in workers) / served,
        "load_cpu_ms_per_request": 1000 * sum(r["load_cpu_s"] for r in rounds) / served,
        "gpu_peak_mib_per_worker": max(w["gpu_peak_mib"] for w in workers),
        **ratio_summary([r["ratio"] for r in rounds]),
    }


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
    ap.add_argument("--decode-threads", type=lambda v: v if v == "auto" else int(v), default="auto",
                    help="worker.decode_threads (pixel decode): N threads, 0 on the inference thread, auto (the "
                         "config's default: 0 for a CPU worker, 1 for CUDA)")
    ap.add_argument("--frontends", type=int, default=1,
                    help="with --worker-processes: each is 'patchcast worker --frontends N' (N worker processes "
                         "sharing one engine process; needs the engine process); replies/s through the broker only")
    ap.add_argument("--decode-processes", type=int, default=0,
                    help="worker.decode_processes: pixel decoding in child processes (0: --decode-threads threads)")
    ap.add_argument("--engine-process", default="auto", choices=["auto", "on", "off"],
                    help="worker.engine_process: the model in a child process of each worker (auto: on for CUDA)")
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
    ap.add_argument("--worker-processes", type=int, default=0,
                    help="serve from this many worker processes on --device (0: one worker in this process, "
                         "the same batches in-process after each round)")
    ap.add_argument("--json", type=Path, help="write the figures as JSON")
    ap.add_argument("--load-generator", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--worker-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_processes < 1 or (args.same_process_load and args.load_processes > 1):
        ap.error("--load-processes must be ≥ 1, and 1 with --same-process-load")
    if args.worker_processes < 0 or (args.same_process_load and args.worker_processes):
        ap.error("--worker-processes must be ≥ 0, and 0 with --same-process-load")
    if args.frontends > 1 and not (args.worker_processes and cfg_engine_process(args)):
        ap.error("--frontends needs --worker-processes (each is then a group of frontends) and the engine process "
                 "(--engine-process on, or --device cuda)")
    if args.load_generator:
        return load_generator_main(args.load_generator)
    if args.worker_child:
        return worker_child_main(args.worker_child)
    if args.quick:
        args.model, args.requests = "timm:deit_tiny_patch16_224", min(args.requests, 96)
    configure("console", "warning")
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    heap = retain_freed_memory()  # as run_worker does with the default worker.retain_heap
    threads = configure_threads(args.threads)
    # Torch work only on threads that end (as the worker keeps it on its inference thread): a thread
    # that ran a parallel op keeps an OpenMP team while it lives, and with more OpenMP threads than
    # cores libgomp stops spinning at barriers (see inference_worker.inference.inference_pool).
    loaded = on_a_passing_thread(build_model, args.model, role="server")
    keeps = [float(k) for k in args.keep.split(",")]
    model_id = "bench"
    with BrokerProcess(port=0) as broker:
        overrides: dict[str, Any] = {
            "broker": {"port": broker.port},
            "models": {"server": args.model, "model_id": model_id},
            "batching": {"max_batch": args.max_batch, "max_tokens": args.max_tokens,
                         "max_delay_ms": args.max_delay_ms, "policy": args.policy},
            "worker": {"threads": args.threads, "precision": args.precision,
                       "queue_capacity": max(1024, args.in_flight), "metrics_interval_s": 5.0,
                       "device": args.device, "decode_threads": args.decode_threads,
                       "engine_process": args.engine_process, "decode_processes": args.decode_processes,
                       "frontends": args.frontends}}
        cfg = load_config(environ={}, overrides=overrides)
        devices = [f"bench-device-{i}" for i in range(args.load_processes)] if args.load_processes > 1 else \
            ["bench-device"]
        requests = make_requests(loaded, args.requests, keeps, args.codec, args.quality, devices)
        engine = on_a_passing_thread(lambda: ServerEngine(
            loaded, cfg.batching, resolve(args.precision, args.device),
            prepack=cfg.worker.prepack_weights, device=args.device))
        t0 = time.perf_counter()
        sets = [PatchSet(decode_patches(r), r.indices) for r in requests]
        decode_ms = (time.perf_counter() - t0) * 1000 / len(requests)
        # Warm both paths (oneDNN primitive creation, allocator) on a few batches first.
        in_process(engine, sets, [min(args.max_batch, len(sets))] * 2)
        # Alternate the two paths (broker, then the same batches in-process) for --rounds rounds: on a
        # shared machine the load drifts, and each pair is measured under similar conditions.
        if args.worker_processes:
            pool = run_pool(args, overrides, cfg, engine, requests, sets, model_id, broker.pid or 0)
            return report_pool(args, pool, engine, requests, decode_ms)
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
        "device": str(engine.device), "attention": engine.attention, "decode_threads": cfg_decoder_threads(args),
        "engine_process": cfg_engine_process(args), "decode_processes": args.decode_processes,
        "switch_interval_ms": sys.getswitchinterval() * 1000,
        "load_generator": "same process" if args.same_process_load else f"{args.load_processes} child process(es)",
        "heap": heap.reason, "requests": len(requests), "tokens_mean": float(np.mean(tokens)),
        "payload_bytes_mean": figures["bytes_mean"],
        "pixel_decode_ms_per_request": decode_ms, "rounds": rounds,
        **ratio_summary([r["ratio"] for r in rounds]),
        **machine_info(),
    }
    print(f"model {args.model} ({engine.precision}, {args.policy}, {threads} threads, {engine.device}, attention "
          f"{engine.attention}, {cfg_decoder_threads(args)} decode thread(s), GIL switch interval "
          f"{sys.getswitchinterval() * 1000:g} ms, engine process {cfg_engine_process(args)}), "
          f"{len(requests)} requests, "
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


def cfg_decoder_threads(args: argparse.Namespace) -> int:
    return load_config(environ={}, overrides={"worker": {"device": args.device, "decode_threads": args.decode_threads}}
                       ).worker.decoder_threads


def cfg_engine_process(args: argparse.Namespace) -> bool:
    return load_config(environ={}, overrides={"worker": {"device": args.device, "engine_process": args.engine_process}}
                       ).worker.uses_engine_process


def report_pool(args: argparse.Namespace, pool: dict[str, Any], engine: ServerEngine,
                requests: list[PatchRequest], decode_ms: float) -> int:
    result = {"model": args.model, "precision": engine.precision, "policy": args.policy, "device": str(engine.device),
              "attention": engine.attention, "threads_per_worker": args.threads,
              "decode_threads": cfg_decoder_threads(args),
              "engine_process": cfg_engine_process(args), "decode_processes": args.decode_processes,
              "load_processes": args.load_processes, "in_flight": args.in_flight, "requests": len(requests),
              "tokens_mean": float(np.mean([r.kept + 1 for r in requests])),
              "pixel_decode_ms_per_request": decode_ms, **pool, **machine_info()}
    print(f"model {args.model} ({engine.precision}, {args.policy}, {engine.device}, attention {engine.attention}) in "
          f"{args.worker_processes} worker processes ({args.threads or 'all'} torch threads each, engine process "
          f"{cfg_engine_process(args)}, {args.decode_processes} decoder processes), "
          f"{args.load_processes} load-generator processes keeping {args.in_flight} requests outstanding; "
          f"{len(requests)} requests a round, mean {result['tokens_mean']:.0f} tokens")
    if args.frontends > 1:
        print(f"each worker process: 'patchcast worker --frontends {args.frontends}' (exit codes "
              f"{pool['exit_codes']}); CPU ms per request: broker {pool['broker_cpu_ms_per_request']:.2f}, "
              f"load generators {pool['load_cpu_ms_per_request']:.2f}")
        print(f"{'round':<7}{'broker/s':>11}")
        for i, r in enumerate(pool["rounds"], 1):
            print(f"{i:<7}{r['broker_replies_per_s']:>11.1f}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0 if not any(pool["exit_codes"]) else 1
    print(f"{'round':<7}{'broker/s':>11}{'ratio':>8}")
    for i, r in enumerate(pool["rounds"], 1):
        print(f"{i:<7}{r['broker_replies_per_s']:>11.1f}{r['ratio']:>8.3f}")
    print(f"in-process (all {pool['batches']} batches the pool formed, mean size {pool['batch_size_mean']:.1f}, "
          f"through one engine): {pool['in_process_replies_per_s']:.1f}/s; mean ratio {pool['ratio_mean']:.3f}")
    print(f"replies per worker {pool['replies_per_worker']}; worker busy {pool['worker_busy_fraction_mean']:.2f} "
          f"(the engine call {pool['worker_engine_fraction_of_busy']:.0%} of it); "
          f"CPU ms per request: broker {pool['broker_cpu_ms_per_request']:.2f}, "
          f"worker event loop {pool['worker_loop_cpu_ms_per_request']:.2f}, whole worker "
          f"{pool['worker_cpu_ms_per_request']:.2f} (outside the engine call "
          f"{pool['worker_outside_engine_cpu_ms_per_request']:.3f}: event loop, pixel decode "
          f"{pool['worker_decode_cpu_ms_per_request']:.3f} and the rest), "
          f"load generators {pool['load_cpu_ms_per_request']:.2f}; "
          f"GPU peak per worker {pool['gpu_peak_mib_per_worker']:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
