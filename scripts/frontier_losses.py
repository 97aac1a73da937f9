"""Where a frontier point loses its accuracy: the gate, or the server on partial images.

Reads the model passes a ``patchcast eval`` run cached (``OUT/cache/<key>/``: the edge's logits, the
server on whole images and on every edge-attention selection) and, at a communication-cost budget
(default 0.35, the paper's −0.96-points point is at 0.32), prints:

* the best accuracy each gate reaches within the budget, at every η (the image set sent is the
  most uncertain n, for every n), over every edge-attention rule;
* for the best min-entropy point, the loss split in two: the same images sent, answered by the server
  on whole images instead of on their patches (what is lost to partial images), and the rest (the gate);
* an oracle gate (send exactly the images the edge gets wrong and the server, on its patches, gets
  right): an upper bound no deployment reaches;
* how well the edge's min-entropy ranks its own errors, and the images only the server gets right (AUROC);
* a patch budget that follows the uncertainty (the most unsure images with one rule, the next ones with
  another): an extension of the paper's method, its two thresholds chosen on the same images.

    python scripts/frontier_losses.py reports/eval-imagenette
    python scripts/frontier_losses.py reports/eval-imagenette --budget 0.5 --json losses.json

Thresholds are chosen on the evaluated images themselves, as the eval's own frontier chooses η: the
figures are what each option can reach at best on this set, not held-out estimates.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchcast.eval.frontier import exact_gate_curve
from shared.gates import UNCERTAINTY_KINDS, UncertaintyKind, uncertainty

SELECTION_PREFIX = "sel-edge-attention-"


@dataclass(frozen=True)
class Passes:
    """One cached eval: labels, edge and server (whole image) correctness, and per selection rule the
    server's correctness on the kept patches and each image's kept patch count."""

    labels: np.ndarray
    edge_logits: np.ndarray
    edge_ok: np.ndarray
    server_ok: np.ndarray
    num_patches: int
    selections: dict[str, tuple[np.ndarray, np.ndarray]]  # rule → (server right on its patches, kept counts)


@dataclass(frozen=True)
class Point:
    """Accuracy (a fraction) of one deployment choice at a cost within the budget."""

    accuracy: float
    cost: float
    sent: float
    rule: str


def find_cache(path: Path) -> Path:
    """``path`` itself when it holds ``full.npz``; else its (or its ``cache/``'s) only cache folder."""
    if (path / "full.npz").is_file():
        return path
    root = path / "cache" if (path / "cache").is_dir() else path
    found = sorted(p.parent for p in root.glob("*/full.npz"))
    if len(found) != 1:
        where = "no cached eval" if not found else f"{len(found)} cached evals: name one of {[str(p) for p in found]}"
        raise SystemExit(f"{path}: {where}")
    return found[0]


def load(cache: Path) -> Passes:
    with np.load(cache / "full.npz") as full:
        labels, edge_logits, server_logits = full["labels"], full["edge_logits"], full["server_logits"]
        patches = full["edge_attention"].shape[1]  # one score per patch: the grid's patch count
    selections: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for f in sorted(cache.glob(f"{SELECTION_PREFIX}*.npz")):
        with np.load(f) as z:  # masks: N bits MSB first, zero-padded to whole bytes
            kept = np.unpackbits(z["mask"], axis=1)[:, :patches].sum(1).astype(np.int64)
            selections[f.stem.removeprefix(SELECTION_PREFIX)] = (z["pred"] == labels, kept)
    if not selections:
        raise SystemExit(f"{cache}: no edge-attention selections cached (run patchcast eval first)")
    return Passes(labels=labels, edge_logits=edge_logits, edge_ok=edge_logits.argmax(1) == labels,
                  server_ok=server_logits.argmax(1) == labels, num_patches=patches, selections=selections)


def edge_uncertainty(passes: Passes, kind: UncertaintyKind) -> np.ndarray:
    """The gate's value per image as the gate computes it (float32; the margin: low = unsure)."""
    return uncertainty(torch.from_numpy(passes.edge_logits), kind).numpy()


def unsure_first(u: np.ndarray, kind: UncertaintyKind) -> np.ndarray:
    """Images in the order a gate sends them as its threshold moves (the eval's order)."""
    return np.argsort(u if kind == "margin" else -u, kind="stable")


def sent_counts(u: np.ndarray, kind: UncertaintyKind) -> np.ndarray:
    """Images sent at each point of :func:`exact_gate_curve` (ties in the gate's value go together)."""
    ordered = u[unsure_first(u, kind)]
    return np.r_[0, np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True]) + 1]


def best_within(order: np.ndarray, ok: np.ndarray, kept: np.ndarray, edge_ok: np.ndarray, budget: float, *,
                sent_before: tuple[float, int] = (0.0, 0)) -> tuple[float, float, int]:
    """Send the first n images of ``order`` (every n, 0 included; ``kept``: each image's kept fraction):
    the best accuracy at cost ≤ budget, its cost and n. ``sent_before``: (kept fractions, images gained)
    of images already sent another way, which ``order`` leaves out."""
    images = len(edge_ok)
    gain = sent_before[1] + np.concatenate([[0], np.cumsum(ok[order].astype(np.int64) - edge_ok[order])])
    cost = (sent_before[0] + np.concatenate([[0.0], np.cumsum(kept[order])])) / images
    score = np.where(cost <= budget + 1e-12, gain, np.iinfo(np.int64).min)
    n = int(np.argmax(score))
    return (int(edge_ok.sum()) + int(gain[n])) / images, float(cost[n]), n


def best_gate(passes: Passes, kind: UncertaintyKind, budget: float) -> Point:
    """The best point of one gate at cost ≤ budget, at every threshold, over every rule: the eval's own
    curves (:func:`patchcast.eval.frontier.exact_gate_curve`)."""
    u = edge_uncertainty(passes, kind)
    sent = sent_counts(u, kind)
    best = Point(float(passes.edge_ok.mean()), 0.0, 0.0, "edge only")
    for rule, (ok, counts) in passes.selections.items():
        cost, acc = exact_gate_curve(u, kind, passes.edge_ok, ok, counts, passes.num_patches)
        i = int(np.argmax(np.where(cost <= budget + 1e-12, acc, -np.inf)))
        if acc[i] > best.accuracy:
            best = Point(float(acc[i]), float(cost[i]), int(sent[i]) / len(u), rule)
    return best


def split_loss(passes: Passes, point: Point) -> dict[str, float]:
    """At a min-entropy ``point``: the same images sent, answered by the server on whole images instead
    (the gate's share of the loss); the rest is lost to partial images."""
    u = edge_uncertainty(passes, "min_entropy")
    sent = unsure_first(u, "min_entropy")[:round(point.sent * len(u))]
    whole = (int(passes.edge_ok.sum()) + int(passes.server_ok[sent].sum()) - int(passes.edge_ok[sent].sum())) \
        / len(u)
    server = float(passes.server_ok.mean())
    return {"total_points": (point.accuracy - server) * 100, "gate_points": (whole - server) * 100,
            "partial_images_points": (point.accuracy - whole) * 100}


def oracle_gate(passes: Passes, budget: float) -> Point:
    """Send exactly the images the server (on the rule's patches) gets right and the edge wrong,
    cheapest first."""
    best = Point(float(passes.edge_ok.mean()), 0.0, 0.0, "edge only")
    for rule, (ok, counts) in passes.selections.items():
        kept = counts / passes.num_patches
        helps = ok & ~passes.edge_ok
        order = np.concatenate([np.flatnonzero(helps)[np.argsort(kept[helps], kind="stable")],
                                np.flatnonzero(~helps)])
        acc, cost, n = best_within(order, ok, kept, passes.edge_ok, budget)
        if acc > best.accuracy:
            best = Point(acc, cost, n / len(order), rule)
    return best


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties half), by ranks."""
    ranks = np.empty(len(score))
    order = np.argsort(score, kind="stable")
    sorted_scores = score[order]
    ranks[order] = np.arange(1, len(score) + 1)
    for value in np.unique(sorted_scores[np.r_[False, np.diff(sorted_scores) == 0]]):  # average tied ranks
        tied = score == value
        ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def two_level(passes: Passes, budget: float, steps: int = 80) -> tuple[Point, str, float]:
    """The most unsure fraction f of the images with rule a, the next ones (every count) with rule b."""
    order = unsure_first(edge_uncertainty(passes, "min_entropy"), "min_entropy")
    n = len(order)
    best: tuple[Point, str, float] = (Point(float(passes.edge_ok.mean()), 0.0, 0.0, "edge only"), "", 0.0)
    for a, b in itertools.permutations(passes.selections, 2):
        (ok_a, counts_a), (ok_b, counts_b) = passes.selections[a], passes.selections[b]
        kept_a, kept_b = counts_a / passes.num_patches, counts_b / passes.num_patches
        for step in range(1, steps + 1):
            head, rest = order[:n * step // steps], order[n * step // steps:]
            cost_a = float(kept_a[head].sum())
            if cost_a / n > budget:
                break
            gain_a = int(ok_a[head].sum()) - int(passes.edge_ok[head].sum())
            acc, cost, k = best_within(rest, ok_b, kept_b, passes.edge_ok, budget, sent_before=(cost_a, gain_a))
            if acc > best[0].accuracy:
                best = (Point(acc, cost, (len(head) + k) / n, a), b, len(head) / n)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_dir", type=Path, help="a patchcast eval --out folder, its cache/ or one cache folder")
    ap.add_argument("--budget", type=float, default=0.35, help="communication cost budget (default 0.35)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if not 0.0 < args.budget <= 1.0:
        ap.error("--budget must be in (0, 1]")
    passes = load(find_cache(args.eval_dir))
    server = float(passes.server_ok.mean())

    def pts(acc: float) -> str:
        return f"{acc * 100:.2f} % ({(acc - server) * 100:+.2f} points)"

    print(f"{len(passes.labels):,} images: edge {passes.edge_ok.mean() * 100:.2f} %, server on whole images "
          f"{server * 100:.2f} %; budget: comm cost ≤ {args.budget}")
    gates = {kind: best_gate(passes, kind, args.budget) for kind in UNCERTAINTY_KINDS}
    for kind, p in gates.items():
        print(f"  {kind:12s} gate, every η: {pts(p.accuracy)} at cost {p.cost:.3f}, {p.sent:.1%} sent, {p.rule}")
    split = split_loss(passes, gates["min_entropy"])
    print(f"  min-entropy point's loss: {split['total_points']:+.2f} = gate {split['gate_points']:+.2f} "
          f"+ partial images {split['partial_images_points']:+.2f} points")
    oracle = oracle_gate(passes, args.budget)
    print(f"  oracle gate (not deployable): {pts(oracle.accuracy)} at cost {oracle.cost:.3f}, {oracle.rule}")
    u = edge_uncertainty(passes, "min_entropy").astype(np.float64)
    only_server = ~passes.edge_ok & passes.server_ok
    ranks = {"edge_errors": auroc(u, ~passes.edge_ok), "only_server_right": auroc(u, only_server)}
    print(f"  min-entropy AUROC: the edge's errors {ranks['edge_errors']:.3f}, the images only the server "
          f"gets right {ranks['only_server_right']:.3f}")
    two, second, head = two_level(passes, args.budget)
    print(f"  uncertainty-following budget (extension): {pts(two.accuracy)} at cost {two.cost:.3f}: the most "
          f"unsure {head:.1%} with {two.rule}, the next {two.sent - head:.1%} with {second}")
    if args.json is not None:
        figures: dict[str, Any] = {
            "images": len(passes.labels), "budget": args.budget, "edge_accuracy": float(passes.edge_ok.mean()),
            "server_accuracy": server, "gates": {k: asdict(p) for k, p in gates.items()}, "split": split,
            "oracle_gate": asdict(oracle), "auroc": ranks,
            "two_level": {**asdict(two), "second_rule": second, "first_share": head}}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
