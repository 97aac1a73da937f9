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

Deadlines (admission): a request may carry a deadline (``time.monotonic``). With ``admission`` on,
:meth:`Batcher.submit_nowait` refuses at once (``BusyError``) a request that the work queued ahead
of it cannot let finish by then, judged by :class:`ServiceEstimate`, a running fit of batch time
against batch tokens; and a request whose deadline passes while it waits is failed with code
``expired`` when its batch forms or just before the batch runs: no forward pass is spent on it.
"""

from __future__ import annotations

import asyncio
import collections
import math
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


class ServiceEstimate:
    """A running estimate of one batch's run time as ``fixed + per_token × tokens``.

    An exponentially weighted least-squares fit over the batches run so far (each new batch weighs
    ``alpha``), so it follows the machine's current speed (other load, thermal limits) within some
    tens of batches. Where the batches seen so far barely differ in size the fit is a plain ratio
    (time per token), which overestimates larger batches: admission then errs on refusing.
    ``None`` until a first batch has run.
    """

    def __init__(self, alpha: float = 0.1) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.batches = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def add(self, tokens: int, run_s: float) -> None:
        if tokens <= 0 or not math.isfinite(run_s) or run_s < 0:
            return
        keep, a = 1.0 - self.alpha, self.alpha
        x, y = float(tokens), run_s
        self._w = keep * self._w + a
        self._x = keep * self._x + a * x
        self._y = keep * self._y + a * y
        self._xx = keep * self._xx + a * x * x
        self._xy = keep * self._xy + a * x * y
        self.batches += 1

    def coefficients(self) -> tuple[float, float] | None:
        """``(fixed_s, per_token_s)``, both ≥ 0; ``None`` before the first batch."""
        if self.batches == 0:
            return None
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var > (0.05 * mx) ** 2:
            slope = (self._xy / self._w - mx * my) / var
            fixed = my - slope * mx
            if slope >= 0.0 and fixed >= 0.0:
                return fixed, slope
        return 0.0, my / mx

    def batch_s(self, tokens: int) -> float:
        coef = self.coefficients()
        return 0.0 if coef is None else coef[0] + coef[1] * tokens


class Batcher(Generic[ItemT, ResultT]):
    """Bounded queue + batch former + one-batch-at-a-time executor loop. Run :meth:`run` as a task."""

    def __init__(self, run_batch: BatchFunction[ItemT, ResultT], limits: BatchingConfig, *,
                 capacity: int, executor: Executor | None = None,
                 on_batch: Callable[[BatchReport], None] | None = None, admission: bool = False) -> None:
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
        self.admission = admission
        self.estimate = ServiceEstimate()
        self._tokens = 0  # tokens of the requests waiting (queue, carry, the batch being formed)
        self._executing: tuple[float, int] | None = None  # (started, tokens) of the batch in the executor

    # ---- intake ------------------------------------------------------------------------------
    def submit_nowait(self, item: ItemT, tokens: int, *,
                      deadline: float | None = None) -> asyncio.Future[ResultT]:
        """Queue ``item`` (``tokens`` tokens, CLS included); :class:`BusyError` when full, or (with
        admission) when the queue ahead cannot let it finish by ``deadline`` (monotonic)."""
        if len(self._queue) >= self.capacity:
            raise BusyError(f"request queue full ({self.capacity} waiting)")
        if self.admission and deadline is not None:
            now = time.monotonic()
            done = self.completion_estimate(tokens, now)
            if done > deadline:
                raise BusyError(f"deadline cannot be met: {self.depth} requests queued ahead, done in about "
                                f"{(done - now) * 1000.0:.0f} ms, deadline in {(deadline - now) * 1000.0:.0f} ms")
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._queue.append(Pending(item, tokens, future, deadline=deadline))
        self._tokens += tokens
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

    def completion_estimate(self, tokens: int, now: float | None = None) -> float:
        """When (monotonic) a request of ``tokens`` tokens submitted now would have its result: the
        rest of the running batch, then the batches that the waiting requests and it make (at
        ``max_batch`` requests or ``max_tokens`` tokens each, the way batches form), each at the
        running estimate, plus one batching delay. ``now`` while no batch has run yet (nothing to go by)."""
        now = time.monotonic() if now is None else now
        coef = self.estimate.coefficients()
        if coef is None:
            return now
        fixed, per_token = coef
        rest = 0.0
        if self._executing is not None:
            started, running_tokens = self._executing
            rest = max(0.0, fixed + per_token * running_tokens - (now - started))
        total = self._tokens + tokens
        batches = max(math.ceil((self.depth + 1) / self.limits.max_batch), math.ceil(total / self.limits.max_tokens))
        return now + rest + batches * fixed + per_token * total + self.limits.max_delay_ms / 1000.0

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

    def _expire(self, pending: Pending[ItemT, ResultT], now: float, finish: float | None = None) -> bool:
        """True (and the request leaves the waiting set) when its owner cancelled it or its deadline
        passed, or will have passed at ``finish`` (its batch's estimated end): nobody would wait for its
        answer, so no forward pass is spent on it."""
        if pending.future.done():  # cancelled by its owner
            self._tokens -= pending.tokens
            return True
        if pending.deadline is not None and max(now, finish or now) > pending.deadline:
            self._tokens -= pending.tokens
            why = "deadline passed while queued" if now > pending.deadline else "deadline passes before its batch ends"
            pending.future.set_exception(PatchCastError(why, code="expired"))
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
        # The batch formed over up to max_delay_ms: a request whose deadline passed meanwhile, or passes
        # before the batch would end, is dropped.
        finish = started + self.estimate.batch_s(sum(p.tokens for p in batch)) if self.admission else None
        live = [p for p in batch if not self._expire(p, started, finish)]
        self._tokens -= sum(p.tokens for p in live)
        if not live:
            return
        batch = live
        items = [p.item for p in batch]
        failed = False
        tokens = sum(p.tokens for p in batch)
        self._executing = (started, tokens)
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
        self._executing = None
        self.busy_s += run_s
        if not failed:
            self.estimate.add(tokens, run_s)
        if self.on_batch is not None:
            self.on_batch(BatchReport(size=len(batch), tokens=tokens, run_s=run_s,
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
        self._tokens = 0
        for p in waiting:
            if not p.future.done():
                p.future.set_exception(error)
        self._idle.set()
        return len(waiting)
