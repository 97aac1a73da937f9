"""Dynamic batching: collect requests into batches and run each batch off the event loop.

A batch closes at ``max_batch`` requests, ``max_tokens`` tokens, or ``max_delay_ms`` after the
arrival of its first request — whichever comes first (``time.monotonic``; the remaining wait is
recomputed on every loop). A request that would push the batch past ``max_tokens`` is carried over
as the first request of the next batch, so a batch never exceeds the budget unless one request
alone does.

One batch runs at a time, in the executor the caller provides (the worker's single inference
thread); while it runs, new requests queue up and form the next batch. Each request has its own
future: it gets the request's result, the per-request exception the batch function returned for
it, or — when the whole batch fails — an :class:`~shared.errors.InferenceError`.

The queue is bounded: :meth:`Batcher.submit_nowait` raises :class:`~shared.errors.BusyError` when
it is full (the worker answers ``busy``); nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from shared.config import BatchingConfig
from shared.errors import BusyError, InferenceError, PatchCastError

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

BatchFunction = Callable[[Sequence[ItemT]], Sequence["ResultT | PatchCastError"]]


@dataclass(eq=False)
class Pending(Generic[ItemT, ResultT]):
    """One queued request: the caller's item, its token count, and the future for its result."""

    item: ItemT
    tokens: int
    future: asyncio.Future[ResultT]
    arrived: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # monotonic; past it the request is answered 'expired', not run


@dataclass(frozen=True)
class BatchReport:
    """What one executed batch looked like (for metrics)."""

    size: int
    tokens: int
    run_s: float  # seconds in the executor
    waits_s: tuple[float, ...]  # per request: arrival → batch start
    failed: bool


class Batcher(Generic[ItemT, ResultT]):
    """Bounded queue + batch former + one-batch-at-a-time executor loop. Run :meth:`run` as a task."""

    def __init__(self, run_batch: BatchFunction[ItemT, ResultT], limits: BatchingConfig, *,
                 capacity: int, executor: Executor | None = None,
                 on_batch: Callable[[BatchReport], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be ≥ 1")
        self.run_batch = run_batch
        self.limits = limits
        self.capacity = capacity
        self.executor = executor
        self.on_batch = on_batch
        self._queue: collections.deque[Pending[ItemT, ResultT]] = collections.deque()
        self._carry: Pending[ItemT, ResultT] | None = None
        self._forming: list[Pending[ItemT, ResultT]] = []  # the batch being collected (still waiting)
        self._draining = False
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._running = False
        self.busy_s = 0.0  # cumulative executor time, for the busy fraction

    # ---- intake ------------------------------------------------------------------------------
    def submit_nowait(self, item: ItemT, tokens: int, *,
                      deadline: float | None = None) -> asyncio.Future[ResultT]:
        """Queue ``item`` (``tokens`` tokens, CLS included); :class:`BusyError` when full."""
        if len(self._queue) >= self.capacity:
            raise BusyError(f"request queue full ({self.capacity} waiting)")
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._queue.append(Pending(item, tokens, future, deadline=deadline))
        self._idle.clear()
        self._arrived.set()
        return future

    @property
    def full(self) -> bool:
        """The next :meth:`submit_nowait` would raise :class:`BusyError`."""
        return len(self._queue) >= self.capacity

    @property
    def depth(self) -> int:
        """Requests waiting (queued or in the batch being collected; not yet running)."""
        return len(self._queue) + (self._carry is not None) + len(self._forming)

    def oldest_age_s(self, now: float | None = None) -> float:
        """Age of the oldest request still waiting for its batch to run (0 when none)."""
        candidates = self._forming[:1] + ([self._carry] if self._carry else []) + list(self._queue)[:1]
        heads = [p.arrived for p in candidates]
        return 0.0 if not heads else (time.monotonic() if now is None else now) - min(heads)

    def drain(self) -> None:
        """Shutting down: stop waiting for batch-mates; run what is queued as soon as possible."""
        self._draining = True
        self._arrived.set()

    async def wait_idle(self) -> None:
        """Until nothing is queued and no batch is running (graceful shutdown)."""
        await self._idle.wait()

    # ---- batch forming -----------------------------------------------------------------------
    async def _take(self, wait_s: float | None) -> Pending[ItemT, ResultT] | None:
        """Next waiting request, waiting at most ``wait_s`` seconds (None: forever)."""
        while not self._queue:
            self._arrived.clear()
            if wait_s is not None and (wait_s <= 0 or self._draining):
                return None
            try:
                async with asyncio.timeout(wait_s):
                    await self._arrived.wait()
            except TimeoutError:
                return None
        return self._queue.popleft()

    def _expire(self, pending: Pending[ItemT, ResultT], now: float) -> bool:
        if pending.future.done():  # cancelled by its owner
            return True
        if pending.deadline is not None and now > pending.deadline:
            # Nobody waits for this answer any more: do not spend a forward pass on it.
            pending.future.set_exception(PatchCastError("deadline passed while queued", code="expired"))
            return True
        return False

    async def next_batch(self) -> list[Pending[ItemT, ResultT]]:
        """Wait for a first request, then collect until a limit or the first request's deadline."""
        limits = self.limits
        while True:
            if not self._queue and self._carry is None:
                self._idle.set()
            first = self._carry or await self._take(None)
            self._carry = None
            assert first is not None
            if not self._expire(first, time.monotonic()):
                break
        batch, tokens = [first], first.tokens
        self._forming = batch
        close_at = first.arrived + limits.max_delay_ms / 1000.0
        try:
            while len(batch) < limits.max_batch and tokens < limits.max_tokens:
                nxt = await self._take(close_at - time.monotonic())
                if nxt is None:
                    break
                if self._expire(nxt, time.monotonic()):
                    continue
                if tokens + nxt.tokens > limits.max_tokens:
                    self._carry = nxt  # first of the next batch, keeps its own arrival time
                    break
                batch.append(nxt)
                tokens += nxt.tokens
        finally:
            self._forming = []
        return batch

    # ---- execution ---------------------------------------------------------------------------
    async def execute(self, batch: list[Pending[ItemT, ResultT]]) -> None:
        """Run one batch in the executor and settle every request's future."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        items = [p.item for p in batch]
        failed = False
        try:
            results = await loop.run_in_executor(self.executor, self.run_batch, items)
            if len(results) != len(batch):
                raise InferenceError(f"batch function returned {len(results)} results for "
                                     f"{len(batch)} requests")
        except Exception as exc:
            failed = True
            if isinstance(exc, InferenceError):
                error = exc
            else:
                error = InferenceError(f"batch of {len(batch)} failed: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
        else:
            for p, result in zip(batch, results, strict=True):
                if p.future.done():
                    continue
                if isinstance(result, BaseException):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)
        run_s = time.monotonic() - started
        self.busy_s += run_s
        if self.on_batch is not None:
            self.on_batch(BatchReport(size=len(batch), tokens=sum(p.tokens for p in batch), run_s=run_s,
                                      waits_s=tuple(started - p.arrived for p in batch), failed=failed))

    async def run(self) -> None:
        """Form and execute batches until cancelled."""
        while True:
            batch = await self.next_batch()
            self._idle.clear()
            await self.execute(batch)
            if not self._queue and self._carry is None:
                self._idle.set()

    def fail_all(self, error: PatchCastError) -> int:
        """Fail every waiting request (after the shutdown grace ran out); returns how many."""
        waiting = self._forming + ([self._carry] if self._carry else []) + list(self._queue)
        self._carry = None
        self._queue.clear()
        self._forming = []
        for p in waiting:
            if not p.future.done():
                p.future.set_exception(error)
        self._idle.set()
        return len(waiting)
