"""Fleet simulator: N devices in one process sharing one edge model, for load tests and the demo.

Each device has its own MQTT client id and reply topic and walks its own slice of the image
source (device i starts at offset i·len/N and wraps), so devices send different images. The edge
model runs batched across devices in one executor thread (:class:`~edge_node.runner.EdgeRunner`).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from edge_node.device import Device
from edge_node.engine import EdgeEngine
from edge_node.outcome import OutcomeRecord
from edge_node.runner import EdgeRunner
from edge_node.summary import summarize
from shared import datasets
from shared.config import Config
from shared.datasets import Dataset, Sample
from shared.errors import ConfigError
from shared.logs import get_logger
from shared.models import LoadedModel, build_model
from shared.naming import device_id, model_id
from shared.topics import V1, Topics
from shared.transport import login_as, read_credentials


@dataclass
class FleetResult:
    summary: dict[str, Any]
    outcomes: list[OutcomeRecord]
    devices: list[Device]


def device_samples(dataset: Dataset, index: int, devices: int, count: int | None) -> Iterator[Sample]:
    """Device ``index``'s images: from offset index·len/devices, wrapping; ``count`` of them (None: endless)."""
    n = len(dataset)
    start = (index * n) // devices
    ordered = itertools.cycle(itertools.chain(dataset.samples[start:], dataset.samples[:start]))
    return ordered if count is None else itertools.islice(ordered, count)


def load_edge(config: Config) -> LoadedModel:
    return build_model(config.models.edge, pretrained=config.models.pretrained, role="edge")


async def run_fleet(config: Config, *, edge: LoadedModel | None = None, dataset: Dataset | None = None,
                    topics: Topics = V1, stop: asyncio.Event | None = None,
                    handle_signals: bool = False) -> FleetResult:
    """Run ``edge.devices`` devices until each has sent its images (``edge.limit``, default the whole
    source) or ``edge.duration_s`` has passed, then return the summary and every outcome."""
    import torch

    cfg = config.edge
    log = get_logger("patchcast.fleet")
    torch.set_num_threads(max(cfg.threads, 1))
    if edge is None:
        edge = await asyncio.to_thread(load_edge, config)
    if dataset is None:
        dataset = await asyncio.to_thread(datasets.load, cfg.source)
    if len(dataset) == 0:
        raise ConfigError(f"edge.source {cfg.source!r} has no images")
    engine = EdgeEngine(edge, config.gate, config.selection, config.codec,
                        measure_full_bytes=config.edge.measure_full_bytes,
                        region=config.region if config.edge.offload == "region" else None)
    runner = EdgeRunner(engine, batch_size=cfg.batch_size, batch_delay_ms=cfg.batch_delay_ms)
    mid = model_id(config.models.server, config.models.model_id)
    logins = read_credentials(cfg.credentials_file) if cfg.credentials_file else None  # per-device passwords
    ids = [device_id(cfg.device_prefix, i) for i in range(cfg.devices)]
    devices = [Device(d, replace(config, broker=login_as(config.broker, d, logins)), runner, topics, mid)
               for d in ids]
    count: int | None = cfg.limit or (None if cfg.duration_s else len(dataset))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    log.info("fleet_starting", devices=len(devices), model=mid, images_per_device=count, rate_hz=cfg.rate_hz,
             duration_s=cfg.duration_s or None)
    started = time.monotonic()
    stop_at = started + cfg.duration_s if cfg.duration_s else None
    try:
        async with asyncio.TaskGroup() as tg:
            background = [tg.create_task(runner.run(), name="edge-model")]
            background += [tg.create_task(d.transport.run(), name=f"{d.device_id}-mqtt") for d in devices]
            work = [tg.create_task(d.run(device_samples(dataset, i, len(devices), count), stop_at=stop_at),
                                   name=f"{d.device_id}-run") for i, d in enumerate(devices)]
            watcher = tg.create_task(_cancel_on(stop, work), name="stop-watcher")
            results = await asyncio.gather(*work, return_exceptions=True)
            watcher.cancel()
            failures = [r for r in results
                        if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
            wall_s = time.monotonic() - started
            await asyncio.gather(*(d.close() for d in devices), return_exceptions=True)
            for task in background:
                task.cancel()
    finally:
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    if failures and not any(d.outcomes for d in devices):
        raise failures[0]  # e.g. no broker: a clear error instead of an empty summary
    for exc in failures:
        log.warning("device_failed", error=str(exc), error_type=type(exc).__name__)
    outcomes = [r for d in devices for r in d.outcomes]
    totals = {"late": sum(d.ledger.late for d in devices), "foreign": sum(d.ledger.foreign for d in devices),
              "malformed": sum(d.ledger.malformed for d in devices),
              "duplicate": sum(d.ledger.duplicate for d in devices)}
    summary = summarize(outcomes, devices=len(devices), wall_s=wall_s, model_id=mid, ledger_totals=totals)
    log.info("fleet_done", images=summary["images"], offloaded=summary["offloaded"], timeouts=summary["timeouts"],
             errors=summary["errors"])
    return FleetResult(summary, outcomes, devices)


async def _cancel_on(stop: asyncio.Event, tasks: Sequence[asyncio.Task[None]]) -> None:
    await stop.wait()
    for t in tasks:
        t.cancel()
