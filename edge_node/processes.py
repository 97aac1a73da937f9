"""A fleet split over several processes (``patchcast edge --processes N``).

One process holds at most as many devices as its file-descriptor limit allows (one socket each)
and runs one event loop on one core. The parent splits ``edge.devices`` into N contiguous slices
(``edge.device_offset`` keeps every device id unique), starts one ``patchcast edge`` child per slice
with the parent's resolved config, waits for them, and merges what they report: their outcome
records (so latency percentiles are over every image, not averaged) and their ``fleet`` sections.
SIGTERM or SIGINT to the parent reaches every child (each stops within its
``edge.shutdown_timeout_s`` and reports); a child that outlives that bound is killed and named.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edge_node.outcome import OutcomeRecord
from edge_node.summary import summarize
from shared.children import start_child, stop_child
from shared.config import Config, to_toml
from shared.errors import ConfigError
from shared.logs import get_logger
from shared.naming import model_id

KILL_GRACE_S = 5.0  # beyond a child's own shutdown bound, before SIGKILL


@dataclass(frozen=True)
class Share:
    """One child's slice of the fleet."""

    index: int
    offset: int
    devices: int

    def __post_init__(self) -> None:
        if self.devices < 1 or self.offset < 0:
            raise ValueError(f"a fleet share needs ≥ 1 device and an offset ≥ 0, got {self}")


def split(devices: int, processes: int, offset: int = 0) -> list[Share]:
    """``devices`` over ``processes`` contiguous slices as even as can be (never an empty one)."""
    if devices < 1 or processes < 1:
        raise ConfigError("a fleet needs ≥ 1 device and ≥ 1 process")
    processes = min(processes, devices)
    base, extra = divmod(devices, processes)
    shares, start = [], offset
    for i in range(processes):
        n = base + (1 if i < extra else 0)
        shares.append(Share(i, start, n))
        start += n
    return shares


@dataclass
class _Child:
    share: Share
    summary_path: Path
    outcomes_path: Path
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    killed: bool = False


def _child_argv(config_path: Path, child: _Child) -> list[str]:
    return [sys.executable, "-m", "patchcast", "edge", "--config", str(config_path),
            "--devices", str(child.share.devices), "--device-offset", str(child.share.offset), "--processes", "1",
            "--summary", str(child.summary_path), "--outcomes-jsonl", str(child.outcomes_path)]


def _read_outcomes(path: Path) -> list[OutcomeRecord]:
    if not path.is_file():
        return []
    with open(path) as f:
        return [OutcomeRecord(**json.loads(line)) for line in f if line.strip()]


def _tail(path: Path, lines: int = 5) -> list[str]:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace").splitlines()[-lines:]
    return []


def merge(config: Config, children: list[_Child], wall_s: float) -> tuple[dict[str, Any], list[OutcomeRecord]]:
    """One summary for the whole fleet from the children's outcome records and summaries."""
    outcomes: list[OutcomeRecord] = []
    parts: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for child in children:
        outcomes.extend(_read_outcomes(child.outcomes_path))
        try:
            parts.append(json.loads(child.summary_path.read_text()))
        except (OSError, ValueError):
            code = None if child.proc is None else child.proc.returncode
            failed.append({"process": child.share.index, "devices": child.share.devices, "exit_code": code,
                           "killed": child.killed, "log_tail": _tail(child.log_path)})
    totals = {k: sum(p.get(f"replies_{k}", 0) for p in parts) for k in ("late", "foreign", "malformed", "duplicate")}
    devices = sum(c.share.devices for c in children)
    wall_s = max((p["wall_s"] for p in parts if p.get("wall_s")), default=wall_s)  # the children's own runs
    summary = summarize(outcomes, devices=devices, wall_s=wall_s,
                        model_id=model_id(config.models.server, config.models.model_id), ledger_totals=totals,
                        per_device=devices <= 1000)
    fleets = [p.get("fleet", {}) for p in parts]
    connects = [f["connect_s"] for f in fleets if f.get("connect_s") is not None]
    rss_devices = [(f.get("rss_per_device_kb"), c.share.devices) for f, c in zip(fleets, children, strict=False)]
    weighted = [(kb, n) for kb, n in rss_devices if kb is not None]
    summary["fleet"] = {
        "processes": len(children),
        "connected": sum(f.get("connected", 0) for f in fleets),
        # a child that reported nothing counts all its devices as not connected: never a silent gap
        "not_connected": sum(f.get("not_connected", 0) for f in fleets) + sum(d["devices"] for d in failed),
        "not_connected_ids": [i for f in fleets for i in f.get("not_connected_ids", [])][:20],
        "connect_errors": sorted({e for f in fleets for e in f.get("connect_errors", [])}),
        "connect_s": max(connects) if connects else None,
        "stopped_by": sorted({f.get("stopped_by", "?") for f in fleets}),
        "images_started": sum(f.get("images_started", 0) for f in fleets),
        "images_abandoned": sum(f.get("images_abandoned", 0) for f in fleets),
        "shutdown_s": max((f.get("shutdown_s", 0.0) for f in fleets), default=0.0),
        "connections_dropped": sum(f.get("connections_dropped", 0) for f in fleets),
        "rss_mb": round(sum(f.get("rss_mb", 0.0) for f in fleets), 1),
        "rss_per_device_kb": round(sum(kb * n for kb, n in weighted) / sum(n for _, n in weighted), 1)
        if weighted else None,
        "process_failures": failed,
    }
    return summary, outcomes


async def run_processes(config: Config, processes: int, *, stop: asyncio.Event | None = None,
                        handle_signals: bool = False) -> tuple[dict[str, Any], list[OutcomeRecord]]:
    """Run ``config.edge.devices`` devices in ``processes`` child fleets; return the merged summary and outcomes."""
    log = get_logger("patchcast.fleet")
    cfg = config.edge
    shares = split(cfg.devices, processes, cfg.device_offset)
    folder = Path(tempfile.mkdtemp(prefix="patchcast-fleet-"))  # 0700: the config may hold a password
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    children = [_Child(s, folder / f"fleet-{s.index}.json", folder / f"fleet-{s.index}.jsonl",
                       folder / f"fleet-{s.index}.log") for s in shares]
    config_path = folder / "config.toml"
    config_path.write_text(to_toml(replace(config, edge=replace(cfg, processes=1, device_offset=0))))
    config_path.chmod(0o600)
    started = time.monotonic()
    logs: list[Any] = []
    try:
        for child in children:
            out = open(child.log_path, "wb")  # noqa: SIM115, ASYNC230 - a local file; closed after the child exits
            logs.append(out)
            child.proc = await start_child(_child_argv(config_path, child), output=out)
        log.info("fleet_processes_started", processes=len(children), devices=[c.share.devices for c in children],
                 pids=[c.proc.pid for c in children if c.proc])
        waits = [asyncio.ensure_future(c.proc.wait()) for c in children if c.proc]
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([*waits, stopper], return_when=asyncio.FIRST_COMPLETED)
        while not stopper.done() and not all(w.done() for w in waits):
            await asyncio.wait([*[w for w in waits if not w.done()], stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        bound = cfg.shutdown_timeout_s + KILL_GRACE_S
        results = await asyncio.gather(*(stop_child(c.proc, bound) for c in children if c.proc))
        for child, (_, killed) in zip(children, results, strict=True):
            child.killed = killed
        wall_s = time.monotonic() - started
        summary, outcomes = merge(config, children, wall_s)
    finally:
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        for out in logs:
            out.close()
        for child in children:  # never leave a child behind, whatever ended the wait
            if child.proc is not None and child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                await child.proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
    log.info("fleet_processes_done", images=summary["images"], connected=summary["fleet"]["connected"],
             not_connected=summary["fleet"]["not_connected"], failures=len(summary["fleet"]["process_failures"]))
    return summary, outcomes
