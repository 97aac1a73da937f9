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
  another): an extension of the paper's method, its two thresholds chosen on the same images;
* two more extensions, each aimed at one of the two losses: the sent images answered by an ensemble of
  the server (on its patches) and the edge (on the whole image), ``w·log p_server + (1 − w)·log
  p_edge`` at a few weights w (``--fusion-weights``); and a learned gate, logistic models of "sending
  helps" and "sending hurts" on the edge's logits (its sorted log-probabilities and its predicted
  class), scored on images it was not fitted on (2-fold cross-validation over ``--splits`` seeded
  splits; the median split is printed);
* a third, at both losses: the server asks for more patches when it is unsure. The edge sends one rule's
  patches (its min-entropy gate at η); the server, unsure on them (its own min-entropy at η₂ or
  more), asks for the rest of a larger rule's patches (or of the whole image) and answers on all of
  them. The cost counts both rounds. Its pair of rules, η and η₂ are chosen on the same images, as
  above, and, with ``--splits``, also held out: chosen on one half of the images and scored on the
  other (2-fold; the paper's one round is held out the same way beside it).

    python scripts/frontier_losses.py reports/eval-imagenette
    python scripts/frontier_losses.py reports/eval-imagenette --budget 0.5 --json losses.json

Thresholds are chosen on the evaluated images themselves, as the eval's own frontier chooses η: the
figures are what each option can reach at best on this set, not held-out estimates.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

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


def selection_logits(cache: Path) -> dict[str, np.ndarray]:
    """Per edge-attention rule, the server's logits on the kept patches, float32 (``patchcast eval``
    caches them as float16 up to 100 classes)."""
    out: dict[str, np.ndarray] = {}
    for f in sorted(cache.glob(f"{SELECTION_PREFIX}*.npz")):
        with np.load(f) as z:
            if "logits" not in z.files:
                raise SystemExit(f"{f}: no server logits cached (more than 100 classes?): no fusion figures")
            out[f.stem.removeprefix(SELECTION_PREFIX)] = z["logits"].astype(np.float32)
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=-1).numpy()


def fused(passes: Passes, logits: dict[str, np.ndarray], budget: float, weight: float) -> Point:
    """The min-entropy gate at every η, every rule, a sent image answered by the ensemble
    ``weight·log p_server + (1 − weight)·log p_edge`` (the server on its patches, the edge on the image)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError("weight must be in [0, 1]")
    edge = _log_softmax(passes.edge_logits)
    order = unsure_first(edge_uncertainty(passes, "min_entropy"), "min_entropy")
    best = Point(float(passes.edge_ok.mean()), 0.0, 0.0, "edge only")
    for rule, (_, counts) in passes.selections.items():
        ok = (weight * _log_softmax(logits[rule]) + (1.0 - weight) * edge).argmax(1) == passes.labels
        acc, cost, n = best_within(order, ok, counts / passes.num_patches, passes.edge_ok, budget)
        if acc > best.accuracy:
            best = Point(acc, cost, n / len(order), rule)
    return best


def gate_features(edge_logits: np.ndarray) -> np.ndarray:
    """What a learned gate sees of an image: the edge's sorted log-probabilities, its predicted class
    (one-hot) and that class's log-probability in the predicted class's column."""
    logp = _log_softmax(edge_logits)
    top = np.eye(logp.shape[1], dtype=np.float32)[logp.argmax(1)]
    return np.concatenate([-np.sort(-logp, axis=1), top, top * logp.max(1, keepdims=True)], axis=1)


def _logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> Callable[[np.ndarray], np.ndarray]:
    """A logistic regression on standardised features (L-BFGS, L2 ``l2``) → its probability function."""
    xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
    mean, std = xt.mean(0), xt.std(0) + 1e-6
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = F.binary_cross_entropy_with_logits((xt - mean) / std @ w + b, yt) + l2 * (w * w).sum()
        value.backward()
        return value

    opt.step(loss)
    return lambda z: torch.sigmoid((torch.from_numpy(z.astype(np.float32)) - mean) / std @ w + b).detach().numpy()


def learned_gate(passes: Passes, budget: float, *, splits: int = 5, seed: int = 0,
                 features: np.ndarray | None = None) -> tuple[Point, list[float]]:
    """Send the images a model of the edge's logits rates most worth sending: P(the server on the rule's
    patches right, the edge wrong) − P(the reverse), each image rated by models fitted on the other
    half (2-fold cross-validation). Per rule, the median over ``splits`` seeded splits of the best
    accuracy within ``budget``; the best rule's median point and its splits' accuracies. ``features``:
    what the models see of each image (default: :func:`gate_features` of the edge's logits)."""
    x = gate_features(passes.edge_logits) if features is None else features
    n = len(passes.labels)
    best: tuple[Point, list[float]] = (Point(float(passes.edge_ok.mean()), 0.0, 0.0, "edge only"), [])
    for rule, (ok, counts) in passes.selections.items():
        helps, hurts = ok & ~passes.edge_ok, ~ok & passes.edge_ok
        points = []
        for split in range(splits):
            halves = np.array_split(np.random.default_rng(seed + split).permutation(n), 2)
            rating = np.zeros(n)
            for held, fit in ((halves[0], halves[1]), (halves[1], halves[0])):
                if helps[fit].all() or not helps[fit].any() or hurts[fit].all() or not hurts[fit].any():
                    continue  # nothing to learn from this half: its images keep rating 0
                rating[held] = _logistic(x[fit], helps[fit])(x[held]) - _logistic(x[fit], hurts[fit])(x[held])
            acc, cost, k = best_within(np.argsort(-rating, kind="stable"), ok, counts / passes.num_patches,
                                       passes.edge_ok, budget)
            points.append(Point(acc, cost, k / n, rule))
        median = sorted(points, key=lambda p: p.accuracy)[len(points) // 2]
        if median.accuracy > best[0].accuracy:
            best = (median, [p.accuracy for p in points])
    return best


@dataclass(frozen=True)
class TopUp:
    """The server asks for more patches (an extension): the edge sends rule ``first``'s patches of the
    images its min-entropy puts at or above ``eta``; the server, unsure on them (its own min-entropy on
    those patches at or above ``eta2``), asks the device for the rest of rule ``second``'s patches (a
    superset) and answers on all of them. ``sent`` and ``asked``: shares of all images; the cost counts
    every patch sent, both rounds. ``first == second``: one round, the paper's method."""

    accuracy: float
    cost: float
    sent: float
    asked: float
    first: str
    second: str
    eta: float
    eta2: float


FULL = "full"
"""The whole image as a top-up's second round (every patch; the server's own whole-image pass)."""


def selection_masks(cache: Path, rule: str, patches: int) -> np.ndarray:
    """A cached edge-attention rule's kept patches, (n, ``patches``) bool (the file holds them packed, MSB
    first, zero-padded to whole bytes); a rule not in the cache ends the script naming those that are."""
    path = cache / f"{SELECTION_PREFIX}{rule}.npz"
    if not path.is_file():
        cached = sorted(p.stem.removeprefix(SELECTION_PREFIX) for p in cache.glob(f"{SELECTION_PREFIX}*.npz"))
        raise SystemExit(f"{cache}: no cached selection {rule!r} (cached: {cached})")
    with np.load(path) as z:
        return np.unpackbits(z["mask"], axis=1)[:, :patches].astype(bool)


def top_up_rules(cache: Path, passes: Passes) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per edge-attention rule, and :data:`FULL`: (kept patches (n, N) bool, the server right on them, its
    min-entropy on them), from the eval's cached masks and server logits."""
    n = passes.num_patches
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for rule, logits in selection_logits(cache).items():
        out[rule] = (selection_masks(cache, rule, n), logits.argmax(1) == passes.labels, min_entropy(logits))
    with np.load(cache / "full.npz") as full:
        whole = full["server_logits"].astype(np.float32)
    out[FULL] = (np.ones((len(passes.labels), n), dtype=bool), whole.argmax(1) == passes.labels, min_entropy(whole))
    return out


def min_entropy(logits: np.ndarray) -> np.ndarray:
    """Each image's min-entropy −log2 max p from its logits (n, C), as the gates compute it."""
    return uncertainty(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), "min_entropy").numpy()


def top_up_pairs(rules: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[tuple[str, str]]:
    """(first, second) with second's patches a superset of first's on every image, and more on some; and
    every (rule, rule): one round."""
    pairs = [(a, a) for a in rules if a != FULL]
    for (a, (ma, _, _)), (b, (mb, _, _)) in itertools.permutations(rules.items(), 2):
        if a != FULL and bool((mb | ~ma).all()) and bool((mb.sum(1) > ma.sum(1)).any()):
            pairs.append((a, b))
    return pairs


def server_tops_up(rules: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], passes: Passes, budget: float,
                   pairs: list[tuple[str, str]], index: np.ndarray | None = None, sends: int = 161) -> TopUp:
    """The best :class:`TopUp` at cost ≤ ``budget`` on the images ``index`` (all by default): every pair,
    the edge sending its n most unsure images at ``sends`` evenly spaced n, the server asking for more on
    its m most unsure of those, for every m. Thresholds chosen on the same images, as the eval chooses η."""
    idx = np.arange(len(passes.labels)) if index is None else np.asarray(index)
    size, patches = len(idx), passes.num_patches
    u_edge = edge_uncertainty(passes, "min_entropy")[idx]
    edge_ok = passes.edge_ok[idx].astype(np.int64)
    order = np.argsort(-u_edge, kind="stable")
    best = TopUp(float(edge_ok.mean()), 0.0, 0.0, 0.0, "edge only", "edge only", math.inf, math.inf)
    for a, b in pairs:
        ma, ok_a, u_a = (x[idx] for x in rules[a])
        mb, ok_b, _ = (x[idx] for x in rules[b])
        ka, extra = ma.sum(1), mb.sum(1) - ma.sum(1)
        ok_a, ok_b = ok_a.astype(np.int64), ok_b.astype(np.int64)
        for n in np.unique(np.linspace(1, size, sends).astype(np.int64)):
            sent = order[:n]
            base = int(edge_ok.sum()) - int(edge_ok[sent].sum()) + int(ok_a[sent].sum())
            asked = sent[np.argsort(-u_a[sent], kind="stable")] if a != b else sent[:0]
            right = base + np.concatenate([[0], np.cumsum(ok_b[asked] - ok_a[asked])])
            cost = (int(ka[sent].sum()) + np.concatenate([[0], np.cumsum(extra[asked])])) / (size * patches)
            score = np.where(cost <= budget + 1e-12, right, -1)
            m = int(np.argmax(score))
            if score[m] >= 0 and score[m] / size > best.accuracy:
                best = TopUp(float(score[m] / size), float(cost[m]), float(n / size), m / size, a, b,
                             float(u_edge[sent[-1]]), float(u_a[asked[m - 1]]) if m else math.inf)
    return best


def apply_top_up(rules: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], passes: Passes, point: TopUp,
                 index: np.ndarray) -> tuple[float, float]:
    """``point``'s thresholds on the images ``index``: (accuracy, cost)."""
    if point.first not in rules:  # edge only: nothing sent
        return float(passes.edge_ok[index].mean()), 0.0
    ma, ok_a, u_a = (x[index] for x in rules[point.first])
    mb, ok_b, _ = (x[index] for x in rules[point.second])
    send = edge_uncertainty(passes, "min_entropy")[index] >= point.eta
    ask = send & (u_a >= point.eta2) & (point.first != point.second)
    ok = np.where(ask, ok_b, np.where(send, ok_a, passes.edge_ok[index]))
    cost = (ma.sum(1)[send].sum() + (mb.sum(1) - ma.sum(1))[ask].sum()) / (len(index) * passes.num_patches)
    return float(ok.mean()), float(cost)


def top_up_held_out(rules: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], passes: Passes, budget: float,
                    *, splits: int, seed: int = 0, pair: tuple[str, str] | None = None,
                    rule: str | None = None) -> dict[str, list[tuple[float, float]]]:
    """2-fold cross-validation: the top-up's pair and thresholds (and, alike, the one-round method's rule
    and η) chosen on one half of the images, applied to the other; per half, (points against the server
    on that half, cost). ``pair`` / ``rule``: fixed beforehand, only the thresholds chosen."""
    pairs = top_up_pairs(rules)
    one_round = [(a, b) for a, b in pairs if a == b]
    for fixed in (pair, None if rule is None else (rule, rule)):
        if fixed is not None and fixed not in pairs:
            raise ValueError(f"no rule pair {fixed} among the cached selections")
    pairs = pairs if pair is None else [pair]
    one_round = one_round if rule is None else [(rule, rule)]
    n = len(passes.labels)
    out: dict[str, list[tuple[float, float]]] = {"top_up": [], "one_round": []}
    for split in range(splits):
        halves = np.array_split(np.random.default_rng(seed + split).permutation(n), 2)
        for fit, held in ((halves[0], halves[1]), (halves[1], halves[0])):
            for name, candidates in (("top_up", pairs), ("one_round", one_round)):
                acc, cost = apply_top_up(rules, passes, server_tops_up(rules, passes, budget, candidates, fit), held)
                out[name].append(((acc - float(passes.server_ok[held].mean())) * 100, cost))
    return out


def top_up_curves(rules: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], passes: Passes,
                  budgets: np.ndarray) -> dict[str, list[TopUp]]:
    """The best one-round point and the best top-up point at each budget (every rule or pair, every η, η₂)."""
    pairs = top_up_pairs(rules)
    one_round = [(a, b) for a, b in pairs if a == b]
    return {"one_round": [server_tops_up(rules, passes, float(b), one_round) for b in budgets],
            "top_up": [server_tops_up(rules, passes, float(b), pairs) for b in budgets]}


def plot_top_up(curves: dict[str, list[TopUp]], passes: Passes, path: Path, budget: float) -> None:
    """Accuracy against communication cost: the paper's one round and the top-up, each at its best per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    server, edge = 100 * float(passes.server_ok.mean()), 100 * float(passes.edge_ok.mean())
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, label, style in (("one_round", "one round (the paper's method)", "o-"),
                               ("top_up", "the server asks for more (top-up)", "s-")):
        points = curves[name]
        ax.plot([p.cost for p in points], [100 * p.accuracy for p in points], style, ms=3, label=label)
    ax.axhline(server, color="k", lw=0.8, ls="--", label=f"server only ({server:.2f} %)")
    ax.axhline(server - 1.0, color="k", lw=0.6, ls=":", label="1 point below the server")
    ax.axhline(edge, color="0.5", lw=0.8, ls=":", label=f"edge only ({edge:.2f} %)")
    ax.axvline(budget, color="tab:red", lw=0.6, alpha=0.6)
    ax.set_xlabel("communication cost (share of all patches sent, both rounds)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(edge - 1.0, server + 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"Frontier at every η (and η₂), {len(passes.labels):,} images, thresholds chosen on them",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_dir", type=Path, help="a patchcast eval --out folder, its cache/ or one cache folder")
    ap.add_argument("--budget", type=float, default=0.35, help="communication cost budget (default 0.35)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--fusion-weights", type=float, nargs="*", default=[0.5, 0.7, 0.8, 0.9],
                    help="server weights w of the edge + server ensemble (default 0.5 0.7 0.8 0.9; none: skip it)")
    ap.add_argument("--splits", type=int, default=5,
                    help="seeded 2-fold splits of the learned gate and of the top-up's held-out figures (0: skip both)")
    ap.add_argument("--no-top-up", dest="top_up", action="store_false",
                    help="skip the server's top-up of patches (it reads the cached server logits)")
    ap.add_argument("--held-out-pair", nargs=2, metavar=("FIRST", "SECOND"),
                    help="held-out figures with the top-up's pair of rules fixed (e.g. topk-38 topk-75): only η and "
                    "η₂ chosen on each half")
    ap.add_argument("--held-out-rule", metavar="RULE",
                    help="held-out figures with the one round's rule fixed (e.g. sum_threshold-0.97): only η chosen")
    ap.add_argument("--plot", type=Path, help="also draw the one-round and top-up frontiers over comm cost "
                    "0.1 … 0.6 into this PNG (about 1 s per budget)")
    args = ap.parse_args(argv)
    if not 0.0 < args.budget <= 1.0:
        ap.error("--budget must be in (0, 1]")
    if args.plot is not None and not args.top_up:
        ap.error("--plot draws the top-up: drop --no-top-up")
    if any(not 0.0 <= w <= 1.0 for w in args.fusion_weights) or args.splits < 0:
        ap.error("--fusion-weights must be in [0, 1] and --splits ≥ 0")
    cache = find_cache(args.eval_dir)
    passes = load(cache)
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
    fusion: dict[str, Any] = {}
    if args.fusion_weights:
        logits = selection_logits(cache)
        for w in args.fusion_weights:
            point = fused(passes, logits, args.budget, w)
            fusion[f"{w:g}"] = asdict(point)
            print(f"  edge + server ensemble on the sent images (extension), server weight {w:g}: "
                  f"{pts(point.accuracy)} at cost {point.cost:.3f}, {point.sent:.1%} sent, {point.rule}")
    learned: dict[str, Any] = {}
    if args.splits:
        point, per_split = learned_gate(passes, args.budget, splits=args.splits)
        learned = {**asdict(point), "splits": per_split}
        spread = ", ".join(f"{(a - server) * 100:+.2f}" for a in sorted(per_split))
        print(f"  learned gate on the edge's logits (extension, 2-fold cross-validated, median of {args.splits} "
              f"splits): {pts(point.accuracy)} at cost {point.cost:.3f}, {point.rule} (splits: {spread})")
    top_up: dict[str, Any] = {}
    if args.top_up:
        rules = top_up_rules(cache, passes)
        best_top_up = server_tops_up(rules, passes, args.budget, top_up_pairs(rules))
        top_up = {**asdict(best_top_up)}
        print(f"  the server asks for more patches when unsure (extension), every η and η₂: "
              f"{pts(best_top_up.accuracy)} at cost {best_top_up.cost:.3f}: {best_top_up.sent:.1%} sent with "
              f"{best_top_up.first}, {best_top_up.asked:.1%} topped up to {best_top_up.second}")
        if args.splits:
            try:
                held = top_up_held_out(rules, passes, args.budget, splits=args.splits,
                                       pair=None if args.held_out_pair is None else tuple(args.held_out_pair),
                                       rule=args.held_out_rule)
            except ValueError as exc:
                ap.error(str(exc))
            top_up["held_out"] = held
            fixed_pair = "" if args.held_out_pair is None else f", pair fixed: {' → '.join(args.held_out_pair)}"
            fixed_rule = "" if args.held_out_rule is None else f", rule fixed: {args.held_out_rule}"
            for name, label in (("top_up", f"the top-up{fixed_pair}"),
                                ("one_round", f"one round (the paper's method){fixed_rule}")):
                losses = sorted(loss for loss, _ in held[name])
                print(f"    held out (2-fold, {args.splits} splits), {label}: median {float(np.median(losses)):+.2f} "
                      f"points (halves {', '.join(f'{x:+.2f}' for x in losses)}), cost "
                      f"{max(c for _, c in held[name]):.3f} at most")
        if args.plot is not None:
            curves = top_up_curves(rules, passes, np.round(np.arange(0.1, 0.6001, 0.025), 3))
            plot_top_up(curves, passes, args.plot, args.budget)
            top_up["curves"] = {k: [asdict(p) for p in v] for k, v in curves.items()}
            print(f"  frontiers drawn: {args.plot}")
    if args.json is not None:
        figures: dict[str, Any] = {
            "images": len(passes.labels), "budget": args.budget, "edge_accuracy": float(passes.edge_ok.mean()),
            "server_accuracy": server, "gates": {k: asdict(p) for k, p in gates.items()}, "split": split,
            "oracle_gate": asdict(oracle), "auroc": ranks,
            "two_level": {**asdict(two), "second_rule": second, "first_share": head},
            "fusion": fusion, "learned_gate": learned, "top_up": top_up}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
