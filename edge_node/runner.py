"""One edge model shared by every simulated device of a process, batched across devices.

Devices ``await runner.infer(sample)``; the runner collects images into a batch (up to
``edge.batch_size`` images, or ``edge.batch_delay_ms`` after the first) and runs it in its single
executor thread, so the event loop that carries all devices' MQTT traffic never runs the model.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from edge_node.engine import EdgeDecision, EdgeEngine
from shared.datasets import Sample
from shared.errors import DatasetError, PatchCastError


@dataclass(eq=False)
class _Job:
    sample: Sample
    future: asyncio.Future[EdgeDecision]
    arrived: float = field(default_factory=time.monotonic)


class EdgeRunner:
    def __init__(self, engine: EdgeEngine, *, batch_size: int, batch_delay_ms: float) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.batch_delay_s = batch_delay_ms / 1000.0
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-model")
        self.batches = 0
        self.images = 0

    async def infer(self, sample: Sample) -> EdgeDecision:
        future: asyncio.Future[EdgeDecision] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait(_Job(sample, future))
        return await future

    async def _collect(self) -> list[_Job]:
        first = await self._jobs.get()
        jobs = [first]
        close_at = first.arrived + self.batch_delay_s
        while len(jobs) < self.batch_size:
            if self._jobs.empty():
                remaining = close_at - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        jobs.append(await self._jobs.get())
                except TimeoutError:
                    break
            else:
                jobs.append(self._jobs.get_nowait())
        return [j for j in jobs if not j.future.done()]

    def _run(self, samples: list[Sample]) -> list[EdgeDecision | PatchCastError]:
        try:
            return list(self.engine.run(samples))
        except DatasetError:
            # One undecodable image must not fail its batch-mates: retry them one by one.
            results: list[EdgeDecision | PatchCastError] = []
            for s in samples:
                try:
                    results.extend(self.engine.run([s]))
                except DatasetError as exc:
                    results.append(exc)
            return results

    async def run(self) -> None:
        """Batch and run until cancelled."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                jobs = await self._collect()
                if not jobs:
                    continue
                try:
                    results = await loop.run_in_executor(self._pool, self._run, [j.sample for j in jobs])
                except Exception as exc:  # a model failure fails this batch's images, not the fleet
                    for j in jobs:
                        if not j.future.done():
                            j.future.set_exception(PatchCastError(f"edge model failed: {exc}", code="edge_model"))
                    continue
                self.batches += 1
                self.images += len(jobs)
                for j, r in zip(jobs, results, strict=True):
                    if j.future.done():
                        continue
                    if isinstance(r, PatchCastError):
                        j.future.set_exception(r)
                    else:
                        j.future.set_result(r)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
