"""Fleet simulator: N devices in one process sharing one edge model, for load tests and the demo.

Each device has its own MQTT client id and reply topic and walks the image source from its own
offset (device i starts at i·len/N and wraps), so devices send different images at once; each
sends ``edge.limit`` of them (0: the whole source, so N devices make N passes over it). The edge
model runs batched across devices in one executor thread (:class:`~edge_node.runner.EdgeRunner`).

Scale (docs/benchmarks.md, *Fleet scale*):

* Connects are staggered: at most ``edge.connect_concurrency`` devices connect at once, and each
  one's ``broker.connect_timeout_s`` counts from its own start, so a large fleet never times out
  because the devices ahead of it were still connecting. A device that does not connect in time is
  given up, counted and named in the summary (``fleet.not_connected``); it never hangs the fleet.
  When none of the first devices connects at all, the broker is not there: the fleet fails at once.
* One socket per device: the process raises its soft file-descriptor limit to the hard limit and
  refuses, with a clear error, a device count the limit cannot hold (``--processes`` splits those).
* Stopping (SIGTERM, SIGINT, the duration's end): sending stops, images still in flight are
  abandoned and counted, the farewells and disconnects get ``edge.shutdown_timeout_s``, and the
  summary of what was done comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from edge_node.device import Device
from edge_node.engine import EdgeEngine
from edge_node.outcome import OutcomeRecord
from edge_node.runner import EdgeRunner
from edge_node.summary import summarize
from shared import datasets
from shared.config import Config
from shared.datasets import Dataset, Sample
from shared.errors import ConfigError, PatchCastError, TransportError
from shared.logs import get_logger
from shared.models import LoadedModel, build_model
from shared.naming import device_id, model_id
from shared.topics import V1, Topics
from shared.transport import login_as, read_credentials

FD_RESERVE = 64  # descriptors a fleet process needs besides its devices' sockets (model files, pipes, logs)
PER_DEVICE_MAX = 1000  # larger fleets leave the per-device list out of the summary
NOT_CONNECTED_NAMED = 20  # device ids named in the summary when devices could not connect


@dataclass
class FleetResult:
    summary: dict[str, Any]
    outcomes: list[OutcomeRecord]
    devices: list[Device]


@dataclass
class ConnectLedger:
    """How the fleet's devices connected: the summary's ``fleet`` section."""

    started: float = field(default_factory=time.monotonic)
    connected: int = 0
    last_connect_s: float | None = None  # seconds from the fleet's start to its last device's CONNACK
    not_connected: list[str] = field(default_factory=list)  # device ids given up on
    failures: list[TransportError] = field(default_factory=list)  # why (refusals, TLS, timeouts)

    def connected_now(self) -> None:
        self.connected += 1
        self.last_connect_s = time.monotonic() - self.started


def device_samples(dataset: Dataset, index: int, devices: int, count: int | None) -> Iterator[Sample]:
    """Device ``index``'s images: from offset index·len/devices, wrapping; ``count`` of them (None: endless).

    A generator over indices: it holds no copy of the dataset's list, so ten thousand devices cost
    ten thousand small generators, not ten thousand lists."""
    samples = dataset.samples
    n = len(samples)
    start = (index * n) // devices
    sent = 0
    i = start
    while count is None or sent < count:
        yield samples[i % n]
        i += 1
        sent += 1


def load_edge(config: Config) -> LoadedModel:
    return build_model(config.models.edge, pretrained=config.models.pretrained, role="edge")


def raise_fd_limit() -> int:
    """Raise this process's soft file-descriptor limit to its hard limit; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def devices_per_process(fd_limit: int | None = None) -> int:
    """The most devices one fleet process can hold under its file-descriptor limit (one socket each)."""
    limit = raise_fd_limit() if fd_limit is None else fd_limit
    return max(limit - FD_RESERVE, 1)


def rss_bytes() -> int:
    """This process's resident set size now (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return 0


async def cancel_until_done(tasks: Sequence[asyncio.Task[None]], every_s: float = 0.5) -> None:
    """Cancel ``tasks`` and wait until each has ended, cancelling again every ``every_s`` what still runs.

    Python 3.11's :func:`asyncio.wait_for` loses a cancellation that arrives as the awaited result does
    (fixed in 3.12); it was met inside the MQTT client library the fleet used before, and any library a
    device's code awaits may use it. Among ten thousand devices one of them hits that race, and a
    single cancel would leave that device running, and the fleet waiting for it, forever."""
    remaining = [t for t in tasks if not t.done()]
    while remaining:
        for t in remaining:
            t.cancel()
        await asyncio.wait(remaining, timeout=every_s)
        remaining = [t for t in remaining if not t.done()]


class _Fleet:
    """One run of the simulator (see :func:`run_fleet`)."""

    def __init__(self, config: Config, devices: list[Device], dataset: Dataset, runner: EdgeRunner,
                 stop: asyncio.Event) -> None:
        self.config = config
        self.cfg = config.edge
        self.devices = devices
        self.dataset = dataset
        self.runner = runner
        self.stop = stop
        self.ledger = ConnectLedger()
        self.log = get_logger("patchcast.fleet")
        self.stopped_by = "done"
        self.rss_connected = 0  # RSS once every device has connected (or been given up on)
        self._pending_connects = len(devices)
        self._all_tried = asyncio.Event()
        self._slots = asyncio.Semaphore(self.cfg.connect_concurrency)
        self._gave_up = asyncio.Event()  # none of the first devices could connect: the broker is not there
        self._links: list[asyncio.Task[None]] = []  # the devices' connection tasks
        self.shutdown_s = 0.0
        self.dropped = 0  # connections dropped at the stop (the broker published their wills)

    def _connect_tried(self) -> None:
        self._pending_connects -= 1
        if self._pending_connects == 0:
            self.rss_connected = rss_bytes()
            self._all_tried.set()
            self.log.info("fleet_connected", connected=self.ledger.connected,
                          not_connected=len(self.ledger.not_connected), connect_s=self.ledger.last_connect_s)

    async def _transport(self, device: Device) -> None:
        """The device's connection; a final failure (refusal, TLS) is recorded, never raised into the fleet."""
        try:
            await device.transport.run()
        except TransportError as exc:
            self.ledger.failures.append(exc)

    async def _connect(self, tg: asyncio.TaskGroup, device: Device) -> bool:
        """Connect one device within its own ``broker.connect_timeout_s``; False when it did not."""
        try:
            async with self._slots:
                if self._gave_up.is_set():
                    return False
                await device.prepare()  # the reply subscription goes out with the connection
                link = tg.create_task(self._transport(device), name=f"{device.device_id}-mqtt")
                self._links.append(link)
                try:
                    await device.transport.wait_connected(self.config.broker.connect_timeout_s)
                except TransportError as exc:
                    link.cancel()
                    self.ledger.not_connected.append(device.device_id)
                    if exc not in self.ledger.failures:
                        self.ledger.failures.append(exc)
                    self.log.warning("device_not_connected", device_id=device.device_id, code=exc.code,
                                     error=exc.message)
                    if self.ledger.connected == 0 and len(self.ledger.not_connected) >= min(
                            self.cfg.connect_concurrency, len(self.devices)):
                        self._gave_up.set()
                        self.stop.set()
                    return False
                self.ledger.connected_now()
                return True
        finally:
            self._connect_tried()

    async def _device(self, tg: asyncio.TaskGroup, index: int, device: Device, count: int | None,
                      stop_at: float | None) -> None:
        if not await self._connect(tg, device):
            return
        if self.cfg.random_phase and self.cfg.rate_hz > 0:
            await asyncio.sleep(random.uniform(0.0, 1.0 / self.cfg.rate_hz))
        await device.run(device_samples(self.dataset, index, len(self.devices), count), stop_at=stop_at)

    async def run(self, count: int | None) -> float:
        """Connect, send, stop; return the wall time of the run (up to the stop, not the shutdown)."""
        started = self.ledger.started
        stop_at = started + self.cfg.duration_s if self.cfg.duration_s else None
        async with asyncio.TaskGroup() as tg:
            model = tg.create_task(self.runner.run(), name="edge-model")
            work = [tg.create_task(self._device(tg, i, d, count, stop_at), name=f"{d.device_id}-run")
                    for i, d in enumerate(self.devices)]
            watcher = tg.create_task(self._cancel_on_stop(work), name="stop-watcher")
            results = await asyncio.gather(*work, return_exceptions=True)
            watcher.cancel()
            wall_s = time.monotonic() - started
            self.log.info("fleet_devices_stopped")
            await self._shutdown()
            closing_started = time.monotonic()
            model.cancel()
            await cancel_until_done(self._links)
        self.log.info("fleet_closed", close_s=round(time.monotonic() - closing_started, 3))
        for exc in results:
            if isinstance(exc, BaseException) and not isinstance(exc, asyncio.CancelledError):
                self.log.warning("device_failed", error=str(exc), error_type=type(exc).__name__)
        return wall_s

    def _unsettled(self) -> int:
        """Images taken in and not yet settled (an answer, or the edge label at the deadline)."""
        return sum(d.started - len(d.outcomes) for d in self.devices)

    async def _cancel_on_stop(self, tasks: Sequence[asyncio.Task[None]]) -> None:
        """On ``stop``: give the images in flight half of ``edge.shutdown_timeout_s`` to settle, then cancel
        every device (what is still unsettled is counted as abandoned)."""
        await self.stop.wait()
        self.stopped_by = "no_connection" if self._gave_up.is_set() else "signal"
        self.log.info("fleet_stopping", reason=self.stopped_by, in_flight=self._unsettled())
        drain_until = time.monotonic() + self.cfg.shutdown_timeout_s / 2
        # polling a counter over every device: no event fires for "all settled"
        while self._unsettled() and time.monotonic() < drain_until:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        self.log.info("fleet_drained", abandoned=self._unsettled())
        for device in self.devices:
            device.stop_sending()
        await cancel_until_done(tasks)

    async def _shutdown(self) -> None:
        """End every connection within the rest of ``edge.shutdown_timeout_s``: farewells (offline
        availability, QoS 1), ``edge.connect_concurrency`` at a time, for a quarter of it; then every
        connection closes at once, without waiting for the broker: after a farewell with a DISCONNECT,
        without one dropped, and the broker publishes that device's will (the same offline
        availability). A farewell costs each client a round trip and CPU on this loop, which ten
        thousand of them cannot afford within seconds."""
        started = time.monotonic()
        said: set[int] = set()  # indices of the devices whose farewell finished
        slots = asyncio.Semaphore(self.cfg.connect_concurrency)

        async def farewell(index: int, device: Device) -> None:
            try:
                if await device.close():
                    said.add(index)
            except (PatchCastError, OSError) as exc:
                self.log.debug("farewell_failed", device_id=device.device_id, error=str(exc))
            finally:
                slots.release()

        pending: set[asyncio.Task[None]] = set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.cfg.shutdown_timeout_s / 4):
                for index, device in enumerate(self.devices):
                    if not device.transport.connected:
                        continue
                    await slots.acquire()
                    task = asyncio.create_task(farewell(index, device), name=f"{device.device_id}-farewell")
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if pending:
                    await asyncio.wait(pending)
        for task in pending:
            task.cancel()
        for index, device in enumerate(self.devices):
            farewelled = index in said
            self.dropped += device.transport.connected and not farewelled
            device.transport.abort(disconnect=farewelled)
        self.log.info("fleet_farewells", said=len(said), dropped=self.dropped,
                      farewell_s=round(time.monotonic() - started, 3))
        self.shutdown_s = time.monotonic() - started


async def run_fleet(config: Config, *, edge: LoadedModel | None = None, dataset: Dataset | None = None,
                    topics: Topics = V1, stop: asyncio.Event | None = None,
                    handle_signals: bool = False) -> FleetResult:
    """Run ``edge.devices`` devices until each has sent its images (``edge.limit``, default the whole
    source) or ``edge.duration_s`` has passed (or ``stop`` is set), then return the summary and every outcome.

    Raises the devices' connection error when none of them could connect (no broker, refused,
    TLS), :class:`ConfigError` when this process's file-descriptor limit cannot hold the devices."""
    import torch

    cfg = config.edge
    log = get_logger("patchcast.fleet")
    capacity = devices_per_process()
    if cfg.devices > capacity:
        raise ConfigError(f"edge.devices = {cfg.devices} needs {cfg.devices + FD_RESERVE} file descriptors and this "
                          f"process may open {capacity + FD_RESERVE} (ulimit -n, hard limit): split the devices "
                          f"over processes (--processes, edge.processes)")
    torch.set_num_threads(max(cfg.threads, 1))
    if edge is None:
        edge = await asyncio.to_thread(load_edge, config)
    if dataset is None:
        dataset = await asyncio.to_thread(datasets.load, cfg.source)
    if len(dataset) == 0:
        raise ConfigError(f"edge.source {cfg.source!r} has no images")
    engine = EdgeEngine(edge, config.gate, config.selection, config.codec,
                        measure_full_bytes=config.edge.measure_full_bytes,
                        region=config.region if config.edge.offload == "region" else None,
                        top_up=config.edge.offload == "top_up")
    runner = EdgeRunner(engine, batch_size=cfg.batch_size, batch_delay_ms=cfg.batch_delay_ms)
    mid = model_id(config.models.server, config.models.model_id)
    logins = read_credentials(cfg.credentials_file) if cfg.credentials_file else None  # per-device passwords
    rss_before = rss_bytes()
    devices: list[Device] = []
    for i in range(cfg.device_offset, cfg.device_offset + cfg.devices):
        d = device_id(cfg.device_prefix, i)
        device_config = config if logins is None else replace(config, broker=login_as(config.broker, d, logins))
        devices.append(Device(d, device_config, runner, topics, mid))
        if len(devices) % 500 == 0:
            await asyncio.sleep(0)  # a signal that arrives while ten thousand devices are built is still handled
    count: int | None = cfg.limit or (None if cfg.duration_s else len(dataset))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    fleet = _Fleet(config, devices, dataset, runner, stop)
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    log.info("fleet_starting", devices=len(devices), model=mid, images_per_device=count, rate_hz=cfg.rate_hz,
             duration_s=cfg.duration_s or None, connect_concurrency=cfg.connect_concurrency)
    try:
        wall_s = await fleet.run(count)
    finally:
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    ledger = fleet.ledger
    if ledger.connected == 0 and ledger.failures:
        raise ledger.failures[0]  # e.g. no broker, refused: a clear error instead of an empty summary
    if fleet.stopped_by == "done" and cfg.duration_s and wall_s >= cfg.duration_s:
        fleet.stopped_by = "duration"
    outcomes = [r for d in devices for r in d.outcomes]
    totals = {"late": sum(d.ledger.late for d in devices), "foreign": sum(d.ledger.foreign for d in devices),
              "malformed": sum(d.ledger.malformed for d in devices),
              "duplicate": sum(d.ledger.duplicate for d in devices)}
    summary = summarize(outcomes, devices=len(devices), wall_s=wall_s, model_id=mid, ledger_totals=totals,
                        per_device=len(devices) <= PER_DEVICE_MAX)
    started_images = sum(d.started for d in devices)
    connected_rss = fleet.rss_connected or rss_bytes()
    summary["fleet"] = {
        "processes": 1,
        "connected": ledger.connected,
        "not_connected": len(ledger.not_connected),
        "not_connected_ids": ledger.not_connected[:NOT_CONNECTED_NAMED],
        "connect_errors": sorted({e.code for e in ledger.failures}),
        "connect_s": None if ledger.last_connect_s is None else round(ledger.last_connect_s, 3),
        "stopped_by": fleet.stopped_by,
        "images_started": started_images,
        # images taken in but never settled: the fleet was stopped while they were in flight
        "images_abandoned": max(started_images - len(outcomes), 0),
        "shutdown_s": round(fleet.shutdown_s, 3),
        "connections_dropped": fleet.dropped,
        "rss_mb": round(rss_bytes() / 2**20, 1),
        "rss_per_device_kb": round(max(connected_rss - rss_before, 0) / 1024 / len(devices), 1),
    }
    log.info("fleet_done", images=summary["images"], offloaded=summary["offloaded"], timeouts=summary["timeouts"],
             errors=summary["errors"], connected=ledger.connected, not_connected=len(ledger.not_connected),
             stopped_by=fleet.stopped_by)
    return FleetResult(summary, outcomes, devices)
