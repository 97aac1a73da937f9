"""``patchcast demo``: the whole system on one machine, with one command.

A local Mosquitto on a free port, an autoscaled worker pool (:mod:`patchcast.scaling`), a fleet of
simulated devices (``patchcast edge`` in a child process) and the live monitor in this terminal.
When the devices are done it prints a summary table and writes a JSON report; every child process
is stopped on the way out — normal end, error or Ctrl-C (SIGTERM, bounded wait, SIGKILL; children
also get a parent-death signal, so none outlives a killed demo).

Accounting: the device fleet's own summary is authoritative for what each image became; the monitor
counts the Outcome messages it received over MQTT. ``lost_requests`` = offloaded images that got
neither a reply nor an error reply (timeouts); ``unaccounted_images`` = images without an Outcome
message at the monitor. Both must be 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from patchcast.monitor.app import MonitorSession
from patchcast.monitor.errors import first_error
from patchcast.monitor.render import render
from patchcast.monitor.state import Snapshot, snapshot_dict
from patchcast.scaling.backends import ProcessPool, default_worker_argv, worker_env
from patchcast.scaling.service import ScalerService
from shared.children import start_child, stop_child
from shared.config import Config
from shared.errors import PatchCastError
from shared.logs import get_logger

REPORT_SCHEMA = "patchcast.demo_report/1"
EDGE_EXIT_GRACE_S = 3.0


class DemoError(PatchCastError):
    code = "demo"


@dataclass(frozen=True)
class Profile:
    edge: str
    server: str
    source: str
    server_eval: int  # images for the server-only reference accuracy (0: skip)
    # the operating point the devices run (selection rule, value, gate threshold), None: the config's
    selection: tuple[str, float, float] | None = None
    top_up: TopUpPoint | None = None  # the same with the server's top-up (``--top-up``), None: the config's


@dataclass(frozen=True)
class TopUpPoint:
    """A top-up operating point: the devices' gate and selection, the offer, and the workers' threshold."""

    rule: str
    value: float
    threshold: float  # the devices' gate η
    offer_rule: str
    offer_value: float
    top_up_threshold: float  # the workers' η₂


# zoo:imagenette-*: the cheapest point of `patchcast eval` on the 3,925 val photos within 1 point of
# server-only with the paper's rule and gate, δ_sum 0.97 and min-entropy η 0.5781 (73.04 % against
# 73.99 %, comm cost 0.433; docs/results.md, Imagenette section)
IMAGENETTE_POINT = ("sum_threshold", 0.97, 0.5781)
# zoo:imagenette-* with the server's top-up through the default jpeg-mosaic q90: the best point of
# `scripts/frontier_losses.py reports/eval-imagenette-q90` at comm cost ≤ 0.35 (top-25 sent, top-75 offered,
# η 0.6514, η₂ 0.7003); live on the 3,925 val photos 72.89 % at cost 0.350 (docs/results.md)
IMAGENETTE_TOP_UP = TopUpPoint("topk", 25, 0.6514, "topk", 75, 0.7003)


def profile_defaults(cfg: Config, name: str) -> Profile:
    if name == "deit":
        return Profile("timm:deit_tiny_patch16_224", "timm:deit_base_patch16_224", cfg.demo.deit_source, 0)
    if name == "cifar10":
        return Profile("zoo:cifar10-edge", "zoo:cifar10-server", "cifar10/test.tar", 256)
    return Profile("zoo:imagenette-edge", "zoo:imagenette-server", "imagenette2/val.tar", 256, IMAGENETTE_POINT,
                   IMAGENETTE_TOP_UP)


@dataclass(frozen=True)
class DemoOptions:
    profile: str
    edge: str
    server: str
    source: str
    devices: int
    rate_hz: float
    duration_s: float
    headless: bool = False
    report: Path | None = None
    log_dir: Path = Path("runs/demo")
    broker: str | None = None  # HOST:PORT of a running broker; None starts a local one
    config_file: str | None = None
    worker_threads: int = 1
    reply_timeout_s: float = 15.0
    server_eval: int = 256
    pretrained: bool = False
    selection: tuple[str, float, float] | None = None  # rule, value, gate threshold for the devices
    # the server's top-up: True runs edge.offload = "top_up" at ``top_up_point`` (None: the config's settings)
    top_up: bool = False
    top_up_point: TopUpPoint | None = None


@dataclass(frozen=True)
class References:
    jpeg_bytes_per_image: int  # mean full-image JPEG (codec quality) at the edge model's input size
    server_accuracy: float | None
    server_images: int


def measure_references(opts: DemoOptions, cfg: Config, jpeg_sample: int = 128) -> References:
    """Baselines the live system cannot measure by itself. CPU work: run it in a thread (one torch thread).

    * Full-image cost: the same request message carrying *every* patch with the JPEG codec at the
      configured quality (so message overhead is counted on both sides), averaged over a sample of the
      source at the edge model's input size.
    * Server-only accuracy: the server model on full images, a sample of the same source.
    """
    import numpy as np
    import torch

    from shared import datasets, protocol
    from shared.models import build_model

    torch.set_num_threads(1)
    edge = build_model(opts.edge, pretrained=opts.pretrained, role="edge")
    ds = datasets.load(opts.source)
    if len(ds) == 0:
        raise DemoError(f"{opts.source}: no images")
    sizes = []
    for i, sample in enumerate(ds.spread(jpeg_sample, seed=1).samples):
        pixels = datasets.crop_uint8(datasets.decode_rgb(sample.data), edge.preprocess)
        request = protocol.build_request(
            device_id="cam-0000", request_id=f"cam-0000.{i:06d}", pixels=pixels,
            indices=np.arange(edge.num_patches), patch_size=edge.patch_size, codec="jpeg",
            codec_params={"q": cfg.codec.quality}, topk_ids=tuple(range(5)), topk_probs=(0.2,) * 5,
            uncertainty=1.0, sent_at=time.time(), label=sample.label, deadline=time.time() + 5.0)
        sizes.append(len(protocol.encode(request)))
    accuracy, n = None, 0
    if opts.server_eval > 0:
        server = build_model(opts.server, pretrained=opts.pretrained, role="server")
        labelled = datasets.Dataset(tuple(s for s in ds.samples if s.label is not None), ds.class_names,
                                    ds.source).spread(opts.server_eval, seed=2)
        correct = 0
        with torch.inference_mode():
            for batch, labels in datasets.iter_batches(labelled, server.preprocess, 64):
                logits = server.model(datasets.normalize(batch, server.preprocess))
                correct += int((logits.argmax(-1) == labels).sum())
                n += len(labels)
        accuracy = correct / n if n else None
    return References(round(sum(sizes) / len(sizes)), accuracy, n)


def _complete_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def _patchcast(*args: str) -> list[str]:
    return [sys.executable, "-m", "patchcast.cli", *args]


def edge_argv(opts: DemoOptions, broker: str, summary: Path) -> list[str]:
    argv = _patchcast("edge", "--broker", broker, "--devices", str(opts.devices), "--rate", str(opts.rate_hz),
                      "--duration", str(opts.duration_s), "--edge-model", opts.edge,
                      "--server-model", opts.server, "--source", opts.source,
                      "--reply-timeout", str(opts.reply_timeout_s), "--summary", str(summary),
                      "--log-format", "json")
    point = opts.top_up_point if opts.top_up else None
    if point is not None:
        argv += ["--rule", point.rule, "--value", f"{point.value:g}", "--threshold", f"{point.threshold:g}",
                 "--offer-rule", point.offer_rule, "--offer-value", f"{point.offer_value:g}"]
    elif opts.selection is not None:
        rule, value, threshold = opts.selection
        argv += ["--rule", rule, "--value", f"{value:g}", "--threshold", f"{threshold:g}"]
    if opts.top_up:
        argv += ["--offload", "top_up"]
    return [*argv, "--config", opts.config_file] if opts.config_file else argv


def worker_argv(opts: DemoOptions) -> list[str]:
    argv = [*default_worker_argv(), "--server-model", opts.server, "--threads", str(opts.worker_threads),
            "--log-format", "json"]
    if opts.top_up and opts.top_up_point is not None:
        argv += ["--top-up-threshold", f"{opts.top_up_point.top_up_threshold:g}"]
    return [*argv, "--config", opts.config_file] if opts.config_file else argv


class Demo:
    """One run. :meth:`run` returns the report; it never leaves a child process behind."""

    def __init__(self, cfg: Config, opts: DemoOptions, console: Console) -> None:
        self.cfg = cfg
        self.opts = opts
        self.console = console
        self.log = get_logger("patchcast.demo")
        self.stop = asyncio.Event()
        self.interrupted = False
        self.phase = "starting"
        self.started = time.monotonic()
        self.session: MonitorSession | None = None
        self.scaler: ScalerService | None = None
        self.references: References | None = None
        self.finished_at: float | None = None
        self.pids: dict[str, list[int]] = {"broker": [], "edge": [], "workers": []}

    # ---- display ------------------------------------------------------------------------------
    def _footer(self) -> Text:
        t = Text()
        t.append("demo ", style="bold")
        first = self.session.aggregator.first_outcome_at if self.session else None
        if self.phase == "running" and first is not None:
            done = min(self.opts.duration_s, time.monotonic() - first)
            t.append(f"{done:.0f}/{self.opts.duration_s:.0f} s")
        elif self.phase == "running":
            t.append("devices starting")
        else:
            t.append(self.phase)
        if self.scaler is not None:
            members = self.scaler.backend.members()
            starting = sum(1 for m in members if m.state == "starting")
            t.append(f"  pool {len(members)}" + (f" ({starting} starting)" if starting else ""))
            t.append(f" [{self.cfg.scaler.min_workers}..{self.cfg.scaler.max_workers}]")
            d = self.scaler.last_decision
            if d is not None and self.scaler.decisions:
                t.append(f"  scaled ↑{self.scaler.decisions['up']} ↓{self.scaler.decisions['down']}")
        t.append("  Ctrl-C stops", style="dim")
        return t

    def last_outcome_at(self) -> float | None:
        return self.session.aggregator.last_outcome_at if self.session is not None else None

    def view(self) -> RenderableType:
        assert self.session is not None
        return Group(render(self.session.snapshot(), width=self.console.width), self._footer())

    async def _display(self) -> None:
        refresh = self.cfg.monitor.refresh_s
        if self.opts.headless:
            while True:
                await asyncio.sleep(5.0)
                assert self.session is not None
                s = self.session.snapshot()
                self.log.info("demo_progress", phase=self.phase, images=s.images_total,
                              requests_per_s=round(s.requests_per_s, 1), workers_online=s.workers_online,
                              latency_p95_ms=s.latency_p95_ms)
        with Live(self.view(), console=self.console, auto_refresh=False, redirect_stdout=False,
                  redirect_stderr=False) as live:
            while True:
                await asyncio.sleep(refresh)
                live.update(self.view(), refresh=True)

    # ---- phases -------------------------------------------------------------------------------
    async def _wait(self, condition: Any, timeout_s: float, what: str, pool: ProcessPool | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.stop.is_set():
                return
            if time.monotonic() > deadline:
                raise DemoError(f"{what} within {timeout_s:.0f} s (logs: {self.opts.log_dir})")
            if pool is not None and pool.crashes_total >= 3:
                raise DemoError(f"{what}: workers exited {pool.crashes_total} times "
                                f"(see {self.opts.log_dir / 'workers'})")
            await asyncio.sleep(0.2)

    async def run(self) -> dict[str, Any]:
        opts = self.opts
        opts.log_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            self.interrupted = True
            self.stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        broker = None
        try:
            cfg = self.cfg
            if opts.broker is None:
                from patchcast.broker import BrokerProcess

                self.phase = "starting broker"
                broker = BrokerProcess(port=0, max_packet_bytes=cfg.broker.max_packet_bytes)
                await asyncio.to_thread(broker.start)
                self.pids["broker"] = [broker.pid] if broker.pid else []
                cfg = replace(cfg, broker=replace(cfg.broker, host=broker.host, port=broker.port))
            self.cfg = cfg = replace(cfg, models=replace(cfg.models, edge=opts.edge, server=opts.server,
                                                         pretrained=opts.pretrained))
            return await self._run_services(f"{cfg.broker.host}:{cfg.broker.port}")
        finally:
            if broker is not None:
                await asyncio.to_thread(broker.stop)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _run_services(self, address: str) -> dict[str, Any]:
        opts, cfg = self.opts, self.cfg
        summary_path = opts.log_dir / "edge-summary.json"
        summary_path.unlink(missing_ok=True)
        self.session = session = MonitorSession(
            cfg, title=f"PatchCast demo  {opts.profile}  {address}")
        pool = ProcessPool(cfg.scaler, argv=worker_argv(opts), env=worker_env(cfg),
                           log_dir=opts.log_dir / "workers")
        self.scaler = scaler = ScalerService(cfg, pool)
        edge_log: IO[bytes] | None = None
        edge_proc: asyncio.subprocess.Process | None = None
        edge_code: int | None = None
        final: Snapshot | None = None
        async with asyncio.TaskGroup() as tg:
            monitor_task = tg.create_task(session.run(), name="demo-monitor")
            scaler_task = tg.create_task(scaler.run(), name="demo-scaler")
            display_task = tg.create_task(self._display(), name="demo-display")
            try:
                self.phase = "measuring baselines, starting workers"
                self.references = refs = await asyncio.to_thread(measure_references, opts, cfg)
                session.ingest.jpeg_bytes_estimate = refs.jpeg_bytes_per_image
                if refs.server_accuracy is not None:
                    session.aggregator.set_server_reference(refs.server_accuracy, refs.server_images)
                await session.wait_connected()
                self.phase = "waiting for the first worker"
                await self._wait(lambda: any(m.state == "running" for m in pool.members()),
                                 cfg.demo.startup_timeout_s, "no worker came online", pool)
                if not self.stop.is_set():
                    self.phase = "starting devices"
                    edge_log = (opts.log_dir / "edge.log").open("ab")
                    edge_proc = await start_child(edge_argv(opts, address, summary_path), output=edge_log)
                    self.pids["edge"] = [edge_proc.pid]
                    self.phase = "running"
                    waiter = asyncio.create_task(edge_proc.wait(), name="demo-edge-wait")
                    stopper = asyncio.create_task(self.stop.wait(), name="demo-stop-wait")
                    while not (waiter.done() or stopper.done()):
                        await asyncio.wait({waiter, stopper}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                        if not waiter.done() and _complete_json(summary_path):
                            # The fleet wrote its summary: its work is done. Give it a moment to exit
                            # by itself (interpreter teardown with torch can be slow), then stop it.
                            await asyncio.wait({waiter}, timeout=EDGE_EXIT_GRACE_S)
                            break
                    stopper.cancel()
                    if not waiter.done():
                        self.phase = "stopping devices"
                        waiter.cancel()
                    edge_code, _ = await stop_child(edge_proc, cfg.demo.shutdown_timeout_s)
                    self.phase = "collecting the last outcomes"
                    await asyncio.sleep(cfg.demo.settle_s)
                final = session.snapshot()
                self.finished_at = self.last_outcome_at()
            finally:
                self.phase = "stopping"
                if edge_proc is not None and edge_proc.returncode is None:
                    await stop_child(edge_proc, cfg.demo.shutdown_timeout_s)
                if edge_log is not None:
                    edge_log.close()
                display_task.cancel()
                scaler.stop()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(cfg.scaler.drain_timeout_s + 5.0):
                        await asyncio.shield(scaler_task)
                scaler_task.cancel()
                await session.close()
                monitor_task.cancel()
        return self.report(final, summary_path, edge_code)

    # ---- report -------------------------------------------------------------------------------
    def _first_outcome(self) -> float | None:
        return self.session.aggregator.first_outcome_at if self.session is not None else None

    def report(self, snap: Snapshot | None, summary_path: Path, edge_code: int | None) -> dict[str, Any]:
        opts = self.opts
        summary: dict[str, Any] = {}
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
        images = int(summary.get("images", 0))
        offloaded = int(summary.get("offloaded", 0))
        replies = int(summary.get("replies", 0))
        errors = int(summary.get("errors", 0))
        refs = self.references
        jpeg_total = refs.jpeg_bytes_per_image * offloaded if refs else None
        jpeg_all = refs.jpeg_bytes_per_image * images if refs else None
        bytes_sent = int(summary.get("bytes_sent", 0))
        accuracy = dict(summary.get("accuracy") or {})
        scaler = self.scaler
        events = [{"t_s": r.t, "direction": r.direction, "from": r.size, "to": r.desired, "reason": r.reason}
                  for r in (scaler.history if scaler else []) if r.direction != "hold"]
        pool = scaler.backend if scaler else None
        report: dict[str, Any] = {
            "schema": REPORT_SCHEMA,
            "profile": opts.profile,
            "models": {"edge": opts.edge, "server": opts.server},
            "source": opts.source,
            "devices": opts.devices,
            "rate_hz": opts.rate_hz,
            "duration_s": opts.duration_s,
            "wall_s": round(time.monotonic() - self.started, 1),
            "sending_s": (round(self.finished_at - first, 1) if (first := self._first_outcome()) is not None
                          and self.finished_at is not None else None),
            "interrupted": self.interrupted,
            "edge_exit_code": edge_code,
            "images": images,
            "outcomes_received": snap.images_total if snap else 0,
            "unaccounted_images": images - (snap.images_total if snap else 0),
            "offloaded": offloaded,
            "offload_rate": summary.get("sent_fraction"),
            "patch_fraction": summary.get("patch_fraction"),
            "patch_fraction_all": summary.get("patch_fraction_all"),
            "bytes_sent": bytes_sent,
            "bytes_full_jpeg": jpeg_total,
            "bytes_vs_full_jpeg": round(bytes_sent / jpeg_total, 4) if jpeg_total else None,
            # what the devices would have sent with every image as a full JPEG, not only the offloaded ones
            "bytes_full_jpeg_all": jpeg_all,
            "bytes_vs_full_jpeg_all": round(bytes_sent / jpeg_all, 4) if jpeg_all else None,
            "selection": list(opts.selection) if opts.selection else None,
            "top_up": (None if not opts.top_up else asdict(opts.top_up_point) if opts.top_up_point
                       else "the config's"),
            "topped_up": summary.get("regions_sent", 0) if opts.top_up else None,
            "full_jpeg_bytes_per_image": refs.jpeg_bytes_per_image if refs else None,
            "full_jpeg_baseline": f"the same request message carrying every patch, JPEG q={self.cfg.codec.quality}",
            "accuracy": {
                "labelled": accuracy.get("labelled", 0),
                "edge_only": accuracy.get("edge_only"),
                "collaborative": accuracy.get("collaborative"),
                "server_only": refs.server_accuracy if refs else None,
                "server_only_images": refs.server_images if refs else 0,
            },
            "latency_ms": summary.get("latency_ms"),
            "replies": replies,
            "errors": errors,
            "errors_by_code": summary.get("errors_by_code", {}),
            "timeouts": summary.get("timeouts", 0),
            "lost_requests": offloaded - replies - errors,
            "workers": {
                "min": self.cfg.scaler.min_workers,
                "max": self.cfg.scaler.max_workers,
                "peak": scaler.peak_size if scaler else 0,
                "started": getattr(pool, "ever_started", None),
                "crashes": getattr(pool, "crashes_total", None),
                "served_by": summary.get("workers", {}),
                "scale_events": events,
            },
            "monitor": snapshot_dict(snap) if snap else None,
            "pids": {**self.pids, "workers": list(getattr(pool, "all_pids", []))},
            "logs": str(opts.log_dir),
        }
        return report


def summary_table(report: dict[str, Any]) -> Table:
    def pct(x: Any) -> str:
        return "–" if x is None else f"{100 * float(x):.1f} %"

    acc = report["accuracy"]
    lat = report.get("latency_ms") or {}
    w = report["workers"]
    table = Table(title="PatchCast demo — summary", show_header=False, title_justify="left", min_width=60)
    table.add_column(style="dim", no_wrap=True)
    table.add_column()
    rows = [
        ("images", f"{report['images']} from {report['devices']} devices in {report['sending_s'] or 0:.0f} s"
                   f"{' (interrupted)' if report['interrupted'] else ''}, "
                   f"{report['outcomes_received']} outcomes received"),
        ("offload rate", pct(report["offload_rate"])),
        ("patches sent", f"{pct(report['patch_fraction'])} of offloaded images' patches"
                         + (f" (both rounds; {report['topped_up']} images topped up at the server's request)"
                            if report.get("topped_up") is not None else "")),
        ("bytes sent", f"{report['bytes_sent']:,} B vs {report['bytes_full_jpeg'] or 0:,} B for the offloaded "
                       f"images as full-image JPEG requests ({pct(report['bytes_vs_full_jpeg'])})"),
        ("bytes vs all images", f"{report['bytes_sent']:,} B vs {report.get('bytes_full_jpeg_all') or 0:,} B for "
                                f"every image as a full-image JPEG request "
                                f"({pct(report.get('bytes_vs_full_jpeg_all'))})"),
        ("accuracy edge-only", pct(acc["edge_only"])),
        ("accuracy collaborative", pct(acc["collaborative"])),
        ("accuracy server-only", f"{pct(acc['server_only'])} ({acc['server_only_images']} full images)"),
        ("latency p50/p95/p99", " / ".join(f"{lat[k]:.0f} ms" if lat.get(k) is not None else "–"
                                           for k in ("p50", "p95", "p99"))),
        ("workers", f"peak {w['peak']} (min {w['min']}, max {w['max']}), replies from "
                    f"{len(w['served_by'])}, {len(w['scale_events'])} scaling events"),
        ("lost requests", str(report["lost_requests"])),
        ("unaccounted images", str(report["unaccounted_images"])),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table


async def run_demo(cfg: Config, opts: DemoOptions, console: Console) -> dict[str, Any]:
    try:
        return await Demo(cfg, opts, console).run()
    except BaseExceptionGroup as group:
        error = first_error(group)
        if error is None:
            raise
        raise error from group
