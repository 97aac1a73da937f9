"""Bounded fault scenarios on loopback: what devices see when workers die and the broker restarts.

    .venv/bin/python bench/faults.py                           # every scenario: zoo models, CIFAR-10 test set
    .venv/bin/python bench/faults.py --scenario worker-kills --json runs/faults.json

Each scenario starts its own Mosquitto (the project's ``broker/mosquitto.conf`` on a free port), a
pool of ``patchcast worker`` child processes in one shared-subscription group, and a fleet of
simulated devices in this process that offloads every image (gate threshold 0, so that every image
tests delivery), with the configuration's delivery settings (``edge.retries``, ``edge.reply_timeout_s``,
``edge.deadline_s``, ``worker.dedupe_*``, ``broker.reconnect_*``). The offered load is ``--load``
times the capacity measured first on the same pool (devices sending as fast as replies allow).

Scenarios (``--scenario``, repeatable; default: all but ``overload``, and ``hostile`` only where its
corpus module exists):

* ``worker-kills``: SIGKILL a serving worker every ``--kill-every`` seconds, ``--kills`` times; a
  replacement starts at once (as ``patchcast workers`` restarts a crashed worker);
* ``broker-restarts``: the broker stops and comes back on the same port after 3 s, three times;
* ``broker-outage``: the broker is away for 30 s once;
* ``hostile``: ``--hostile-count`` hostile messages of every kind (``bench/hostile_corpus.py``) sent
  by a raw client while the fleet runs; a worker that exits is counted;
* ``overload``: a second fleet adds ``--overload`` times the capacity for 30 s on top of the load;
* ``shared-session``: no fleet: what Mosquitto does with a SIGKILLed member's unacknowledged
  messages in a shared subscription, with clean and with persistent sessions (why workers keep clean
  sessions: docs/reliability.md).

Per scenario it prints one row (and ``--json`` writes them with every detail):

* images: taken in by the devices; answered: by a server; fallbacks: kept the edge label;
* deadline: fallbacks because the image's deadline passed; refused: fallbacks after a worker's error
  reply (e.g. ``busy`` on the last attempt);
* dup→app: images whose application got more than one answer (must be 0);
* lost: images that got no answer at all, or fell back for another reason before their deadline
  (must be 0);
* recover: from the end of each fault until every device had a server answer to an image it first
  sent after it (the worst of the scenario's faults); p95: latency of the answered images, first
  publish to answer; retries, dup/late replies: re-sends, and replies the devices dropped (a re-send
  answered too / after the image's deadline); exits: workers that exited on their own.

Extension point: :data:`SCENARIOS` maps a name to a coroutine ``(Run) -> Row``; a new fault is a
function that drives :class:`Run`'s broker, pool and fleet and returns ``run.row(...)``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # bench/hostile_corpus.py, where it exists

from edge_node.fleet import FleetResult, run_fleet
from edge_node.outcome import OutcomeRecord
from patchcast.broker import LOCAL_CONF, BrokerProcess
from shared.config import Config, load_config
from shared.datasets import Dataset
from shared.models import LoadedModel
from shared.naming import model_id
from shared.protocol import Availability, decode
from shared.topics import V1
from shared.transport import Incoming, Transport

REPO = Path(__file__).resolve().parent.parent
_T0 = time.monotonic()


_CLEANUP: list[Callable[[], None]] = []  # stops what is running now, should this process be terminated


def _terminated(signum: int, frame: object) -> None:
    for stop in reversed(_CLEANUP):
        with contextlib.suppress(Exception):
            stop()
    raise SystemExit(128 + signum)


def say(text: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[{time.monotonic() - _T0:6.1f} s] {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Options:
    workers: int = 3
    devices: int = 8
    load: float = 0.6  # of the capacity measured on the same pool
    capacity: float = 0.0  # replies/s; 0: measure it
    probe_s: float = 8.0
    warmup_s: float = 4.0
    tail_s: float = 10.0
    kills: int = 10
    kill_every_s: float = 3.0
    restarts: tuple[float, ...] = (3.0, 3.0, 3.0)
    outage_s: float = 30.0
    gap_s: float = 10.0
    hostile_count: int = 10_000
    hostile_rate: float = 500.0
    overload: float = 2.0  # extra load, × capacity, on top of ``load`` (3× in all with the defaults)
    overload_s: float = 30.0
    worker_args: tuple[str, ...] = ("--threads", "1")
    config: str | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0


@dataclass
class Row:
    scenario: str
    faults: int
    images: int
    answered: int
    fallbacks: int
    deadline: int
    refused: int
    duplicates_to_app: int
    lost: int
    recover_s: float | None
    p95_ms: float | None
    retries: int
    replies_duplicate: int
    replies_late: int
    worker_exits: int
    offered_per_s: float
    capacity: float
    wall_s: float
    details: dict[str, Any] = field(default_factory=dict)


# ---- the pieces ----------------------------------------------------------------------------------
class Pool:
    """``patchcast worker`` child processes in one shared-subscription group."""

    def __init__(self, port: int, cfg: Config, group: str, logdir: Path, options: Options) -> None:
        self.port, self.cfg, self.group, self.logdir, self.options = port, cfg, group, logdir, options
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: set[str] = set()
        self._seq = 0

    def start_one(self) -> str:
        self._seq += 1
        wid = f"{self.group}-w{self._seq:02d}"
        cmd = [sys.executable, "-m", "patchcast.cli", "worker", "--broker", f"127.0.0.1:{self.port}",
               "--server-model", self.cfg.models.server, "--model-id", model_id(self.cfg.models.server,
                                                                              self.cfg.models.model_id),
               "--group", self.group, "--worker-id", wid, "--log-format", "json", "--log-level", "warning",
               *self.options.worker_args]
        if self.options.config:
            cmd += ["--config", self.options.config]
        log = open(self.logdir / f"{wid}.log", "wb")  # noqa: SIM115 - the child holds it
        try:
            self.procs[wid] = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, env={**os.environ})
        finally:
            log.close()
        return wid

    def alive(self) -> list[str]:
        return [w for w, p in self.procs.items() if p.poll() is None]

    def kill(self, wid: str) -> None:
        self.killed.add(wid)
        proc = self.procs[wid]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def exits(self) -> dict[str, int]:
        """Workers that exited on their own (not killed here), with their exit status."""
        return {w: p.returncode for w, p in self.procs.items()
                if w not in self.killed and p.poll() is not None and p.returncode != 0}

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


class Availabilities:
    """The workers' retained availability, as a spy client sees it."""

    def __init__(self, cfg: Config, client_id: str) -> None:
        self.state: dict[str, str] = {}
        self.transport = Transport(cfg.broker, client_id=client_id, handler=self._on)

    def _on(self, msg: Incoming) -> None:
        with contextlib.suppress(Exception):
            m = decode(msg.payload)
            if isinstance(m, Availability):
                self.state[m.ident] = m.state

    def online(self, wid: str) -> bool:
        return self.state.get(wid) == "online"

    async def wait_online(self, ids: Sequence[str], pool: Pool, limit_s: float = 180.0) -> None:
        async with asyncio.timeout(limit_s):
            while not all(self.online(w) for w in ids):
                dead = [w for w in ids if pool.procs[w].poll() is not None]
                if dead:
                    raise RuntimeError(f"worker {dead[0]} exited while starting; see {pool.logdir}/{dead[0]}.log")
                await asyncio.sleep(0.1)


@dataclass
class Run:
    """One scenario's broker, pool, spy and fleet settings."""

    name: str
    options: Options
    cfg: Config
    broker: BrokerProcess
    pool: Pool
    spy: Availabilities
    edge: LoadedModel
    dataset: Dataset
    capacity: float = 0.0
    startup_s: float = 0.0  # how long the first workers took to serve
    faults: list[tuple[float, float]] = field(default_factory=list)  # (start, end), monotonic

    def fleet_config(self, rate_hz: float, duration_s: float, prefix: str | None = None,
                     **edge: Any) -> Config:
        values = {"rate_hz": rate_hz, "duration_s": duration_s, "limit": 0,
                  "device_prefix": prefix or f"{self.name[:6]}cam", **edge}
        return replace(self.cfg, edge=replace(self.cfg.edge, **values))

    @property
    def rate_hz(self) -> float:
        return self.options.load * self.capacity / self.options.devices

    async def fleet(self, duration_s: float, *, rate_hz: float | None = None, prefix: str | None = None,
                    **edge: Any) -> FleetResult:
        cfg = self.fleet_config(self.rate_hz if rate_hz is None else rate_hz, duration_s, prefix, **edge)
        return await run_fleet(cfg, edge=self.edge, dataset=self.dataset)

    def row(self, result: FleetResult, *, details: dict[str, Any] | None = None) -> Row:
        return measure(self.name, result, self.faults, capacity=self.capacity,
                       offered_per_s=self.rate_hz * self.options.devices, worker_exits=len(self.pool.exits()),
                       details=details or {})


def measure(name: str, result: FleetResult, faults: Sequence[tuple[float, float]], *, capacity: float,
            offered_per_s: float, worker_exits: int, details: dict[str, Any]) -> Row:
    """The table row for one fleet run under ``faults`` (see the module docstring)."""
    records = result.outcomes
    s = result.summary
    per_image = collections.Counter((r.device_id, r.request_id) for r in records)
    fallbacks = [r for r in records if r.status in ("timeout", "error")]
    deadline = sum(r.error_code == "timeout" for r in fallbacks)
    refused = sum(r.error_code in _WORKER_CODES for r in fallbacks)
    started = sum(d.started for d in result.devices)
    other = len(fallbacks) - deadline - refused
    recover = [recovery_s(records, end) for _start, end in faults]
    worst = None if not recover or None in recover else max(r for r in recover if r is not None)
    latencies = sorted(r.latency_ms for r in records if r.status == "server" and r.latency_ms is not None)
    p95 = latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)] if latencies else None
    return Row(
        scenario=name, faults=len(faults), images=len(records), answered=sum(r.status == "server" for r in records),
        fallbacks=len(fallbacks), deadline=deadline, refused=refused,
        duplicates_to_app=sum(n - 1 for n in per_image.values()), lost=(started - len(records)) + other,
        recover_s=None if worst is None else round(worst, 2),
        p95_ms=None if p95 is None else round(p95, 1), retries=s["retries"], replies_duplicate=s["replies_duplicate"],
        replies_late=s["replies_late"], worker_exits=worker_exits, offered_per_s=round(offered_per_s, 1),
        capacity=round(capacity, 1), wall_s=s["wall_s"],
        details={"errors_by_code": s["errors_by_code"], "latency_ms": s["latency_ms"],
                 "recover_s_each": [None if r is None else round(r, 2) for r in recover],
                 "workers": len(s["workers"]), **details})


_WORKER_CODES = frozenset({"busy", "expired", "shutdown", "internal", "inference", "bad_region"})


def recovery_s(records: Sequence[OutcomeRecord], fault_end: float) -> float | None:
    """From ``fault_end`` until every device had a server answer to an image it first sent after it."""
    first: dict[str, float] = {}
    devices = {r.device_id for r in records}
    for r in records:
        if r.status == "server" and r.sent_at is not None and r.sent_at >= fault_end:
            first[r.device_id] = min(first.get(r.device_id, math.inf), r.done_at)
    if not devices or set(first) != devices:
        return None
    return max(first.values()) - fault_end


# ---- scenarios -----------------------------------------------------------------------------------
async def worker_kills(run: Run) -> Row:
    """SIGKILL a serving worker every ``kill_every_s`` (or, when a worker takes longer than that to
    start here, every start-up time, so that the pool keeps its size), never the last one serving:
    that would be an outage of the pool, not a worker's death. A replacement starts at once."""
    o = run.options
    rng = random.Random(o.seed)
    every = max(o.kill_every_s, run.startup_s)
    duration = o.warmup_s + o.kills * every + o.tail_s
    fleet = asyncio.create_task(run.fleet(duration), name="fleet")
    await asyncio.sleep(o.warmup_s)
    for _ in range(o.kills):
        serving = [w for w in run.pool.alive() if run.spy.online(w)]
        while len(serving) < 2 and not fleet.done():  # a survivor must be serving
            await asyncio.sleep(0.1)
            serving = [w for w in run.pool.alive() if run.spy.online(w)]
        if fleet.done():
            break
        victim = rng.choice(serving)
        await asyncio.to_thread(run.pool.kill, victim)
        say(f"worker-kills: SIGKILL {victim} ({len(serving) - 1} others serving)")
        now = time.monotonic()
        run.faults.append((now, now))
        run.pool.start_one()  # the replacement, as a supervisor would start it
        await asyncio.sleep(every)
    return run.row(await fleet, details={"workers_started": len(run.pool.procs), "kill_every_s": round(every, 1)})


async def _broker_away(run: Run, outages: Sequence[float]) -> Row:
    o = run.options
    duration = o.warmup_s + sum(outages) + len(outages) * o.gap_s + o.tail_s
    fleet = asyncio.create_task(run.fleet(duration), name="fleet")
    await asyncio.sleep(o.warmup_s)
    for away in outages:
        start = time.monotonic()
        await asyncio.to_thread(run.broker.stop)
        await asyncio.sleep(away)
        await asyncio.to_thread(run.broker.start)  # the same port
        say(f"broker back after {time.monotonic() - start:.1f} s")
        run.faults.append((start, time.monotonic()))
        await asyncio.sleep(o.gap_s)
    return run.row(await fleet, details={"outages_s": list(outages)})


async def broker_restarts(run: Run) -> Row:
    return await _broker_away(run, run.options.restarts)


async def broker_outage(run: Run) -> Row:
    return await _broker_away(run, (run.options.outage_s,))


async def hostile(run: Run) -> Row:
    import hostile_corpus as hc  # bench/hostile_corpus.py (the worker hardening's corpus)

    o = run.options
    size = run.edge.preprocess.input_size
    patch = run.edge.model.patch_embed.patch_size
    corpus = hc.Corpus(model=model_id(run.cfg.models.server, run.cfg.models.model_id), device="evil-0000",
                       victim=f"{run.name[:6]}cam-0000",
                       geometry=hc.Geometry(size, patch[0] if isinstance(patch, tuple) else int(patch)))
    messages = list(corpus.messages(o.hostile_count))
    duration = o.warmup_s + o.hostile_count / o.hostile_rate + o.tail_s
    fleet = asyncio.create_task(run.fleet(duration), name="fleet")
    await asyncio.sleep(o.warmup_s)
    start = time.monotonic()
    say(f"hostile: sending {len(messages)} messages of {len(corpus.kinds)} kinds")
    acked = await asyncio.to_thread(hc.send, messages, "127.0.0.1", run.broker.port, client_id="evil-0000",
                                    rate_hz=o.hostile_rate)
    say(f"hostile: {acked} acknowledged")
    run.faults.append((start, time.monotonic()))
    return run.row(await fleet, details={"hostile_sent": acked, "hostile_kinds": len(corpus.kinds),
                                         "expected_codes": dict(hc.expected_counts(messages))})


async def overload(run: Run) -> Row:
    o = run.options
    duration = o.warmup_s + o.overload_s + o.tail_s
    base = asyncio.create_task(run.fleet(duration), name="fleet")
    await asyncio.sleep(o.warmup_s)
    start = time.monotonic()
    # a deep window, so that the surge's devices keep sending at their rate however slow the answers
    extra = await run.fleet(o.overload_s, rate_hz=o.overload * run.capacity / o.devices, prefix="surge",
                            max_in_flight=256)
    run.faults.append((start, time.monotonic()))
    result = await base
    surge = extra.summary
    return run.row(result, details={"surge_images": surge["images"], "surge_answered": surge["replies"],
                                    "surge_errors_by_code": surge["errors_by_code"],
                                    "surge_latency_ms": surge["latency_ms"]})


SCENARIOS: dict[str, Callable[[Run], Awaitable[Row]]] = {
    "worker-kills": worker_kills, "broker-restarts": broker_restarts, "broker-outage": broker_outage,
    "hostile": hostile, "overload": overload,
}


# ---- capacity and one scenario end to end --------------------------------------------------------
async def measure_capacity(run: Run) -> float:
    """Replies/s of the pool with every device sending as fast as replies allow."""
    result = await run.fleet(run.options.probe_s, rate_hz=0.0, prefix="probe", max_in_flight=16)
    s = result.summary
    return float(s["replies"] / s["wall_s"]) if s["wall_s"] else 0.0


async def run_scenario(name: str, options: Options, cfg: Config, edge: LoadedModel, dataset: Dataset,
                       logdir: Path) -> Row:
    group = f"{name[:6]}{os.getpid() % 10000}"
    with BrokerProcess(port=0, template=LOCAL_CONF) as broker:
        cfg = replace(cfg, broker=replace(cfg.broker, host="127.0.0.1", port=broker.port))
        pool = Pool(broker.port, cfg, group, logdir, options)
        _CLEANUP[:] = [broker.stop, pool.stop]
        spy = Availabilities(cfg, f"{group}-spy")
        run = Run(name, options, cfg, broker, pool, spy, edge, dataset)
        try:
            async with asyncio.TaskGroup() as tg:
                spy_task = tg.create_task(spy.transport.run(), name="spy")
                await spy.transport.wait_connected()
                await spy.transport.subscribe(V1.availability_filter("worker"))
                started = time.monotonic()
                first = [pool.start_one() for _ in range(options.workers)]
                await spy.wait_online(first, pool)
                run.startup_s = time.monotonic() - started
                say(f"{name}: {len(first)} workers serving after {run.startup_s:.1f} s")
                run.capacity = options.capacity or await measure_capacity(run)
                say(f"{name}: capacity {run.capacity:.0f} replies/s; offering {run.rate_hz * options.devices:.0f}/s")
                try:
                    row = await SCENARIOS[name](run)
                finally:
                    await asyncio.to_thread(pool.stop)
                    spy_task.cancel()
        finally:
            await asyncio.to_thread(pool.stop)
    return row


def build_config(options: Options) -> Config:
    base: dict[str, dict[str, Any]] = {
        "gate": {"threshold": 0.0},
        "edge": {"devices": options.devices, "publish_outcomes": False, "measure_full_bytes": False},
        "logging": {"format": "json", "level": "error"}}
    for section, values in options.overrides.items():
        base.setdefault(section, {}).update(values)
    return load_config(options.config, overrides=base)


async def run_all(names: Sequence[str], options: Options, *, logdir: Path | None = None) -> list[Row]:
    from edge_node.fleet import load_edge
    from shared import datasets
    from shared.logs import configure

    cfg = build_config(options)
    configure(cfg.logging.format, cfg.logging.level)
    edge = await asyncio.to_thread(load_edge, cfg)
    dataset = await asyncio.to_thread(datasets.load, cfg.edge.source)
    rows = []
    with tempfile.TemporaryDirectory(prefix="patchcast-faults-") as tmp:
        for name in names:
            if name == "shared-session":
                rows.append(await asyncio.to_thread(shared_session_probe))
                continue
            rows.append(await run_scenario(name, options, cfg, edge, dataset, logdir or Path(tmp)))
    return rows


# ---- persistent sessions in a shared subscription ------------------------------------------------
_MEMBER = r'''
import sys, paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
port, cid, persistent = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5, manual_ack=True)
c.on_message = lambda client, userdata, m: print(m.payload.decode(), flush=True)  # never acknowledged
props = Properties(PacketTypes.CONNECT)
props.SessionExpiryInterval = 300 if persistent else 0
c.connect("127.0.0.1", port, clean_start=not persistent, properties=props)
c.subscribe("$share/g/req/#", qos=1)
c.loop_forever()
'''


def shared_session_probe(n: int = 40) -> Row:
    """Two members of ``$share/g/req/#`` (QoS 1); member A holds its messages unacknowledged and is
    SIGKILLed; ``n`` more are published; A comes back under the same client id. Where do A's
    unacknowledged messages, and the ones published while it is dead, go?"""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    figures: dict[str, Any] = {}
    for persistent in (False, True):
        with BrokerProcess(port=0, template=LOCAL_CONF) as broker:
            got_b: list[str] = []
            b = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="B", protocol=mqtt.MQTTv5)
            b.on_message = lambda client, userdata, m, got=got_b: got.append(m.payload.decode())
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 300 if persistent else 0
            b.connect("127.0.0.1", broker.port, clean_start=not persistent, properties=props)
            b.subscribe("$share/g/req/#", qos=1)
            b.loop_start()

            member_cmd = [sys.executable, "-c", _MEMBER, str(broker.port), "A", str(int(persistent))]

            def member(cmd: list[str] = member_cmd) -> subprocess.Popen[str]:
                return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

            a = member()
            time.sleep(1.5)
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="P", protocol=mqtt.MQTTv5)
            pub.connect("127.0.0.1", broker.port)
            pub.loop_start()
            for i in range(n):
                pub.publish("req/x", f"{i}", qos=1).wait_for_publish(5)
            time.sleep(0.5)
            a.send_signal(signal.SIGKILL)
            held = [int(x) for x in a.communicate()[0].split()]
            for i in range(n, 2 * n):
                pub.publish("req/x", f"{i}", qos=1).wait_for_publish(5)
            time.sleep(1.0)
            b_after = sum(int(x) >= n for x in got_b)
            redelivered = len(set(held) & {int(x) for x in got_b})
            a = member()  # A returns under the same client id
            time.sleep(2.0)
            a.send_signal(signal.SIGKILL)
            back = [int(x) for x in a.communicate()[0].split()]
            pub.loop_stop()
            b.loop_stop()
            figures["persistent" if persistent else "clean"] = {
                "held_by_killed_member": len(held), "of_those_redelivered_to_survivor": redelivered,
                "sent_after_kill": n, "of_those_to_survivor": b_after,
                "delivered_to_returning_member": len(back)}
    clean, kept = figures["clean"], figures["persistent"]
    lost = n - kept["of_those_to_survivor"]
    return Row(scenario="shared-session", faults=1, images=2 * n, answered=0, fallbacks=0, deadline=0, refused=0,
               duplicates_to_app=0, lost=lost, recover_s=None, p95_ms=None, retries=0, replies_duplicate=0,
               replies_late=0, worker_exits=0, offered_per_s=0.0, capacity=0.0, wall_s=0.0,
               details={"clean": clean, "persistent": kept})


# ---- output --------------------------------------------------------------------------------------
COLUMNS = [("scenario", 16), ("faults", 6), ("images", 7), ("answered", 8), ("fallbacks", 9), ("deadline", 8),
           ("refused", 7), ("dup→app", 7), ("lost", 5), ("recover", 8), ("p95 ms", 7), ("retries", 7),
           ("dup/late", 8), ("exits", 5)]


def format_rows(rows: Sequence[Row]) -> str:
    def cells(r: Row) -> list[str]:
        return [r.scenario, str(r.faults), str(r.images), str(r.answered), str(r.fallbacks), str(r.deadline),
                str(r.refused), str(r.duplicates_to_app), str(r.lost),
                "—" if r.recover_s is None else f"{r.recover_s:.1f} s", "—" if r.p95_ms is None else f"{r.p95_ms:.0f}",
                str(r.retries), f"{r.replies_duplicate}/{r.replies_late}", str(r.worker_exits)]

    lines = ["  ".join(name.rjust(w) if i else name.ljust(w) for i, (name, w) in enumerate(COLUMNS))]
    for r in rows:
        if r.scenario == "shared-session":
            continue
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, (_n, w)) in enumerate(zip(cells(r), COLUMNS,
                                                                                                   strict=True))))
    for r in rows:
        if r.scenario == "shared-session":
            c, p = r.details["clean"], r.details["persistent"]
            lines.append(
                f"shared-session: a SIGKILLed member held {c['held_by_killed_member']} (clean) / "
                f"{p['held_by_killed_member']} (persistent) unacknowledged messages; redelivered to the survivor: "
                f"{c['of_those_redelivered_to_survivor']} / {p['of_those_redelivered_to_survivor']}; of "
                f"{c['sent_after_kill']} published after the kill the survivor got {c['of_those_to_survivor']} / "
                f"{p['of_those_to_survivor']} (the rest queued for the dead session); the member back under its "
                f"client id got {c['delivered_to_returning_member']} / {p['delivered_to_returning_member']}")
    capacity = {r.capacity for r in rows if r.capacity}
    if capacity:
        lines.append("capacity (replies/s, measured per scenario): "
                     + ", ".join(f"{r.scenario} {r.capacity:.0f}, offered {r.offered_per_s:.0f}"
                                 for r in rows if r.capacity))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", action="append", choices=[*SCENARIOS, "shared-session"],
                    help="run this scenario (repeatable; default: worker-kills, broker-restarts, broker-outage, "
                    "hostile where bench/hostile_corpus.py exists, shared-session)")
    ap.add_argument("--config", help="PatchCast config file (models, source, delivery settings)")
    ap.add_argument("--workers", type=int, default=Options.workers)
    ap.add_argument("--devices", type=int, default=Options.devices)
    ap.add_argument("--load", type=float, default=Options.load, help="offered load, × the measured capacity")
    ap.add_argument("--capacity", type=float, default=0.0, help="replies/s of the pool (0: measure it first)")
    ap.add_argument("--kills", type=int, default=Options.kills)
    ap.add_argument("--kill-every", type=float, default=Options.kill_every_s)
    ap.add_argument("--outage", type=float, default=Options.outage_s, help="broker-outage: seconds away")
    ap.add_argument("--hostile-count", type=int, default=Options.hostile_count)
    ap.add_argument("--overload", type=float, default=Options.overload,
                    help="overload: the surge fleet's load, × the capacity, on top of --load")
    ap.add_argument("--edge-model", help="models.edge")
    ap.add_argument("--server-model", help="models.server")
    ap.add_argument("--source", help="edge.source")
    ap.add_argument("--worker-arg", action="append", default=[], help="a 'patchcast worker' argument, as "
                    "--worker-arg=--threads --worker-arg=2 (repeatable; default: --threads 1)")
    ap.add_argument("--json", type=Path, help="also write every row, with details, to this file")
    ap.add_argument("--logs", type=Path, help="keep the workers' logs in this folder")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)  # the broker runs in its own session: stop it too
    names = args.scenario or [n for n in ("worker-kills", "broker-restarts", "broker-outage", "hostile",
                                          "shared-session") if n != "hostile" or (REPO / "bench" /
                                                                                  "hostile_corpus.py").exists()]
    overrides: dict[str, dict[str, Any]] = {"models": {}, "edge": {}}
    if args.edge_model:
        overrides["models"]["edge"] = args.edge_model
    if args.server_model:
        overrides["models"]["server"] = args.server_model
    if args.source:
        overrides["edge"]["source"] = args.source
    options = Options(workers=args.workers, devices=args.devices, load=args.load, capacity=args.capacity,
                      kills=args.kills, kill_every_s=args.kill_every, outage_s=args.outage,
                      hostile_count=args.hostile_count, overload=args.overload, config=args.config,
                      overrides=overrides,
                      worker_args=tuple(args.worker_arg) or Options.worker_args)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    rows = asyncio.run(run_all(names, options, logdir=args.logs))
    print(format_rows(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    bad = [r.scenario for r in rows if r.scenario != "shared-session" and (r.lost or r.duplicates_to_app)]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
