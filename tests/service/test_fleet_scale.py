"""The fleet at a small scale against a real Mosquitto: staggered connects, a device that cannot
connect counted and named (never a hang), SIGTERM to a `patchcast edge` process answered within
seconds with the summary of what was done, and the devices split over processes.
The large runs (10,000 and more devices) are a benchmark: bench/fleet.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from service_helpers import async_test, service_config
from waiting import wait_until_async

from edge_node.fleet import device_samples, devices_per_process, run_fleet
from edge_node.processes import split
from inference_worker.service import InferenceWorker
from patchcast.broker import LOCAL_CONF, BrokerProcess
from shared import datasets
from shared.config import BrokerConfig, to_toml
from shared.errors import ConfigError, TransportError
from shared.models import build_model
from shared.protocol import Availability, Outcome, decode
from shared.topics import V1
from shared.transport import Incoming, Transport

REPO = Path(__file__).resolve().parents[2]
DEVICES = 200


@async_test(180)
async def test_two_hundred_devices_connect_staggered_and_every_image_is_answered(
        broker, model_files, image_folder, unique) -> None:
    edge_path, server_path = model_files
    cfg = service_config(broker.port, edge_path, server_path, image_folder,
                         models={"model_id": f"tiny-{unique}"}, worker={"group": f"pool-{unique}"},
                         edge={"devices": DEVICES, "limit": 1, "device_prefix": f"{unique}cam",
                               "connect_concurrency": 16, "metrics_interval_s": 30.0})
    worker = InferenceWorker(cfg, build_model(cfg.models.server, role="server"), worker_id=f"{unique}-w0")
    async with asyncio.TaskGroup() as tg:
        serving = tg.create_task(worker.run(), name="worker")
        await asyncio.wait_for(worker.ready.wait(), 30)
        result = await run_fleet(cfg)
        worker.stop()
        await serving
    s, fleet = result.summary, result.summary["fleet"]
    assert fleet["connected"] == DEVICES and fleet["not_connected"] == 0 and fleet["not_connected_ids"] == []
    assert fleet["connect_s"] is not None and fleet["connect_s"] > 0
    assert fleet["stopped_by"] == "done" and fleet["images_abandoned"] == 0
    assert fleet["images_started"] == DEVICES and s["images"] == DEVICES
    assert s["offloaded"] == s["replies"] == DEVICES  # every image reached a worker and came back
    assert s["timeouts"] == s["errors"] == 0
    assert fleet["rss_per_device_kb"] > 0
    assert {r.device_id for r in result.outcomes} == {d.device_id for d in result.devices}


@async_test(120)
async def test_devices_the_broker_will_not_take_are_counted_and_named_not_waited_for(
        model_files, image_folder, unique, tmp_path: Path) -> None:
    """A broker that holds 30 connections: the other devices of a 40-device fleet are given up within
    their own connect timeout, counted and named, and the 30 that connected do their work."""
    template = tmp_path / "small.conf"
    template.write_text(LOCAL_CONF.read_text() + "\nmax_connections 30\n")
    edge_path, server_path = model_files
    with BrokerProcess(port=0, template=template) as small:
        cfg = service_config(small.port, edge_path, server_path, image_folder,
                             broker={"connect_timeout_s": 2.0},
                             models={"model_id": f"tiny-{unique}"},
                             edge={"devices": 40, "limit": 1, "device_prefix": f"{unique}cam",
                                   "connect_concurrency": 8, "reply_timeout_s": 0.5, "retries": 0},
                             gate={"threshold": 1e9})  # every image stays at the edge: no worker needed
        started = time.monotonic()
        result = await run_fleet(cfg)
        took = time.monotonic() - started
    fleet = result.summary["fleet"]
    assert 30 <= fleet["connected"] <= 31  # Mosquitto 2.0 lets one more in than max_connections says
    assert fleet["not_connected"] == 40 - fleet["connected"]
    assert len(fleet["not_connected_ids"]) == fleet["not_connected"]
    assert set(fleet["not_connected_ids"]) <= {d.device_id for d in result.devices}
    assert fleet["connect_errors"]  # why they could not connect
    assert result.summary["images"] == fleet["connected"]  # one image per connected device, settled at the edge
    assert took < 30.0  # ten 2 s connect timeouts, eight at a time: never a hang


@async_test(60)
async def test_a_fleet_with_no_broker_fails_with_a_clear_error(model_files, image_folder, unique) -> None:
    from patchcast.broker import free_port

    edge_path, server_path = model_files
    cfg = service_config(free_port(), edge_path, server_path, image_folder, broker={"connect_timeout_s": 1.0},
                         edge={"devices": 50, "limit": 1, "device_prefix": f"{unique}cam", "connect_concurrency": 8})
    started = time.monotonic()
    with pytest.raises(TransportError, match="no connection"):
        await run_fleet(cfg)
    assert time.monotonic() - started < 20.0  # the first eight devices' timeouts, not fifty of them


def test_a_fleet_larger_than_the_descriptor_limit_is_refused_before_it_starts(
        broker, model_files, image_folder) -> None:
    edge_path, server_path = model_files
    too_many = devices_per_process() + 1
    cfg = service_config(broker.port, edge_path, server_path, image_folder, edge={"devices": too_many})
    with pytest.raises(ConfigError, match="--processes"):
        asyncio.run(run_fleet(cfg))


def test_device_samples_walk_their_own_slice_without_copying_the_dataset(image_folder) -> None:
    ds = datasets.load(str(image_folder))
    n = len(ds)
    first = list(device_samples(ds, 0, 4, 3))
    later = list(device_samples(ds, 3, 4, n + 2))  # wraps around the end
    assert first == list(ds.samples[:3])
    assert later[0] is ds.samples[(3 * n) // 4] and later[n] is later[0] and len(later) == n + 2


def test_split_gives_every_process_a_contiguous_slice() -> None:
    shares = split(10_001, 3, offset=5)
    assert [s.devices for s in shares] == [3334, 3334, 3333]
    assert [s.offset for s in shares] == [5, 5 + 3334, 5 + 6668]
    assert len(split(2, 8)) == 2  # never an empty process
    with pytest.raises(ConfigError):
        split(0, 2)


class _Spy:
    """Counts the devices of one prefix whose availability (birth message or retained) says online, and
    the outcomes (one per image done) they publish."""

    def __init__(self, port: int, prefix: str) -> None:
        self.prefix = prefix
        self.state: dict[str, str] = {}
        self.outcomes = 0
        self.transport = Transport(BrokerConfig(port=port), client_id=f"spy-{prefix}", handler=self._on)

    def _on(self, msg: Incoming) -> None:
        message = decode(msg.payload)
        if isinstance(message, Availability) and message.ident.startswith(self.prefix):
            self.state[message.ident] = message.state
        elif isinstance(message, Outcome) and message.device_id.startswith(self.prefix):
            self.outcomes += 1

    def online(self) -> int:
        return sum(v == "online" for v in self.state.values())


@pytest.mark.parametrize("processes", [1, 2])
@async_test(240)
async def test_sigterm_ends_a_running_fleet_within_seconds_with_its_summary(
        broker, model_files, image_folder, unique, tmp_path: Path, processes: int) -> None:
    """A `patchcast edge` process that would run for ten minutes: SIGTERM once every device is online;
    it prints the summary of what was done and exits within 10 s (one process, or two that split the fleet)."""
    edge_path, server_path = model_files
    prefix = f"{unique}p{processes}"
    cfg = service_config(broker.port, edge_path, server_path, image_folder,
                         models={"model_id": f"tiny-{unique}"},
                         edge={"devices": DEVICES, "rate_hz": 0.2, "duration_s": 600.0, "random_phase": True,
                               "device_prefix": prefix, "connect_concurrency": 32,
                               "reply_timeout_s": 0.5, "retries": 0, "processes": processes},
                         gate={"threshold": 1e9})  # edge-only: the test is about the fleet's life cycle
    cfg_path = tmp_path / "fleet.toml"
    cfg_path.write_text(to_toml(cfg))
    spy = _Spy(broker.port, prefix)
    watching = asyncio.create_task(spy.transport.run(), name="spy")
    await spy.transport.subscribe(V1.availability_filter("edge"))
    await spy.transport.subscribe(V1.metrics_filter("edge"))  # outcomes: images done
    await spy.transport.wait_connected(10)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "patchcast", "edge", "--config", str(cfg_path), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    try:
        # Every device online and one image done (0.2 Hz each, random phase: the first one comes within
        # moments, but not always before the last device has connected).
        await wait_until_async(lambda: (spy.online() >= DEVICES and spy.outcomes >= 1) or proc.returncode is not None,
                               120, message="every device online and an image done")
        assert proc.returncode is None, "the fleet exited before it was stopped"
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        took = time.monotonic() - sent
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        await spy.transport.close()
        watching.cancel()
    summary = json.loads(out)
    fleet = summary["fleet"]
    assert took <= 10.0, f"SIGTERM to exit took {took:.1f} s"
    assert fleet["processes"] == processes
    assert fleet["connected"] == DEVICES and fleet["not_connected"] == 0
    assert fleet["stopped_by"] == ("signal" if processes == 1 else ["signal"])
    assert summary["images"] >= 1  # devices sent images before the stop (0.2 Hz each, random phase)
    assert summary["images"] + fleet["images_abandoned"] == fleet["images_started"]
    # every device said goodbye: its farewell (or its will) is the retained "offline"
    await_offline = _Spy(broker.port, prefix)
    task = asyncio.create_task(await_offline.transport.run(), name="spy-after")
    await await_offline.transport.subscribe(V1.availability_filter("edge"))
    try:
        await wait_until_async(lambda: len(await_offline.state) >= DEVICES, 15, message="retained availability")
        assert await_offline.online() == 0
    finally:
        await await_offline.transport.close()
        task.cancel()
