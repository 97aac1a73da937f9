"""The numpy core both evaluations share: gate decisions, operating points at every threshold,
Pareto frontiers, frontier comparisons and the paired bootstrap around them.

Everything here works on plain arrays (per-image correctness, uncertainty and patch counts), never
on models, so it is unit-tested on its own and checked against :mod:`shared.gates` and
:mod:`shared.costs`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from patchcast.eval.arrays import BoolArray, FloatArray, IntArray
from patchcast.eval.grid import GateName


def send_masks(u: FloatArray, kind: GateName, thresholds: Sequence[float]) -> BoolArray:
    """(T, B) gate decisions for T thresholds, identical to :func:`shared.gates.should_send`.

    The comparison runs in float32 like the torch version (a Python float threshold is rounded to
    the tensor's float32 there), so a threshold equal to an observed value decides the same way.
    """
    u32 = np.asarray(u, dtype=np.float32)[None, :]
    t32 = np.asarray(thresholds, dtype=np.float32)[:, None]
    return u32 <= t32 if kind == "margin" else u32 >= t32


@dataclass(frozen=True)
class GateSweep:
    """Operating points of one selection under one gate, arrays over thresholds (T,)."""

    images_sent: IntArray
    patches_sent: IntArray
    accuracy: FloatArray


def sweep_gate(edge_correct: BoolArray, server_correct: BoolArray | FloatArray, counts: IntArray,
               send: BoolArray) -> GateSweep:
    """Accuracy and traffic when images in ``send`` (T, B) take the server's answer on their
    selection (``counts`` patches each) and the rest keep the edge's."""
    send = np.asarray(send, dtype=bool)
    if send.ndim == 1:
        send = send[None, :]
    # Float correctness: a random baseline averaged over draws is right with probability in [0, 1].
    correct = np.where(send, np.asarray(server_correct, np.float64)[None, :],
                       np.asarray(edge_correct, np.float64)[None, :])
    return GateSweep(images_sent=send.sum(axis=1).astype(np.int64),
                     patches_sent=(send.astype(np.int64) @ np.asarray(counts, dtype=np.int64)),
                     accuracy=correct.mean(axis=1))


def exact_gate_curve(u: FloatArray, kind: GateName, edge_correct: FloatArray | BoolArray,
                     server_correct: FloatArray | BoolArray,
                     counts: IntArray, num_patches: int) -> tuple[FloatArray, FloatArray]:
    """(comm cost, accuracy) of one selection under one gate at *every* threshold, the curve that
    the η grid of :func:`gate_thresholds` samples.

    A gate sends the images whose uncertainty is at or beyond η, so as η passes every observed value
    the sent set grows one group of tied values at a time, in uncertainty order: prefix sums give
    every operating point in O(B log B), from nothing sent (edge only) to everything (no gate). Ties
    are decided in float32 like :func:`send_masks`, so each point equals ``sweep_gate`` at some η.
    """
    u32 = np.asarray(u, dtype=np.float32)
    n = len(u32)
    order = np.argsort(u32 if kind == "margin" else -u32, kind="stable")
    ordered = u32[order]
    group_ends = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True]) + 1  # sent counts a threshold can give
    sent = np.r_[0, group_ends]
    edge = np.asarray(edge_correct, dtype=np.float64)
    gain = np.asarray(server_correct, dtype=np.float64)[order] - edge[order]
    accuracy = (edge.sum() + np.r_[0.0, np.cumsum(gain)][sent]) / n
    patches = np.r_[0, np.cumsum(np.asarray(counts, dtype=np.int64)[order])][sent]
    # (sent ÷ n) × (patches ÷ (sent × N)), the paper's product, without dividing by zero sent
    return patches / (n * num_patches), accuracy


def pareto_frontier(cost: FloatArray, accuracy: FloatArray) -> IntArray:
    """Indices of the points no other point beats (lower-or-equal cost *and* higher accuracy),
    ordered by cost; accuracy strictly increases along the result."""
    cost = np.asarray(cost, dtype=np.float64)
    accuracy = np.asarray(accuracy, dtype=np.float64)
    order = np.lexsort((-accuracy, cost))  # by cost, then best accuracy first among equal costs
    keep: list[int] = []
    best = -math.inf
    for i in order:
        if accuracy[i] > best:
            keep.append(int(i))
            best = float(accuracy[i])
    return np.asarray(keep, dtype=np.int64)


def frontier_at(front_cost: FloatArray, front_acc: FloatArray, cost: float) -> float:
    """Best accuracy reachable at a cost ≤ ``cost`` on a frontier (NaN when none is that cheap)."""
    ok = np.asarray(front_cost) <= cost + 1e-12
    return float(np.max(np.asarray(front_acc)[ok])) if ok.any() else math.nan


def random_matched_selection(counts: IntArray, num_patches: int, rng: np.random.Generator) -> BoolArray:
    """(B, N) masks with ``counts[b]`` uniformly random patches per image (without replacement)."""
    counts = np.asarray(counts, dtype=np.int64)
    ranks = np.argsort(rng.random((len(counts), num_patches)), axis=1).argsort(axis=1)
    return ranks < counts[:, None]


@dataclass(frozen=True)
class FrontierComparison:
    """Method frontier vs a baseline frontier at the baseline's own frontier costs."""

    costs: list[float]
    baseline: list[float]
    method: list[float]

    @property
    def min_margin(self) -> float:
        diffs = [m - b for m, b in zip(self.method, self.baseline, strict=True)]
        return min(diffs) if diffs else math.nan

    @property
    def beats_everywhere(self) -> bool:
        return bool(self.costs) and self.min_margin >= 0.0


def compare_frontiers(method_cost: FloatArray, method_acc: FloatArray,
                      base_cost: FloatArray, base_acc: FloatArray) -> FrontierComparison:
    mf = pareto_frontier(method_cost, method_acc)
    bf = pareto_frontier(base_cost, base_acc)
    mc, ma = np.asarray(method_cost)[mf], np.asarray(method_acc)[mf]
    costs = [float(c) for c in np.asarray(base_cost)[bf]]
    return FrontierComparison(costs=costs, baseline=[float(a) for a in np.asarray(base_acc)[bf]],
                              method=[frontier_at(mc, ma, c) for c in costs])


Selection = tuple[FloatArray | BoolArray, IntArray]  # (per-image server correctness, kept patches)
BOOTSTRAP_COSTS = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75)


def exact_points(u: FloatArray, kind: GateName, edge_correct: FloatArray | BoolArray,
                 selections: Sequence[Selection], num_patches: int) -> tuple[FloatArray, FloatArray]:
    """Every operating point (cost, accuracy) of some selections under one gate at every threshold:
    :func:`exact_gate_curve` over all of them, edge-only and no-gate included."""
    curves = [exact_gate_curve(u, kind, edge_correct, ok, counts, num_patches) for ok, counts in selections]
    if not curves:
        return np.zeros(0), np.zeros(0)
    return np.concatenate([c for c, _ in curves]), np.concatenate([a for _, a in curves])


def exact_frontier(u: FloatArray, kind: GateName, edge_correct: FloatArray | BoolArray,
                    selections: Sequence[Selection], num_patches: int) -> tuple[FloatArray, FloatArray]:
    cost, acc = exact_points(u, kind, edge_correct, selections, num_patches)
    front = pareto_frontier(cost, acc)
    return cost[front], acc[front]


def bootstrap_acceptance(u: FloatArray, kind: GateName, edge_correct: FloatArray | BoolArray,
                         server_correct: FloatArray | BoolArray,
                         method: Sequence[Selection], baseline: Sequence[Selection], num_patches: int, *,
                         costs: Sequence[float] = BOOTSTRAP_COSTS, resamples: int = 200,
                         seed: int = 0) -> dict[str, Any]:
    """How much of the acceptance checks is sampling noise: a paired bootstrap over images.

    Each resample draws the test images with replacement and recomputes, on the same draw, the
    method's and the baseline's exact frontiers (every η) and server-only accuracy; reported are the
    mean and the 2.5–97.5 percentiles of (method − baseline) at each cost and of (server-only −
    method) at cost 0.5, in points, and how often the method fell below the baseline.
    """
    rng = np.random.default_rng(seed)
    n = len(u)
    edge = np.asarray(edge_correct, dtype=np.float64)
    server = np.asarray(server_correct, dtype=np.float64)
    gaps = np.empty((resamples, len(costs)))
    loss = np.empty(resamples)
    for r in range(resamples):
        idx = rng.integers(0, n, n)
        ur, er = np.asarray(u)[idx], edge[idx]
        mc, ma = exact_frontier(ur, kind, er, [(ok[idx], c[idx]) for ok, c in method], num_patches)
        bc, ba = exact_frontier(ur, kind, er, [(ok[idx], c[idx]) for ok, c in baseline], num_patches)
        gaps[r] = [frontier_at(mc, ma, c) - frontier_at(bc, ba, c) for c in costs]
        loss[r] = float(np.mean(server[idx])) - frontier_at(mc, ma, 0.5)

    def interval(x: FloatArray) -> dict[str, float]:
        lo, hi = np.percentile(100 * x, [2.5, 97.5])
        return {"mean": float(np.mean(100 * x)), "lo": float(lo), "hi": float(hi)}

    return {
        "resamples": resamples,
        "method_minus_baseline": [{"cost": float(c), **interval(gaps[:, i]), "p_below": float(np.mean(gaps[:, i] < 0))}
                                  for i, c in enumerate(costs)],
        "loss_at_cost_0.5": {**interval(loss), "p_over_1_point": float(np.mean(loss > 0.01))},
    }


def thin_frontier(front: Sequence[dict[str, Any]], step: float) -> list[dict[str, Any]]:
    """The first point at or above each multiple of ``step`` in cost, plus the first and last."""
    kept: list[dict[str, Any]] = []
    next_cost = 0.0
    for i, p in enumerate(front):
        if p["comm_cost"] >= next_cost - 1e-12 or i == len(front) - 1:
            kept.append(p)
            next_cost = (math.floor(p["comm_cost"] / step + 1e-9) + 1) * step
    return kept
