"""ProcessPool supervision with stand-in worker processes: drain, kill after the bound, rate-limited
restarts, no orphans. (The real ``patchcast worker`` is exercised by the scaling and demo tests.)"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from waiting import wait_until_async

from patchcast.scaling.backends import ComposeBackend, ProcessPool
from shared.config import ScalerConfig

# A stand-in worker: writes its id, exits 0 on SIGTERM after a short "drain" (or ignores it).
WORKER = r"""
import os, signal, sys, time
mode = sys.argv[1]
out = sys.argv[2]
with open(os.path.join(out, os.environ["PATCHCAST_WORKER__WORKER_ID"] + "." + str(os.getpid())), "w") as f:
    f.write("up")
if mode == "crash":
    time.sleep(0.1)  # not a wait: a worker that crashes shortly after its start
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(0.05)  # not a wait: a worker idling until it is signalled
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): look at its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def pool_for(mode: str, tmp_path: Path, **cfg: Any) -> ProcessPool:
    script = tmp_path / "fake_worker.py"
    script.write_text(WORKER)
    return ProcessPool(ScalerConfig(**cfg), argv=[sys.executable, str(script), mode, str(tmp_path)],
                       log_dir=tmp_path / "logs", poll_s=0.05)


async def _scale_up_down_drains_with_sigterm(tmp_path: Path) -> None:
    pool = pool_for("graceful", tmp_path, drain_timeout_s=5.0)
    await pool.scale_to(3)
    pids = pool.pids()
    assert len(pids) == 3 and [m.worker_id for m in pool.members()] == ["worker-1", "worker-2", "worker-3"]
    await wait_until_async(lambda: len(list(tmp_path.glob("worker-*.*"))) == 3, 10, message="three workers started")
    t0 = time.monotonic()
    await pool.scale_to(1)
    await pool.shutdown()
    assert time.monotonic() - t0 < 4.0  # graceful: no kill timeout involved
    assert pool.kills_total == 0
    assert not any(alive(p) for p in pids)
    assert (tmp_path / "logs" / "worker-1.log").exists()


async def _stubborn_worker_killed_after_bound(tmp_path: Path) -> None:
    pool = pool_for("stubborn", tmp_path, drain_timeout_s=0.5)
    await pool.scale_to(1)
    pid = pool.pids()[0]
    await wait_until_async(lambda: any(tmp_path.glob("worker-1.*")), 10, message="worker-1 started")
    t0 = time.monotonic()
    await pool.shutdown()
    took = time.monotonic() - t0
    assert 0.4 < took < 3.0
    assert pool.kills_total == 1 and not alive(pid)


async def _crashes_restart_with_rate_limit(tmp_path: Path) -> None:
    pool = pool_for("crash", tmp_path, restart_max=2, restart_window_s=30.0, restart_backoff_s=0.1)
    await pool.scale_to(1)
    runner = asyncio.create_task(pool.run(), name="pool-run")
    try:
        await wait_until_async(lambda: pool.crashes_total == 3, 10, message="three crashes")
        await asyncio.sleep(0.5)  # not a wait: time for a 4th start (0.1 s backoff) if the rate limit failed
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await pool.shutdown()
    starts = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("worker-1."))  # noqa: ASYNC240
    # First start + restart_max restarts, then the slot waits for the window to move on.
    assert len(starts) == 3, starts
    assert pool.restarts_total == 2 and pool.crashes_total == 3


async def _shutdown_while_running_leaves_no_orphans(tmp_path: Path) -> None:
    pool = pool_for("graceful", tmp_path)
    await pool.scale_to(2)
    runner = asyncio.create_task(pool.run(), name="pool-run")
    pids = pool.pids()
    await wait_until_async(lambda: len(list(tmp_path.glob("worker-*.*"))) == 2, 10, message="both workers running")
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await pool.shutdown()
    assert pids and not any(alive(p) for p in pids)
    assert pool.members() == ()


def test_compose_command():
    backend = ComposeBackend(ScalerConfig(compose_file="compose.yaml", compose_project="pc"))
    assert backend.command(4) == ["docker", "compose", "-f", "compose.yaml", "-p", "pc", "up", "-d",
                                  "--no-recreate", "--no-deps", "--scale", "worker=4", "worker"]


def test_scale_up_down_drains_with_sigterm(tmp_path: Path):
    asyncio.run(_scale_up_down_drains_with_sigterm(tmp_path))


def test_stubborn_worker_killed_after_bound(tmp_path: Path):
    asyncio.run(_stubborn_worker_killed_after_bound(tmp_path))


def test_crashes_restart_with_rate_limit(tmp_path: Path):
    asyncio.run(_crashes_restart_with_rate_limit(tmp_path))


def test_shutdown_while_running_leaves_no_orphans(tmp_path: Path):
    asyncio.run(_shutdown_while_running_leaves_no_orphans(tmp_path))


async def _drained_worker_gets_short_exit_grace(tmp_path: Path) -> None:
    # A worker that said "offline" (drained) but hangs on exit is killed after EXIT_AFTER_OFFLINE_S,
    # not after the whole drain bound.
    from patchcast.scaling import backends

    pool = pool_for("stubborn", tmp_path, drain_timeout_s=30.0)
    await pool.scale_to(1)
    pid = pool.pids()[0]
    await wait_until_async(lambda: any(tmp_path.glob("worker-1.*")), 10, message="worker-1 started")
    t0 = time.monotonic()
    shutdown = asyncio.create_task(pool.shutdown())
    await wait_until_async(lambda: "worker-1" in pool._draining_slots, 10,  # signalled: 'offline' now means drained
                           message="worker-1 signalled to drain")
    pool.note_offline("worker-1")
    await shutdown
    took = time.monotonic() - t0
    assert took < backends.EXIT_AFTER_OFFLINE_S + 2.0
    assert pool.kills_total == 1 and not alive(pid)


def test_drained_worker_gets_short_exit_grace(tmp_path: Path):
    asyncio.run(_drained_worker_gets_short_exit_grace(tmp_path))
