"""The PNG figures of both evaluations: ``patchcast eval``'s paper figures (8, 11–14 and bytes) and
``patchcast eval-region``'s accuracy-vs-cost panels. Matplotlib is imported only here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from patchcast.eval.bytes import REFERENCE_JPEG_QUALITY
from patchcast.eval.frontier import pareto_frontier
from patchcast.eval.grid import GATES
from patchcast.eval.points import Point, edge_only_point, frontier_points, is_full, is_method, series, server_only_point

if TYPE_CHECKING:
    from patchcast.eval.region import RegionEvalConfig, RegionPoint


def _frontier_xy(points: Sequence[Point], pred: Callable[[Point], bool]) -> tuple[list[float], list[float]]:
    """Frontier as a step curve, held flat to cost 1 so curves that stop early stay comparable."""
    f = frontier_points(points, pred)
    return [p.comm_cost for p in f] + [1.0], [100 * p.accuracy for p in f] + [100 * f[-1].accuracy]


def _nogate_xy(points: Sequence[Point], **kw: Any) -> tuple[list[float], list[float]]:
    """Every image sent: accuracy vs kept fraction, ending at the full image (server-only)."""
    chosen = sorted((p for p in points
                     if p.gate == "none" and all(getattr(p, k) == v for k, v in kw.items())),
                    key=lambda p: p.patch_frac)
    full = server_only_point(points)
    return [p.patch_frac for p in chosen] + [1.0], [100 * p.accuracy for p in chosen] + [100 * full.accuracy]


def plot_all(points: Sequence[Point], out_dir: Path, summary: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edge_acc, server_acc = 100 * summary["edge"]["accuracy"], 100 * summary["server"]["accuracy"]
    files: list[Path] = []
    # Frontier panels zoom on the interesting band: from below edge-only to above the best point.
    top = max(server_acc, 100 * max(p.accuracy for p in points if p.gate != "none" or p.rule == "full"))
    ylim = (min(edge_acc, server_acc) - 2.0, top + 1.0)

    def baselines(ax: Any) -> None:
        ax.axhline(server_acc, color="k", lw=0.8, ls="--", label=f"server only ({server_acc:.1f} %)")
        ax.axhline(edge_acc, color="0.5", lw=0.8, ls=":", label=f"edge only ({edge_acc:.1f} %)")
        ax.grid(alpha=0.3)
        ax.set_ylabel("accuracy (%)")

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)

    def finish(fig: Any, ax: Any, xlabel: str, title: str, name: str) -> None:
        """A one-panel figure: baselines, the zoomed accuracy band, legend and title; saved as ``name``."""
        baselines(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylim(*ylim)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title(title, fontsize=10)
        save(fig, name)

    # Fig. 8: the trade-off and its frontier.
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs, ys = series(points, is_method, with_edge_only=False)
    ax.scatter(xs, 100 * ys, s=4, color="tab:blue", alpha=0.15, label="edge attention × min-entropy (all)")
    exact = summary["acceptance"].get("exact_eta") or {}
    if exact.get("method_frontier") and exact.get("random_frontier"):
        # the acceptance's curves: η at every observed value (the dots are the η grid's points)
        for key, color, ls, label in (("method_frontier", "tab:blue", "-", "frontier: attention (every η)"),
                                      ("random_frontier", "tab:orange", "-.", "frontier: random patches (every η)")):
            front = exact[key]
            ax.step([c for c, _ in front] + [1.0], [100 * a for _, a in front] + [100 * front[-1][1]],
                    where="post", color=color, lw=2 if key == "method_frontier" else 1.5, ls=ls, label=label)
    else:
        ax.step(*_frontier_xy(points, is_method), where="post", color="tab:blue", lw=2,
                label="frontier: attention")
        ax.step(*_frontier_xy(points, lambda p: is_method(p, score="random")), where="post",
                color="tab:orange", lw=1.5, ls="-.", label="frontier: random patches")
    ax.step(*_frontier_xy(points, lambda p: is_full(p, "min_entropy")), where="post",
            color="tab:green", lw=1.2, ls=":", label="frontier: full images, gate only")
    if summary["paper_point"]:
        pp = summary["paper_point"]
        ax.plot(pp["comm_cost"], 100 * pp["accuracy"], "r*", ms=12, label="δ_sum 0.97, η 0.8")
    if summary["best_point"]:
        bp = summary["best_point"]
        ax.plot(bp["comm_cost"], 100 * bp["accuracy"], "kD", ms=6,
                label=f"cheapest within {summary['max_loss_points']:g} pt")
    finish(fig, ax, "communication cost (images sent × patches sent)",
           "Accuracy vs communication cost (cf. paper Fig. 8)", "fig8_tradeoff.png")

    Curve = tuple[str, dict[str, Any], Callable[[Point], bool], str]

    def two_panel(name: str, title: str, curves: list[Curve]) -> None:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.6, 3.8))
        for label, nogate_kw, pred, style in curves:
            if nogate_kw:
                a1.plot(*_nogate_xy(points, **nogate_kw), style, ms=3, label=label)
            a2.step(*_frontier_xy(points, pred), style.rstrip("o.s^v"), where="post", label=label)
        for a in (a1, a2):
            baselines(a)
        a1.set_xlabel("patches sent ÷ patches (every image sent)")
        a1.set_title("no gate", fontsize=9)
        a2.set_xlabel("communication cost")
        a2.set_title("frontier with min-entropy gate", fontsize=9)
        a2.set_ylim(*ylim)
        a1.legend(fontsize=7, loc="lower right")
        a2.legend(fontsize=7, loc="lower right")
        fig.suptitle(title, fontsize=10)
        save(fig, name)

    def curve(label: str, style: str, *, score: str = "attention", encoder: str = "edge",
              rule: str = "sum_threshold") -> Curve:
        """One selection's curves: every image sent (left panel) and its min-entropy frontier (right)."""
        return (label, {"encoder": encoder, "score": score, "rule": rule},
                partial(is_method, score=score, encoder=encoder, rules=(rule,)), style)

    two_panel("fig11_scores.png", "Mean attention vs attention rollout, δ_sum rule (cf. paper Fig. 11)", [
        curve("mean attention", "-o"), curve("rollout", "--s", score="rollout"),
        curve("random, matched", ":^", score="random")])
    two_panel("fig12_rules.png", "Selection rules, mean attention (cf. paper Fig. 12)", [
        curve("top-k", "-o", rule="topk"), curve("threshold δ", "--s", rule="threshold"),
        curve("sum-threshold δ_sum", "-.^")])
    two_panel("fig14_encoder.png", "Edge vs server attention as semantic encoder, δ_sum (cf. Fig. 14)", [
        curve("edge attention", "-o"), curve("server attention", "--s", encoder="server"),
        curve("random, matched", ":^", score="random")])

    # Fig. 13: gates.
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for g, color in zip(GATES, ("tab:blue", "tab:red", "tab:purple"), strict=True):
        ax.step(*_frontier_xy(points, partial(is_method, gate=g)), where="post", color=color, lw=1.8,
                label=f"{g}, attention selection")
        ax.step(*_frontier_xy(points, partial(is_full, gate=g)), where="post", color=color, lw=1, ls=":",
                label=f"{g}, full images")
    finish(fig, ax, "communication cost", "Gates: min-entropy vs Shannon vs margin (cf. paper Fig. 13)",
           "fig13_gates.png")

    # Bytes: what the link actually carries.
    fig, ax = plt.subplots(figsize=(6.4, 4.4))

    def bytes_frontier(pred: Callable[[Point], bool]) -> tuple[list[float], list[float]]:
        chosen = [p for p in points if pred(p)] + [edge_only_point(points)]
        idx = pareto_frontier(np.array([p.bytes_frac for p in chosen]),
                              np.array([p.accuracy for p in chosen]))
        xs = [chosen[i].bytes_frac for i in idx]
        ys = [100 * chosen[i].accuracy for i in idx]
        return [*xs, max(1.0, xs[-1])], [*ys, ys[-1]]  # held flat to 1, like the cost frontiers

    for score, color in (("attention", "tab:blue"), ("random", "tab:orange")):
        ax.step(*bytes_frontier(partial(is_method, score=score)), where="post", color=color,
                label=f"{score} selection, frontier")
    ax.step(*bytes_frontier(partial(is_full, gate="min_entropy")), where="post", color="tab:green", ls=":",
            label="full images, gate only")
    finish(fig, ax, f"bytes ÷ full-image JPEG q{REFERENCE_JPEG_QUALITY} (patches: codec {summary['config']['codec']})",
           "Accuracy vs bytes on the link", "fig_bytes.png")
    return files


def plot_region(cfg: RegionEvalConfig, out_dir: Path, points: Sequence[RegionPoint], x: str, name: str,
                xlabel: str) -> Path:
    """Accuracy vs cost (``x``: ``pixel_frac`` or ``bytes_frac``), one panel per downscale factor, one
    curve per (side, fusion), the baselines as markers and a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from shared.region import FUSIONS

    factors = sorted({p.downscale for p in points if p.kind == "glance" and p.downscale is not None})
    fig, axes = plt.subplots(1, len(factors), figsize=(6.4 * len(factors), 4.8), squeeze=False, sharey=True)
    server = next(p for p in points if p.kind == "server")
    colors = dict(zip(cfg.sides, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                                  "tab:pink", "tab:olive"), strict=False))
    styles = {"image": "-", "image+probs": "--", "probs": ":"}
    for ax, s in zip(axes[0], factors, strict=True):
        for fusion in FUSIONS:
            for f in cfg.sides:
                mine = sorted((p for p in points if p.kind == "region" and p.downscale == s and p.fusion == fusion
                               and p.side_fraction == f), key=lambda p: (getattr(p, x), p.asked_frac))
                ax.plot([getattr(p, x) for p in mine], [100 * p.accuracy for p in mine], styles[fusion],
                        color=colors.get(f, "gray"), lw=1.3)
        glance = next(p for p in points if p.kind == "glance" and p.downscale == s)
        ax.axhline(100 * server.accuracy, color="black", ls="-.", lw=0.8)
        ax.plot([getattr(server, x)], [100 * server.accuracy], "ks", ms=7)
        ax.plot([getattr(glance, x)], [100 * glance.accuracy], "k*", ms=11)
        if x == "pixel_frac":
            ax.axvline(cfg.budget, color="gray", ls=":", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_title(f"downscale s = {s}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    handles = [Line2D([], [], color=colors.get(f, "gray"), lw=2, label=f"side {f:g}") for f in cfg.sides]
    handles += [Line2D([], [], color="black", ls=styles[fu], label=f"fusion {fu}") for fu in FUSIONS]
    handles += [Line2D([], [], color="black", marker="s", ls="-.", label="server, full image"),
                Line2D([], [], color="black", marker="*", ls="", ms=10, label="glance only")]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="lower right")
    fig.suptitle("Region retransmission: accuracy vs cost (η swept along each curve)", fontsize=11)
    fig.tight_layout()
    path = out_dir / name
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
