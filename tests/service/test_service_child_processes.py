"""The worker's child processes. The server engine (``worker.engine_process``): same logits as in
the worker's own process, failures contained to their batch, a dead child replaced. Pixel decoders
(``worker.decode_processes``): a dead one fails only what it held and is replaced. A worker with
both serving a fleet through a real Mosquitto, and none of its children outliving it when killed.

Tolerance: fp32, |Δlogit| ≤ 1e-4 (the same code on the same weights; only the thread count, and so
the order of float additions, may differ) and identical labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from service_helpers import SERVER_ARCH, async_test, patch_sets, random_model, service_config, valid_request
from waiting import wait_until, wait_until_async

from edge_node.fleet import run_fleet
from inference_worker.engine import PatchSet, ServerEngine
from inference_worker.engine_process import MAX_RESTARTS, EngineProcess
from inference_worker.service import InferenceWorker
from shared.config import BatchingConfig, WorkerConfig
from shared.errors import ConfigError, InferenceError, ModelError
from shared.models import build_model
from shared.protocol import Availability, ErrorReply, Reply, WorkerMetrics, decode, decode_reply
from shared.topics import V1
from shared.transport import Incoming, Transport

FP32_ATOL = 1e-4
REPO = Path(__file__).resolve().parents[2]
BATCHING = BatchingConfig(max_batch=32, max_tokens=1024)


@pytest.fixture(scope="module")
def server():
    return random_model(SERVER_ARCH, 2, "server")


@pytest.fixture(scope="module")
def engine(server):
    remote = EngineProcess(server, BATCHING, "fp32", threads=1)
    yield remote
    remote.close()


def block_exists(remote: EngineProcess) -> bool:
    return Path("/dev/shm", remote.block_name.lstrip("/")).exists()


def test_logits_equal_the_in_process_engine(server, engine) -> None:
    local = ServerEngine(server, BATCHING, "fp32")
    empty = PatchSet(np.zeros((0, SERVER_ARCH.patch_size, SERVER_ARCH.patch_size, 3), np.uint8),
                     np.zeros(0, np.int64))  # CLS alone
    for seed in range(3):  # several batches through the same shared block
        sets = [*patch_sets(12, seed), empty]
        torch.testing.assert_close(engine.logits_checked(sets), local.logits_checked(sets), atol=FP32_ATOL, rtol=0)
    assert engine.logits_checked([]).shape == (0, 10)
    assert (engine.precision, engine.attention, engine.device.type) == ("fp32", "sdpa", "cpu")
    assert (engine.patch_size, engine.input_size) == (local.patch_size, local.input_size)


def test_a_failing_batch_fails_alone_and_the_child_keeps_serving(engine) -> None:
    sets = patch_sets(4, seed=5)
    bad = PatchSet(sets[0].patches, sets[0].indices + 10_000)  # grid positions the model does not have
    pid = engine.pid
    with pytest.raises(InferenceError, match="server forward failed"):
        engine.logits_checked([sets[1], bad])
    assert engine.pid == pid, "a batch's own error must not cost the process"
    assert engine.logits_checked(sets).shape == (4, 10)


def test_a_malformed_layout_is_that_batchs_error_not_the_childs_end(engine) -> None:
    pid = engine.pid
    engine._conn.send(("batch", np.array([5], dtype=np.int64), np.arange(3, dtype=np.int64)))  # 3 indices, 5 patches
    assert engine._conn.poll(30)
    kind, code, message = engine._conn.recv()
    assert (kind, code) == ("error", "inference") and "layout" in message
    assert engine.pid == pid and engine.logits_checked(patch_sets(2, seed=9)).shape == (2, 10)


def test_a_batch_over_the_block_is_refused_before_it_is_sent(server) -> None:
    small = EngineProcess(server, BatchingConfig(max_batch=4, max_tokens=64), "fp32", threads=1)
    try:
        assert small.capacity == 64
        with pytest.raises(InferenceError, match="exceeds"):
            small.logits_checked([PatchSet(*_full_set(seed)) for seed in range(2)])  # 2 × 64 patches
        assert small.logits_checked([PatchSet(*_full_set(0))]).shape == (1, 10)
    finally:
        small.close()
    assert not block_exists(small)


def _full_set(seed: int) -> tuple[np.ndarray, np.ndarray]:
    n, p = (SERVER_ARCH.img_size // SERVER_ARCH.patch_size) ** 2, SERVER_ARCH.patch_size
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, p, p, 3), dtype=np.uint8), np.arange(n, dtype=np.int64)


def test_a_killed_child_fails_its_batch_and_the_next_batch_restarts_it(server) -> None:
    remote = EngineProcess(server, BATCHING, "fp32", threads=1)
    try:
        sets = patch_sets(6, seed=7)
        expected = remote.logits_checked(sets)
        first = remote.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: not remote._proc.is_alive(), 10, message="the killed engine process to end")
        # Dead before the call: the call starts a new child and is served.
        torch.testing.assert_close(remote.logits_checked(sets), expected, atol=FP32_ATOL, rtol=0)
        assert remote.pid != first and remote.restarts == 1
        # Restarts are rate-limited: past MAX_RESTARTS in the window, batches fail without a new child.
        for _ in range(MAX_RESTARTS):
            assert remote.pid is not None
            os.kill(remote.pid, signal.SIGKILL)
            remote._proc.join(10)
            try:
                remote.logits_checked(sets)
            except InferenceError as exc:
                assert "not restarting" in str(exc)
                break
        else:
            pytest.fail("a crash loop must stop restarting")
    finally:
        remote.close()
    assert not block_exists(remote), "the shared block is freed on close"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_child_that_cannot_build_the_engine_fails_the_start_with_its_reason(server) -> None:
    with pytest.raises(ModelError, match="no CUDA GPU"):
        EngineProcess(server, BATCHING, "auto", device="cuda", threads=1)


def test_auto_means_a_child_process_for_cuda_only() -> None:
    assert not WorkerConfig().uses_engine_process
    assert WorkerConfig(device="cuda").uses_engine_process
    assert WorkerConfig(engine_process="on").uses_engine_process
    assert not WorkerConfig(device="cuda:0", engine_process="off").uses_engine_process
    with pytest.raises(ConfigError, match="decode_processes"):
        WorkerConfig(decode_processes=-1)


@async_test(120)
async def test_a_dead_decoder_process_is_replaced_and_the_worker_keeps_serving(
        broker, model_files, image_folder, unique) -> None:
    edge_path, server_path = model_files
    model, dev = f"tiny-{unique}", f"{unique}dev"
    cfg = service_config(broker.port, edge_path, server_path, image_folder, models={"model_id": model},
                         worker={"group": f"pool-{unique}", "decode_processes": 1})
    worker = InferenceWorker(cfg, build_model(cfg.models.server, role="server"), worker_id=f"{unique}-w")
    received: list[Incoming] = []
    client = Transport(cfg.broker, client_id=dev, handler=received.append)

    async def ask(request_id: str) -> Reply | ErrorReply:
        count = len(received)
        await client.publish(V1.request(model, dev), valid_request(dev, request_id), response_topic=V1.reply(dev),
                             correlation_data=request_id.encode())
        await wait_until_async(lambda: len(received) > count, 10, message=f"an answer to {request_id}")
        return decode_reply(received[-1].payload)

    async with asyncio.TaskGroup() as tg:
        client_task = tg.create_task(client.run())
        await client.wait_connected()
        await client.subscribe(V1.reply(dev))
        serving = tg.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 60)
        assert isinstance(await ask("before"), Reply)
        pool = worker._decode_pool
        assert isinstance(pool, ProcessPoolExecutor)
        (decoder,) = pool._processes.values()
        assert decoder.pid is not None
        os.kill(decoder.pid, signal.SIGKILL)
        await wait_until_async(lambda: pool._broken, 30,
                               message="the decoder pool to notice its dead process")
        refused = await ask("while-broken")
        assert isinstance(refused, ErrorReply) and refused.code == "inference", refused
        served = await ask("after")
        assert isinstance(served, Reply) and served.request_id == f"{dev}.after"
        worker.stop()
        await serving
        client_task.cancel()
    assert worker.stats.replies == 2 and worker.decoder_replacements == 1


@async_test(180)
async def test_a_worker_with_engine_and_decoder_processes_serves_a_fleet_over_mosquitto(
        broker, model_files, image_folder, unique) -> None:
    edge_path, server_path = model_files
    cfg = service_config(broker.port, edge_path, server_path, image_folder,
                         models={"model_id": f"tiny-{unique}"},
                         worker={"group": f"pool-{unique}", "engine_process": "on", "threads": 1,
                                 "decode_processes": 2},
                         edge={"devices": 3, "limit": 12, "device_prefix": f"{unique}cam", "max_in_flight": 4,
                               "rate_hz": 0.0}, gate={"threshold": 0.0})  # η = 0: every image is sent
    server = build_model(cfg.models.server, role="server")
    worker = InferenceWorker(cfg, server, worker_id=f"{unique}-w")
    assert isinstance(worker.engine, EngineProcess)
    child = worker.engine.pid
    async with asyncio.TaskGroup() as tg:
        serving = tg.create_task(worker.run(), name="worker")
        await asyncio.wait_for(worker.ready.wait(), 60)
        result = await run_fleet(cfg)
        worker.stop()
        await serving
    s = result.summary
    assert s["images"] == s["offloaded"] == 36
    assert s["replies"] == 36 and s["errors"] == s["timeouts"] == 0
    assert worker.stats.replies == 36
    assert child is not None and worker.engine.pid is None, "the worker's shutdown stops its engine process"
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def children_of(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for_children(proc: subprocess.Popen[bytes], count: int, timeout_s: float = 90.0) -> set[int]:
    """``proc``'s child processes, once it has at least ``count``."""
    children: set[int] = set()

    def started() -> bool:
        nonlocal children
        assert proc.poll() is None, f"{proc.args!r} ended before starting its children"
        children = children_of(proc.pid)
        return len(children) >= count

    wait_until(started, timeout_s, 0.2, message=f"{proc.args!r} to start {count} child processes")
    return children


def still_alive_after(pids: set[int], timeout_s: float) -> set[int]:
    """Those of ``pids`` still running after up to ``timeout_s`` seconds (none, once all have ended)."""
    def left() -> set[int]:
        return {pid for pid in pids if alive(pid)}

    wait_until(lambda: not left(), timeout_s, 0.2, fail=False)  # the caller names what is left
    return left()


def online(received: list[Incoming]) -> set[str]:
    """The workers whose last availability in ``received`` says online."""
    states = {m.ident: m.state for m in (decode(x.payload) for x in received if "/availability/" in x.topic)
              if isinstance(m, Availability)}
    return {ident for ident, state in states.items() if state == "online"}


async def wait_online(client: Transport, received: list[Incoming], ids: set[str],
                      proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    """Until every worker of ``ids`` says online (retained availability, announced once it is subscribed
    and serving: its engine and decoder processes have started)."""
    for wid in ids:
        await client.subscribe(V1.availability("worker", wid))

    def ready() -> bool:
        assert proc.poll() is None, f"{proc.args!r} ended early"
        return online(received) == ids

    await wait_until_async(ready, timeout_s, 0.2, message=f"workers {sorted(ids)} online")


def wait_online_sync(port: int, model_path: Path, ids: set[str], proc: subprocess.Popen[bytes]) -> None:
    """:func:`wait_online` from a synchronous test, through a client of its own."""
    async def watch() -> None:
        received: list[Incoming] = []
        client = Transport(service_config(port, model_path, model_path, REPO).broker,
                           client_id=f"{min(ids)}-watch", handler=received.append)
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(client.run())
            await client.wait_connected()
            await wait_online(client, received, ids, proc)
            task.cancel()

    asyncio.run(watch())


@contextlib.contextmanager
def in_own_group(cmd: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A process leading its own process group (the group a service manager or a terminal signals);
    the whole group is killed on the way out if it is still running."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_a_killed_worker_leaves_no_child_process_behind(broker, model_files, unique) -> None:
    _, server_path = model_files
    cmd = [sys.executable, "-m", "patchcast.cli", "worker", "--broker", f"127.0.0.1:{broker.port}",
           "--server-model", f"file:{server_path}", "--threads", "1", "--precision", "fp32",
           "--worker-id", f"{unique}-w", "--group", f"pool-{unique}",
           "--log-format", "json", "--log-level", "warning"]
    env = {**os.environ, "PATCHCAST_WORKER__DECODE_PROCESSES": "2", "PATCHCAST_WORKER__ENGINE_PROCESS": "on"}
    with in_own_group(cmd, env) as worker:
        children = wait_for_children(worker, 4)  # the engine process, two decoders, the resource tracker
        wait_online_sync(broker.port, server_path, {f"{unique}-w"}, worker)  # every child past its start-up
        worker.kill()
        worker.wait(10)
        left = still_alive_after(children, 15)
        assert not left, f"orphaned after SIGKILL of the worker: {left}"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
@async_test(150)
async def test_sigterm_to_the_whole_process_group_drains_through_the_children(
        broker, model_files, unique) -> None:
    """A service manager (or Ctrl-C in a terminal) signals every process of the group; the children
    ignore it and the worker answers what it holds through them before stopping them."""
    _, server_path = model_files
    model, dev = f"tiny-{unique}", f"{unique}dev"
    cmd = [sys.executable, "-m", "patchcast.cli", "worker", "--broker", f"127.0.0.1:{broker.port}",
           "--server-model", f"file:{server_path}", "--model-id", model, "--group", f"pool-{unique}",
           "--worker-id", f"{unique}-w", "--threads", "1", "--precision", "fp32",
           "--max-delay-ms", "60000",  # the batch is held until the SIGTERM: the drain must run it
           "--engine-process", "on", "--decode-processes", "2", "--log-format", "json", "--log-level", "warning"]
    env = {**os.environ, "PATCHCAST_WORKER__METRICS_INTERVAL_S": "0.1"}
    received: list[Incoming] = []
    client = Transport(service_config(broker.port, server_path, server_path, REPO).broker, client_id=dev,
                       handler=received.append)

    def queued() -> int:
        """The worker's queue depth in its latest metrics report (-1 before the first)."""
        reports = [m for m in (decode(x.payload) for x in received if "/metrics/" in x.topic)
                   if isinstance(m, WorkerMetrics)]
        return reports[-1].queue_depth if reports else -1

    def replies_in() -> list[Incoming]:
        return [m for m in received if m.topic == V1.reply(dev)]

    with in_own_group(cmd, env) as worker:
        async with asyncio.TaskGroup() as tg:
            client_task = tg.create_task(client.run())
            await client.wait_connected()
            await client.subscribe(V1.reply(dev))
            await client.subscribe(V1.metrics("worker", f"{unique}-w"))
            await asyncio.to_thread(wait_for_children, worker, 4)  # engine, two decoders, resource tracker
            await wait_online(client, received, {f"{unique}-w"}, worker)  # subscribed to requests
            children = children_of(worker.pid)
            for i in range(10):
                await client.publish(V1.request(model, dev), valid_request(dev, f"r{i}"), response_topic=V1.reply(dev),
                                     correlation_data=f"r{i}".encode())
            await wait_until_async(lambda: queued() == 10, 60, message="the ten requests waiting in the batcher")
            os.killpg(worker.pid, signal.SIGTERM)
            code = await asyncio.to_thread(worker.wait, 60)
            await wait_until_async(lambda: len(replies_in()) >= 10, 10, message="the ten replies delivered")
            client_task.cancel()
        output = worker.stdout.read().decode()  # type: ignore[union-attr]
        assert code == 0, output[-2000:]
        assert "Traceback" not in output, output[-3000:]
        replies = [decode_reply(m.payload) for m in replies_in()]
        assert len(replies) == 10 and all(isinstance(r, Reply) for r in replies), replies
        left = await asyncio.to_thread(still_alive_after, children, 15)
        assert not left, f"children left after the worker stopped: {left}"


# ---- several worker processes sharing one engine process (worker.frontends) ---------------------------


class _SendSpy:
    """A worker's end of the engine pipe that says when a message has been sent through it."""

    def __init__(self, conn: object) -> None:
        self._conn = conn
        self.sent = threading.Event()

    def send(self, message: object) -> None:
        self._conn.send(message)  # type: ignore[attr-defined]
        self.sent.set()

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


def test_a_shared_engine_runs_waiting_batches_as_one_forward(server) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from inference_worker.engine_process import EngineClient, SharedEngine

    shared = SharedEngine(server, BATCHING, "fp32", clients=2, threads=1)
    clients = [EngineClient(server, BATCHING, conn, block, shared.info) for conn, block in shared.endpoints]
    local = ServerEngine(server, BATCHING, "fp32")
    try:
        batches = [patch_sets(7, seed=11), patch_sets(5, seed=12)]
        spies = [_SendSpy(c._conn) for c in clients]
        for c, spy in zip(clients, spies, strict=True):
            c._conn = spy  # type: ignore[assignment]
        assert shared.pid is not None
        os.kill(shared.pid, signal.SIGSTOP)  # both batches wait: the engine must take them together
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(c.logits_checked, b) for c, b in zip(clients, batches, strict=True)]
            wait_until(lambda: all(s.sent.is_set() for s in spies), 30, message="both batches sent to the engine")
            os.kill(shared.pid, signal.SIGCONT)
            results = [f.result(timeout=60) for f in futures]
        for got, sets in zip(results, batches, strict=True):
            torch.testing.assert_close(got, local.logits_checked(sets), atol=FP32_ATOL, rtol=0)
        assert [c.last_merged for c in clients] == [2, 2]
        # One at a time, each alone.
        assert clients[0].logits_checked(batches[1]).shape == (5, 10) and clients[0].last_merged == 1
        # A worker that leaves does not stop the engine for the other; the engine ends when both have left.
        clients[0].close()
        assert clients[1].logits_checked(batches[0]).shape == (7, 10)
        clients[1].close()
        wait_until(lambda: not shared.alive(), 10, message="the engine to end once both workers left")
    finally:
        for c in clients:
            c.close()
        shared.close()


def test_frontends_need_the_engine_process() -> None:
    assert WorkerConfig(frontends=3, device="cuda").frontends == 3
    with pytest.raises(ConfigError, match="frontends"):
        WorkerConfig(frontends=2)
    with pytest.raises(ConfigError, match="frontends"):
        WorkerConfig(frontends=0, engine_process="on")


def _frontends_cmd(port: int, server_path: object, model: str, group: str, worker_id: str) -> list[str]:
    return [sys.executable, "-m", "patchcast.cli", "worker", "--broker", f"127.0.0.1:{port}",
            "--server-model", f"file:{server_path}", "--model-id", model, "--group", group, "--worker-id", worker_id,
            "--threads", "1", "--precision", "fp32", "--engine-process", "on", "--frontends", "2",
            "--log-format", "json", "--log-level", "warning"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
@async_test(150)
async def test_two_frontends_share_an_engine_serve_over_mosquitto_and_stop_together(
        broker, model_files, unique) -> None:
    _, server_path = model_files
    model, dev = f"tiny-{unique}", f"{unique}dev"
    received: list[Incoming] = []
    client = Transport(service_config(broker.port, server_path, server_path, REPO).broker, client_id=dev,
                       handler=received.append)
    with in_own_group(_frontends_cmd(broker.port, server_path, model, f"pool-{unique}", f"{unique}-w")) as worker:
        async with asyncio.TaskGroup() as tg:
            client_task = tg.create_task(client.run())
            await client.wait_connected()
            await client.subscribe(V1.reply(dev))
            ids = {f"{unique}-w-f1", f"{unique}-w-f2"}
            await wait_online(client, received, ids, worker)  # both workers subscribed and serving
            children = children_of(worker.pid)
            received.clear()
            for i in range(20):
                await client.publish(V1.request(model, dev), valid_request(dev, f"r{i}"), response_topic=V1.reply(dev),
                                     correlation_data=f"r{i}".encode())
            await wait_until_async(lambda: sum(m.topic == V1.reply(dev) for m in received) >= 20, 60,
                                   message="the twenty replies")
            os.killpg(worker.pid, signal.SIGTERM)  # the whole group, as a service manager or Ctrl-C does
            code = await asyncio.to_thread(worker.wait, 60)
            client_task.cancel()
        output = worker.stdout.read().decode()  # type: ignore[union-attr]
        assert code == 0 and "Traceback" not in output, output[-3000:]
        replies = [decode_reply(m.payload) for m in received if m.topic == V1.reply(dev)]
        assert len(replies) == 20 and all(isinstance(r, Reply) for r in replies), replies
        assert {r.worker_id for r in replies} == ids
        left = await asyncio.to_thread(still_alive_after, children, 15)
        assert not left, f"children left after the worker stopped: {left}"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_when_one_frontend_dies_the_group_stops_and_says_so(broker, model_files, unique) -> None:
    _, server_path = model_files
    with in_own_group(_frontends_cmd(broker.port, server_path, f"tiny-{unique}", f"pool-{unique}",
                                     f"{unique}-w")) as worker:
        children = wait_for_children(worker, 4)  # the engine, two workers, the resource tracker
        wait_online_sync(broker.port, server_path, {f"{unique}-w-f1", f"{unique}-w-f2"}, worker)
        frontends = [pid for pid in children if "patchcast.cli" not in Path(f"/proc/{pid}/cmdline").read_text()
                     and "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(frontends) == 3  # the engine and two workers (spawned children)
        victim = max(frontends)  # the workers start after the engine
        os.kill(victim, signal.SIGKILL)
        assert worker.wait(60) == 1
        output = worker.stdout.read().decode()  # type: ignore[union-attr]
        assert "frontend_group_failed" in output and "Traceback" not in output, output[-3000:]
        left = still_alive_after(children, 15)
        assert not left, f"children left: {left}"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_a_killed_frontend_supervisor_leaves_no_process_behind(broker, model_files, unique) -> None:
    _, server_path = model_files
    with in_own_group(_frontends_cmd(broker.port, server_path, f"tiny-{unique}", f"pool-{unique}",
                                     f"{unique}-w")) as worker:
        children = wait_for_children(worker, 4)
        wait_online_sync(broker.port, server_path, {f"{unique}-w-f1", f"{unique}-w-f2"}, worker)
        descendants = children | {g for c in children for g in children_of(c)}
        worker.kill()  # the supervisor only: its workers drain and leave, then the engine
        worker.wait(10)
        left = still_alive_after(descendants, 30)
        assert not left, f"orphaned after SIGKILL of the supervisor: {left}"
