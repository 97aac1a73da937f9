"""The numbers of a ``patchcast eval`` run (``summary.json``): baselines, recommended operating
points, and the acceptance checks on the η grid and at every η, with their bootstrap intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from patchcast.eval.arrays import FloatArray
from patchcast.eval.frontier import bootstrap_acceptance, compare_frontiers, exact_points, frontier_at, pareto_frontier
from patchcast.eval.grid import PAPER_ETA, PAPER_SUM_THRESHOLD, SelectionSpec
from patchcast.eval.points import (
    Point,
    cheapest,
    deployable,
    describe,
    edge_only_point,
    find_point,
    frontier_points,
    is_method,
    point_json,
    series,
    server_only_point,
)
from patchcast.eval.sweep import selections_of

if TYPE_CHECKING:
    from patchcast.eval.config import EvalConfig
    from patchcast.eval.passes import Arrays


def point_summary(p: Point | None) -> dict[str, Any] | None:
    """A patch-method point for ``summary.json``: its fields, its label and a one-line description."""
    return None if p is None else point_json(p, label=p.label, description=describe(p))


def selection_geometry(scores: FloatArray, k: int) -> dict[str, float]:
    """Where a top-k selection on a square patch grid lands, next to what uniform random picks give.

    ``central_share``: kept patches in the central half of the grid (both axes); ``bottom_corners``:
    images keeping both bottom corner patches, the signature of an attention sink (a small ViT parking
    CLS attention on a few background tokens). Random: the expectations of k uniform picks.
    """
    b, n = scores.shape
    g = math.isqrt(n)
    if g * g != n or not 1 <= k <= n or g < 2:
        raise ValueError(f"need a square grid and 1 <= k <= N, got N={n}, k={k}")
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    kept = np.zeros((b, n), dtype=bool)
    np.put_along_axis(kept, top, True, axis=1)
    grid = kept.reshape(b, g, g)
    lo, hi = g // 4, g - g // 4
    central_cells = (hi - lo) ** 2
    return {
        "k": k,
        "central_share": float(grid[:, lo:hi, lo:hi].sum() / kept.sum()),
        "central_share_random": central_cells / n,
        "bottom_corners": float(np.mean(grid[:, -1, 0] & grid[:, -1, -1])),
        "bottom_corners_random": k * (k - 1) / (n * (n - 1)),
    }


def summarise(cfg: EvalConfig, data: Arrays, points: list[Point], n_patches: int, edge_m: Any,
              server_m: Any, gate_u: dict[str, FloatArray], specs: Sequence[SelectionSpec],
              bytes_sample: int) -> dict[str, Any]:
    from shared.costs import model_flops

    edge_only, server_only = edge_only_point(points), server_only_point(points)
    target = server_only.accuracy - cfg.max_loss / 100.0
    method = frontier_points(points, is_method)
    mc = np.array([p.comm_cost for p in method])
    ma = np.array([p.accuracy for p in method])
    at_half = frontier_at(mc, ma, 0.5)
    mcost, macc = series(points, lambda p: is_method(p))
    rcost, racc = series(points, lambda p: is_method(p, score="random"))
    cmp = compare_frontiers(mcost, macc, rcost, racc)
    # The same two checks with η at every observed value instead of the grid's quantiles.
    server_correct = data.server_logits.argmax(1) == data.labels
    method_sel = selections_of(data, specs, score="attention")
    random_sel = selections_of(data, specs, score="random")
    edge_correct = data.edge_logits.argmax(1) == data.labels
    ecost, eacc = exact_points(gate_u["min_entropy"], "min_entropy", edge_correct, method_sel, n_patches)
    rcost_x, racc_x = exact_points(gate_u["min_entropy"], "min_entropy", edge_correct, random_sel, n_patches)
    efront = pareto_frontier(ecost, eacc)
    at_half_exact = frontier_at(ecost[efront], eacc[efront], 0.5)
    cmp_exact = compare_frontiers(ecost, eacc, rcost_x, racc_x) if len(rcost_x) else None
    rfront = pareto_frontier(rcost_x, racc_x) if len(rcost_x) else np.zeros(0, dtype=np.int64)
    boot = (bootstrap_acceptance(gate_u["min_entropy"], "min_entropy", edge_correct, server_correct,
                                 method_sel, random_sel, n_patches, resamples=cfg.bootstrap, seed=cfg.seed)
            if cfg.bootstrap and method_sel and random_sel else None)
    # Point by point: the random twin has the same images sent and the same patch counts.
    twins = {(p.rule, p.value, p.gate, p.eta): p.accuracy for p in points if p.score == "random"}
    diffs = [p.accuracy - twins[(p.rule, p.value, p.gate, p.eta)] for p in points
             if p.encoder == "edge" and p.score == "attention" and (p.rule, p.value, p.gate, p.eta) in twins
             and p.gate in ("none", "min_entropy")]
    paper = find_point(points, encoder="edge", score="attention", rule="sum_threshold", value=PAPER_SUM_THRESHOLD,
                  gate="min_entropy", eta=PAPER_ETA)
    return {
        "config": {k: v for k, v in asdict(cfg).items()},
        "images": len(data.labels),
        "num_patches": n_patches,
        "edge": {"ref": cfg.edge, "name": edge_m.name, "accuracy": edge_only.accuracy,
                 "gmacs": round(model_flops(edge_m, n_patches + edge_m.model.num_prefix_tokens) / 1e9, 4)},
        "server": {"ref": cfg.server, "name": server_m.name, "accuracy": server_only.accuracy,
                   "gmacs": round(server_only.server_gmacs_per_image, 4)},
        "bytes_sample": bytes_sample,
        "max_loss_points": cfg.max_loss,
        "target_accuracy": target,
        "best_point": point_summary(cheapest([p for p in points if deployable(p)], target, "comm_cost")),
        "best_point_paper_rule": point_summary(cheapest(
            [p for p in points if is_method(p, rules=("sum_threshold",))], target, "comm_cost")),
        "best_point_by_bytes": point_summary(cheapest([p for p in points if deployable(p)], target, "bytes_frac")),
        "paper_point": point_summary(paper),
        "acceptance": {
            "frontier_accuracy_at_cost_0.5": at_half,
            "loss_at_cost_0.5_points": (server_only.accuracy - at_half) * 100,
            "within_1_point_at_cost_0.5": bool(at_half >= server_only.accuracy - 0.01 - 1e-12),
            "random_frontier_costs": cmp.costs,
            "random_frontier_accuracy": cmp.baseline,
            "method_frontier_at_those_costs": cmp.method,
            "min_margin_over_random_frontier_points": cmp.min_margin * 100,
            "beats_random_frontier_everywhere": cmp.beats_everywhere,
            "exact_eta": {
                "frontier_accuracy_at_cost_0.5": at_half_exact,
                "loss_at_cost_0.5_points": (server_only.accuracy - at_half_exact) * 100,
                "within_1_point_at_cost_0.5": bool(at_half_exact >= server_only.accuracy - 0.01 - 1e-12),
                "frontier_points": len(efront),
                "random_frontier_points": len(cmp_exact.costs) if cmp_exact else 0,
                "min_margin_over_random_frontier_points": (cmp_exact.min_margin * 100) if cmp_exact else None,
                "random_frontier_points_beaten_or_tied": (
                    int(sum(m >= b for m, b in zip(cmp_exact.method, cmp_exact.baseline, strict=True)))
                    if cmp_exact else 0),
                "beats_random_frontier_everywhere": bool(cmp_exact and cmp_exact.beats_everywhere),
                "costs_below_random": ([c for c, m, b in zip(cmp_exact.costs, cmp_exact.method, cmp_exact.baseline,
                                                            strict=True) if m < b] if cmp_exact else []),
                # the two frontiers themselves, for the plots: [[cost, accuracy], …]
                "method_frontier": [[float(ecost[i]), float(eacc[i])] for i in efront],
                "random_frontier": [[float(rcost_x[i]), float(racc_x[i])] for i in rfront],
                "bootstrap": boot,
            },
            "matched_points": len(diffs),
            "matched_points_method_not_worse": int(sum(d >= 0 for d in diffs)),
            "matched_points_min_margin_points": (min(diffs) * 100) if diffs else None,
            "matched_points_mean_margin_points": (float(np.mean(diffs)) * 100) if diffs else None,
        },
        "frontier": [point_summary(p) for p in method],
        # top-N/4 patches, where the paper's rules spend most of their budget
        "selection_geometry": {f"{enc}/{score}": selection_geometry(sc, max(1, n_patches // 4))
                               for (enc, score), sc in sorted(data.scores.items())
                               if score == "attention" and math.isqrt(n_patches) ** 2 == n_patches},
    }
