"""Fleet scale: how many simulated devices one machine holds against one Mosquitto, as an operator runs it.

    PATCHCAST_DATA=<datasets folder> .venv/bin/python bench/fleet.py --devices 1000 5000 10000 20000 \\
        --window 60 --fleet-rate 20 --json runs/fleet_scale.json

Per step: a fresh Mosquitto (broker/mosquitto.conf), ``--workers`` ``patchcast worker`` processes, and
one ``patchcast edge`` command with the defaults plus ``--devices N --rate R/N --random-phase
--threshold 0`` (every image offloaded; the fleet as a whole offers R images/s whatever N is, so the
steps measure holding N connections, not model throughput). Once every device is online (its
retained availability, seen by a spy client) the window runs for ``--window`` seconds; then SIGTERM,
and the time to the process's exit is measured. RSS and CPU of the fleet (with its child processes)
and of the broker are sampled from /proc every second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_node.fleet import raise_fd_limit
from patchcast.broker import LOCAL_CONF, BrokerProcess
from shared.config import BrokerConfig
from shared.protocol import Availability, decode
from shared.topics import V1
from shared.transport import Incoming, Transport

REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, float, int] | None:
    """(ppid, cpu seconds, rss bytes) of one process, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK, rss
    except (OSError, ValueError, IndexError):
        return None


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            s = _proc_stat(int(entry.name))
            if s:
                parents[int(entry.name)] = s[0]
    out, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier]
        out += frontier
    return out


class Sampler:
    """CPU seconds and peak RSS of a process tree, sampled every second."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0
        self.cpu: dict[int, float] = {}

    def sample(self) -> None:
        rss = 0
        for p in tree(self.pid):
            s = _proc_stat(p)
            if s:
                rss += s[2]
                self.cpu[p] = s[1]
        self.peak_rss = max(self.peak_rss, rss)

    def cpu_s(self) -> float:
        return sum(self.cpu.values())


class Spy:
    def __init__(self, port: int) -> None:
        self.state: dict[tuple[str, str], str] = {}
        self.transport = Transport(BrokerConfig(port=port), client_id="fleet-bench-spy", handler=self._on)

    def _on(self, msg: Incoming) -> None:
        with contextlib.suppress(Exception):
            m = decode(msg.payload)
            if isinstance(m, Availability):
                self.state[(m.role, m.ident)] = m.state

    def online(self, role: str) -> int:
        return sum(1 for (r, _), s in self.state.items() if r == role and s == "online")


async def step(devices: int, args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    with BrokerProcess(port=0, template=LOCAL_CONF) as broker:
        assert broker.pid is not None
        bsampler = Sampler(broker.pid)
        bsampler.sample()
        broker_idle = bsampler.peak_rss
        spy = Spy(broker.port)
        watching = asyncio.create_task(spy.transport.run(), name="spy")
        await spy.transport.subscribe(V1.availability_filter())
        await spy.transport.wait_connected(10)
        workers = []
        for i in range(args.workers):
            log = open(logdir / f"worker-{devices}-{i}.log", "wb")  # noqa: SIM115, ASYNC230 - the child holds it
            workers.append(subprocess.Popen(  # noqa: ASYNC220 - started once per step
                [sys.executable, "-m", "patchcast", "worker", "--broker", broker.address, "--worker-id",
                 f"bench-w{i}", "--threads", "1", "--log-format", "json", "--log-level", "warning"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            log.close()
        async with asyncio.timeout(180):
            while spy.online("worker") < args.workers:  # noqa: ASYNC110 - a spy's snapshot
                await asyncio.sleep(0.2)
        summary_path = logdir / f"fleet-{devices}.json"
        cmd = [sys.executable, "-m", "patchcast", "edge", "--broker", broker.address, "--devices", str(devices),
               "--rate", f"{args.fleet_rate / devices:.8f}", "--random-phase", "--threshold", "0",
               "--summary", str(summary_path), "--log-format", "json", "--log-level", "warning"]
        flog = open(logdir / f"fleet-{devices}.log", "wb")  # noqa: SIM115, ASYNC230 - the child holds it
        launched = time.monotonic()
        fleet = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=flog,  # noqa: ASYNC220
                                 stdin=subprocess.DEVNULL)
        flog.close()
        fsampler = Sampler(fleet.pid)
        online_at = None
        try:
            while fleet.poll() is None and time.monotonic() - launched < args.connect_limit:
                fsampler.sample()
                bsampler.sample()
                if spy.online("edge") >= devices:
                    online_at = time.monotonic()
                    break
                await asyncio.sleep(1.0)
            window_start = time.monotonic()
            cpu_f0, cpu_b0 = fsampler.cpu_s(), bsampler.cpu_s()
            while fleet.poll() is None and time.monotonic() - window_start < args.window:
                fsampler.sample()
                bsampler.sample()
                await asyncio.sleep(1.0)
            fsampler.sample()
            bsampler.sample()
            window_s = time.monotonic() - window_start
            cpu_f = (fsampler.cpu_s() - cpu_f0) / window_s * 100
            cpu_b = (bsampler.cpu_s() - cpu_b0) / window_s * 100
            online = spy.online("edge")
            fleet.send_signal(signal.SIGTERM)
            termed = time.monotonic()
            try:
                await asyncio.to_thread(fleet.wait, 120)
            except subprocess.TimeoutExpired:
                fleet.kill()
                fleet.wait()
            exit_s = time.monotonic() - termed
        finally:
            if fleet.poll() is None:
                fleet.kill()
                fleet.wait()
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                try:
                    w.wait(20)
                except subprocess.TimeoutExpired:
                    w.kill()
                    w.wait()
            await spy.transport.close()
            watching.cancel()
    s = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    f = s.get("fleet", {})
    lat = s.get("latency_ms") or {}
    return {
        "devices": devices, "processes": f.get("processes"), "connected": f.get("connected"),
        "online_seen": online, "not_connected": f.get("not_connected"), "connect_errors": f.get("connect_errors"),
        "connect_s": f.get("connect_s"), "online_after_launch_s": None if online_at is None else
        round(online_at - launched, 1), "window_s": round(window_s, 1), "images": s.get("images"),
        "offloaded": s.get("offloaded"), "replies": s.get("replies"), "fallbacks": s.get("fallbacks"),
        "abandoned": f.get("images_abandoned"), "p95_ms": lat.get("p95"), "p99_ms": lat.get("p99"),
        "fleet_rss_mb": round(fsampler.peak_rss / 2**20), "rss_per_device_kb": f.get("rss_per_device_kb"),
        "fleet_cpu_pct": round(cpu_f), "broker_rss_mb": round(bsampler.peak_rss / 2**20, 1),
        "broker_rss_mb_per_1000": round((bsampler.peak_rss - broker_idle) / 2**20 / (devices / 1000), 2),
        "broker_cpu_pct": round(cpu_b), "sigterm_exit_s": round(exit_s, 2), "exit_code": fleet.returncode,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| devices | procs | connected | connect s | images | replies | fallbacks+abandoned | p95 (p99) ms | "
            "fleet RSS | RSS/device | fleet CPU | broker RSS (per 1,000) | broker CPU | SIGTERM→exit |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lost = (r["fallbacks"] or 0) + (r["abandoned"] or 0)
        lines.append(
            f"| {r['devices']:,} | {r['processes']} | {r['connected']} (not: {r['not_connected']}) | "
            f"{r['connect_s']} | "
            f"{r['images']} | {r['replies']} | {lost} | {r['p95_ms']} ({r['p99_ms']}) | {r['fleet_rss_mb']} MB | "
            f"{r['rss_per_device_kb']} KB | {r['fleet_cpu_pct']} % | {r['broker_rss_mb']} MB "
            f"({r['broker_rss_mb_per_1000']}) | {r['broker_cpu_pct']} % | {r['sigterm_exit_s']} s |")
    return "\n".join(lines)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[1000, 5000, 10000, 20000])
    p.add_argument("--window", type=float, default=60.0, help="seconds of sending once every device is online")
    p.add_argument("--fleet-rate", type=float, default=20.0, help="images/s offered by the whole fleet")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connect-limit", type=float, default=240.0, help="longest wait for every device online")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    limit = raise_fd_limit()  # Mosquitto, started from here, inherits it
    rows = []
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        for n in args.devices:
            print(f"step: {n} devices (fd limit {limit})", file=sys.stderr, flush=True)
            rows.append(await step(n, args, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"fleet_rate": args.fleet_rate, "window_s": args.window,
                                         "workers": args.workers, "fd_limit": limit, "rows": rows}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
