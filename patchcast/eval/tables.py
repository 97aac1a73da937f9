"""Markdown table cells and the paper's tables (II: expected patches per δ_sum; III: images sent
per η) from a sweep's points."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from patchcast.eval.arrays import FloatArray
from patchcast.eval.frontier import send_masks
from patchcast.eval.grid import PAPER_SUM_THRESHOLD, SelectionSpec, SweepGrid
from patchcast.eval.points import Point, find_point

if TYPE_CHECKING:
    from patchcast.eval.passes import Arrays


def pct(x: float | None) -> str:
    """A fraction as a percentage cell, ``–`` for a missing or NaN value."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f} %"


def table_expected_patches(data: Arrays, specs: Sequence[SelectionSpec], n_patches: int,
                           points: Sequence[Point]) -> str:
    """Paper Table II: δ_sum → expected patches kept per image (mean ± std) and no-gate accuracy."""
    scores = sorted({sp.score for sp in specs if sp.encoder == "edge" and sp.score != "random"})
    head = "| δ_sum | " + " | ".join(f"{s}: patches (mean ± std) | {s}: % of N | {s}: accuracy, all sent"
                                       for s in scores) + " |"
    lines = [head, "|---" * (1 + 3 * len(scores)) + "|"]
    values = sorted({sp.value for sp in specs if sp.rule == "sum_threshold"})
    for v in values:
        cells = [f"{v:g}"]
        for s in scores:
            sid = SelectionSpec("edge", s, "sum_threshold", v).id
            c = data.counts[sid]
            p = find_point(points, encoder="edge", score=s, rule="sum_threshold", value=v, gate="none")
            cells += [f"{c.mean():.1f} ± {c.std():.1f}", f"{100 * c.mean() / n_patches:.1f} %",
                      f"{100 * p.accuracy:.2f} %" if p else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_sent_fraction(points: Sequence[Point], gate_u: dict[str, FloatArray], grid: SweepGrid,
                        data: Arrays) -> str:
    """Paper Table III: η → fraction of images sent (min-entropy gate), edge accuracy on the images it
    keeps, and the end-to-end accuracy / cost at the paper's δ_sum = 0.97."""
    u = gate_u["min_entropy"]
    edge_correct = data.edge_logits.argmax(1) == data.labels
    lines = ["| η (bits) | images sent | edge accuracy on kept images | accuracy (δ_sum 0.97) | comm cost |",
             "|---|---|---|---|---|"]
    for eta in grid.fixed_etas:
        if eta > math.log2(data.edge_logits.shape[1]) + 1e-9:
            continue
        send = send_masks(u, "min_entropy", [eta])[0]
        kept = ~send
        p = find_point(points, encoder="edge", score="attention", rule="sum_threshold", value=PAPER_SUM_THRESHOLD,
                  gate="min_entropy", eta=float(eta))
        kept_acc = f"{100 * edge_correct[kept].mean():.2f} %" if kept.any() else "–"
        end = f"{100 * p.accuracy:.2f} % | {p.comm_cost:.3f}" if p else "– | –"
        lines.append(f"| {eta:g} | {100 * send.mean():.1f} % | {kept_acc} | {end} |")
    return "\n".join(lines)
