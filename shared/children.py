"""Child processes: the one place that starts and stops them (the worker pool's scaler, a fleet split
over processes, the demo, the benchmarks' load generators).

A runtime module of ``shared`` (it uses asyncio; see ``shared/__init__.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import IO


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when its parent dies (no orphan workers after a SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


async def start_child(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                      output: IO[bytes] | None = None) -> asyncio.subprocess.Process:
    """Start a supervised child: own session (a terminal's Ctrl-C reaches only its supervisor, which
    stops children in order), parent-death signal on Linux, stdout+stderr to ``output`` (or inherited)."""
    return await asyncio.create_subprocess_exec(
        *argv, env=None if env is None else dict(env), stdin=asyncio.subprocess.DEVNULL, stdout=output,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None)


async def stop_child(proc: asyncio.subprocess.Process, timeout_s: float) -> tuple[int, bool]:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Returns ``(exit code, killed)``."""
    if proc.returncode is not None:
        return proc.returncode, False
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(timeout_s):
            return await proc.wait(), False
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        return await proc.wait(), True
