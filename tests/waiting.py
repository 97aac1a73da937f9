"""Waiting for an event with a deadline, for tests that talk to other processes or tasks.

A test must not sleep a fixed time standing for "the other side is ready": on a loaded machine the
time is too short (a flaky failure) and on an idle one too long (a slow suite). These helpers poll
a predicate until it holds, and fail with ``message`` when ``timeout`` seconds pass first.
Importable from every test folder (``pythonpath = ["tests"]`` in the pytest configuration).

The predicate may itself assert (e.g. "the worker process is still running"): its AssertionError
ends the wait at once. A sleep that remains in a test and is not such a wait (pacing a load, a
sampling period, a stand-in model's run time, a negative check) says so: ``# not a wait: <why>``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05,
               message: str = "condition", *, fail: bool = True) -> bool:
    """Return True once ``predicate()`` is truthy; raise ``AssertionError`` after ``timeout`` seconds.

    ``fail=False`` makes the timeout a bounded grace period instead: the wait then returns False,
    for a caller that checks (or reports) what was still missing itself."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            if not fail:
                return False
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)
    return True


async def wait_until_async(predicate: Callable[[], object | Awaitable[object]], timeout: float,  # noqa: ASYNC109
                           interval: float = 0.05, message: str = "condition", *, fail: bool = True) -> bool:
    """:func:`wait_until` for the event loop: ``predicate`` may be a plain or an async callable, and
    the loop runs other tasks between the polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return True
        if time.monotonic() >= deadline:
            if not fail:
                return False
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        await asyncio.sleep(interval)
