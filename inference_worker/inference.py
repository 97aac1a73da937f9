"""The inference thread's side of the worker: one batch of validated requests in, one answer each out.

Every torch kernel of a worker runs on one thread (:func:`inference_pool`); :class:`BatchInference`
is what the batcher calls there. It waits for each request's pixels, builds what the model sees
(its patches, or a region fused with its glance), runs the engine once for the batch, and turns the
probabilities into top-k predictions; a glance too uncertain to answer gets the window to ask for.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool as BrokenExecutor

import numpy as np
import torch

from inference_worker.engine import PatchSet, ServerEngine
from inference_worker.engine_process import EngineClient, EngineProcess
from inference_worker.work import Prediction, WorkItem
from shared.config import RegionConfig
from shared.errors import InferenceError, PatchCastError, ProtocolError
from shared.region import centre_window, choose_window, fuse, hybrid_patches, window_side

TOPK = 5
DECODE_TIMEOUT_S = 30.0  # a batch waits at most this long for one request's pixels


class BatchInference:
    """The batcher's batch function: the worker's engine and region settings, nothing of the event loop."""

    def __init__(self, engine: ServerEngine | EngineProcess | EngineClient, region: RegionConfig) -> None:
        self.engine = engine
        self.region = region

    def __call__(self, items: Sequence[WorkItem]) -> list[Prediction | PatchCastError]:
        """One answer per item, in order: a prediction, or the error that item alone met (a bad
        payload, a decoder that died); an :class:`InferenceError` of the engine fails the whole batch."""
        started = time.monotonic()
        results: list[Prediction | PatchCastError | None] = [None] * len(items)
        sets: list[PatchSet] = []
        positions: list[int] = []
        for i, item in enumerate(items):
            try:
                sets.append(self._patch_set(item, item.pixels.result(timeout=DECODE_TIMEOUT_S)))
                positions.append(i)
            except ProtocolError as exc:  # one bad payload fails its request only
                results[i] = exc
            except (BrokenExecutor, TimeoutError, CancelledError) as exc:  # so does a decoder that died or hung
                results[i] = InferenceError(f"pixel decoding failed: {type(exc).__name__}: {exc}")
        if sets:
            glances = [row for row, i in enumerate(positions) if items[i].offers_region]
            # the server's attention, for the windows it places
            maps: list[np.ndarray] | None = [] if glances and self.region.placement == "attention" else None
            t0 = time.perf_counter()
            logits = self.engine.logits_checked(sets, maps)  # InferenceError fails the whole batch
            infer_ms = (time.perf_counter() - t0) * 1000.0
            probs = torch.softmax(logits, dim=-1)
            for row, i in enumerate(positions):
                exchange = items[i].exchange
                if exchange is not None and exchange.first_indices is None:  # a region: fused with its glance
                    fused = fuse(exchange.global_probs, probs[row].numpy(), self.region.fusion)
                    probs[row] = torch.from_numpy(fused.astype(np.float32))
            k = min(TOPK, probs.shape[-1])
            top_p, top_i = probs.topk(k, dim=-1)
            to_global = self.engine.loaded.global_class  # an expert's outputs → global class ids
            # Python lists once per batch: indexing tensors element by element costs ~5 µs a value.
            for i, row_ids, row_probs in zip(positions, top_i.tolist(), top_p.tolist(), strict=True):
                ids = tuple(to_global(v) for v in row_ids)
                results[i] = Prediction(label=ids[0], topk_ids=ids, topk_probs=tuple(row_probs),
                                        batch_started=started, infer_ms=infer_ms, batch_size=len(sets))
            if glances:
                self._windows(items, positions, glances, probs, maps, results)
            self._top_ups(items, positions, probs, results)
        return [r if r is not None else PatchCastError("no result", code="internal") for r in results]

    def _patch_set(self, item: WorkItem, pixels: np.ndarray) -> PatchSet:
        """What the model sees for one request: its patches, or for a region under ``image`` fusion the
        glance's upsampled patches with the window's full-resolution ones in place."""
        exchange = item.exchange
        if exchange is not None and exchange.first_indices is not None and exchange.global_patches is not None:
            # a top-up: the first request's patches and the asked-for ones, in grid order
            indices = np.concatenate([exchange.first_indices, item.indices])
            order = np.argsort(indices, kind="stable")
            return PatchSet(np.concatenate([exchange.global_patches, pixels])[order], indices[order])
        if exchange is None or self.region.fusion == "probs" or exchange.global_patches is None:
            return PatchSet(pixels, item.indices)
        fused = hybrid_patches(exchange.global_patches, pixels, item.indices)
        return PatchSet(fused, np.arange(self.engine.num_patches, dtype=np.int64))

    def _windows(self, items: Sequence[WorkItem], positions: list[int], glances: list[int], probs: torch.Tensor,
                 maps: list[np.ndarray] | None, results: list[Prediction | PatchCastError | None]) -> None:
        """For each glance too uncertain to answer (min-entropy ≥ region.threshold): the window to ask the
        device for (where the server's attention sums highest, or the centre) and what the exchange keeps."""
        grid = self.engine.input_size // self.engine.patch_size
        side = window_side(grid, self.region.side)
        centre = centre_window((grid, grid), side)
        for row in glances:
            i = positions[row]
            uncertainty = float(-torch.log2(probs[row].max().clamp_min(1e-12)))
            prediction = results[i]
            if uncertainty < self.region.threshold or not isinstance(prediction, Prediction):
                continue
            keep_pixels = self.region.fusion != "probs"
            results[i] = dataclasses.replace(
                prediction, window=centre if maps is None else choose_window(maps[row], (grid, grid), side),
                uncertainty=uncertainty,
                probs=probs[row].numpy().copy(),
                global_patches=items[i].pixels.result() if keep_pixels else None)

    def _top_ups(self, items: Sequence[WorkItem], positions: list[int], probs: torch.Tensor,
                 results: list[Prediction | PatchCastError | None]) -> None:
        """For each request that offers more patches and whose answer is too uncertain (min-entropy ≥
        region.top_up_threshold): ask for the offered patches it lacks, keeping its own for the answer."""
        for row, i in enumerate(positions):
            item, prediction = items[i], results[i]
            if item.offer is None or not item.offer.size or not isinstance(prediction, Prediction):
                continue
            uncertainty = float(-torch.log2(probs[row].max().clamp_min(1e-12)))
            if uncertainty < self.region.top_up_threshold:
                continue
            results[i] = dataclasses.replace(
                prediction, window=item.offer, uncertainty=uncertainty, probs=probs[row].numpy().copy(),
                global_patches=item.pixels.result(), first_indices=item.indices)


def inference_pool() -> ThreadPoolExecutor:
    """The worker's single inference thread.

    Every torch kernel of the worker (loading, the precision probe, the bf16 weight copy, every
    batch) runs on this one thread. Why: each thread that runs a parallel torch op keeps its own
    OpenMP team for as long as it lives, and once a process holds more OpenMP threads than cores,
    libgomp makes its threads sleep at every barrier instead of spinning briefly. A packed DeiT-Base
    forward on a 2-core AMX Xeon ran ~1.2× slower on a thread when another thread had built the
    model (docs/benchmarks.md).
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")
