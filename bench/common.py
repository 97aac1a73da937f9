"""What the benchmarks share: token-length workloads, the variant record and its timed loop, model FLOPs
and synthetic photo-like images (machine information: :mod:`shared.machine`).

torch is imported where it is used, so that a bench's parent process (and the test helpers that take
:func:`natural_image`) do not pay for it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

NUM_PATCHES = 196  # a 224² image in 16² patches
Batch = list[Any]  # one forward's inputs: token sets (tensors) or patch sets


# ---- workloads ------------------------------------------------------------------------------------

def beta_lengths(rng: np.random.Generator, n: int, a: float, b: float) -> list[int]:
    """``n`` kept-patch counts of 196, the kept fraction drawn from Beta(a, b)."""
    return [int(v) for v in np.clip(np.rint(rng.beta(a, b, n) * NUM_PATCHES), 1, NUM_PATCHES)]


def equal_lengths(lengths: Sequence[int]) -> list[int]:
    """Same request count and total real tokens, spread as evenly as integers allow."""
    n, total = len(lengths), sum(lengths)
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def make_sets(lengths: Sequence[int], dim: int, seed: int, device: str | None = None) -> list[torch.Tensor]:
    """One random token set (``k`` × ``dim``) per length, drawn on the CPU; ``device``: then moved there."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sets = [torch.randn(k, dim, generator=g) for k in lengths]
    return sets if device is None else [t.to(device) for t in sets]


def fifo(sets: Sequence[Any], size: int) -> list[Batch]:
    """Batches of ``size`` in arrival order."""
    return [list(sets[i:i + size]) for i in range(0, len(sets), size)]


def planned(sets: Sequence[torch.Tensor], max_batch: int, max_tokens: int, pad_to_max: bool = False) -> list[Batch]:
    """Batches as the worker's batcher forms them (:func:`shared.packing.plan_batches`)."""
    from shared.packing import plan_batches

    groups = plan_batches([int(t.shape[0]) for t in sets], max_batch, max_tokens, pad_to_max=pad_to_max)
    return [[sets[i] for i in g] for g in groups]


def zoo_fractions(limit: int) -> tuple[np.ndarray | None, str]:
    """Kept fractions of zoo:cifar10-edge at δ_sum = 0.97 on CIFAR-10 test images, or None and why not."""
    import torch

    from shared import datasets
    from shared.models import ZOO_DIR, build_model

    if not (ZOO_DIR / "cifar10-edge.safetensors").is_file():
        return None, "zoo:cifar10-edge not in shared/zoo"
    try:
        ds = datasets.load("cifar10/test.tar").spread(limit)
    except Exception as exc:  # a missing data root is a skip, not a failure of the benchmark
        return None, f"CIFAR-10 test data not found ({exc})"
    from shared.attention import edge_forward
    from shared.scores import cls_attention_scores
    from shared.selection import SelectionRule, select_batch

    loaded = build_model("zoo:cifar10-edge", role="edge")
    rule = SelectionRule("sum_threshold", 0.97)
    pixels = np.stack([np.asarray(datasets.decode_rgb(s.data), dtype=np.uint8) for s in ds.samples])
    fractions: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(pixels), 250):
            x = datasets.normalize(torch.from_numpy(pixels[start:start + 250]), loaded.preprocess)
            scores = cls_attention_scores(edge_forward(loaded.model, x).cls_attention)
            fractions += [s.fraction for s in select_batch(scores, rule)]
    return np.asarray(fractions), f"zoo:cifar10-edge, {len(fractions)} CIFAR-10 test images, δ_sum 0.97"


def model_flops(lengths: Sequence[int], depth: int, dim: int = 768, mlp_ratio: float = 4.0) -> float:
    """Model FLOPs (2 × MACs of the encoder, :func:`shared.costs.vit_flops`) on each set's real tokens, CLS
    included."""
    from shared.costs import vit_flops

    return sum(2.0 * vit_flops(k + 1, dim, depth, mlp_ratio) for k in lengths)


def natural_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients, blobs and mild noise: JPEG sizes like photos, deterministic (uint8, H×W×3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y, x = y / height, x / width
    img = np.zeros((height, width, 3))
    for c in range(3):
        img[..., c] = 128 + 70 * np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y)
                                        + rng.uniform(0, 6.3))
    for _ in range(6):
        cy, cx, r = rng.uniform(0, 1, 3) * (1, 1, 0.25) + (0, 0, 0.05)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - blob) + rng.uniform(0, 255, 3) * blob
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


# ---- variants and timing --------------------------------------------------------------------------

@dataclass
class Variant:
    """One timed workload: ``run`` over every batch of ``batches``, once per round."""

    key: str
    mix: str
    what: str
    batches: list[Batch]  # the workload of every round (for round_batches: the warm-up's)
    run: Callable[[Batch], object]
    threads: int | None = None  # torch intra-op threads while it runs (None: as set)
    round_batches: list[list[Batch]] | None = None  # a fresh workload per round
    images: int = 0
    real_tokens: int = 0  # CLS included
    computed_tokens: int = 0  # CLS and padding included
    flops: float = 0.0  # model FLOPs (2 × MACs) of the whole workload; for peaks, of one run
    peak: bool = False  # a machine-limit variant: its rate is GFLOP/s, not images/s
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)  # this process's CPU seconds per round

    def per_round(self, cpu: bool = False) -> list[float]:
        """Images/s per round (GFLOP/s for peak variants); ``cpu``: per CPU-second of this process."""
        work = self.flops / 1e9 if self.peak else self.images
        return [work / t for t in (self.cpus if cpu else self.walls)]

    def rate(self) -> float:
        """Images/s over the median round."""
        return self.images / statistics.median(self.walls)


def med(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def paired(a: Variant, b: Variant, cpu: bool = False) -> float:
    """Median over rounds of (a's throughput ÷ b's throughput), by wall time or by CPU time."""
    return med([x / y for x, y in zip(a.per_round(cpu), b.per_round(cpu), strict=True)])


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside (None: left alone)."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _no_sync() -> None:
    pass


def measure(variants: list[Variant], rounds: int, log: Callable[[str], None],
            sync: Callable[[], None] = _no_sync) -> None:
    """Time every variant's whole workload (``time.perf_counter``, and this process's CPU time), after one
    warm-up batch each; variants interleaved, ``rounds`` times, each round in a rotated order (a shared
    machine drifts within minutes). ``sync`` waits for queued device work (``torch.cuda.synchronize``): it
    runs after the warm-ups and before and after each timed workload."""
    import torch

    with torch.inference_mode():
        for v in variants:  # warm-up: kernels (oneDNN primitives, CUDA kernel selection), allocator, autocast
            with num_threads(v.threads):
                v.run(v.batches[0])
        sync()
        for r in range(rounds):
            shift = r % len(variants)
            for v in variants[shift:] + variants[:shift]:
                with num_threads(v.threads):
                    sync()
                    c0, t0 = time.process_time(), time.perf_counter()
                    for batch in (v.round_batches[r] if v.round_batches else v.batches):
                        v.run(batch)
                    sync()
                    v.walls.append(time.perf_counter() - t0)
                    v.cpus.append(time.process_time() - c0)
            log(f"round {r + 1}/{rounds} done")


def log(msg: str) -> None:
    """A progress line on stderr, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    """Write a bench's figures to ``path`` (nothing if None), creating its folder."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))
