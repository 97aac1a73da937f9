"""``patchcast eval``: the paper's accuracy / communication trade-off, reproduced offline on real images.

The expensive work is split so that a sweep never re-runs what it need not:

1. **Full-image passes, once per dataset.** The edge model yields logits, last-layer CLS attention
   scores and rollout scores; the server model yields its full-image logits (the server-only
   baseline) and its own attention scores (the "server as semantic encoder" upper bound, Fig. 14).
2. **Selected-patch passes, once per selection** (encoder, score, rule, value): the server classifies
   *every* image from the selected patches only. The server's answer on a selection does not depend
   on the gate, so gates are applied afterwards as masks: an image takes the server's answer when
   the gate sends it and the edge's answer otherwise.
3. **Sweep (pure numpy):** every selection × gate kind × threshold η becomes one operating point.
   The CSV samples η on a grid; the acceptance checks also take the frontier at *every* observed η
   (:func:`exact_gate_curve`) and put a paired bootstrap over images around both
   (:func:`bootstrap_acceptance`).

Everything from steps 1–2 is cached in ``.npz`` files under a cache folder keyed by a fingerprint of
the two models' weights, the data, the precision and the seed, and one file per selection, so a
second run (another ``--max-loss``, more plots) costs seconds.

Communication cost is the paper's metric: (images sent ÷ all) × (patches sent ÷ patches of the sent
images). Bytes are measured, not modelled: the actual selections of a fixed subsample of images are
encoded with the chosen codec (:mod:`shared.codecs`) and divided by the bytes of the same images as
full-image JPEG (quality 90); see :func:`measure_bytes` and :func:`bytes_fraction`.

The model passes are torch; everything from the sweep on is pure numpy over cached arrays, and the
functions it is built from (:func:`send_masks`, :func:`sweep_gate`, :func:`pareto_frontier`, …) are
unit-tested on their own.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating[Any]]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.integer[Any]]

Encoder = Literal["edge", "server"]
ScoreName = Literal["attention", "rollout", "random"]
RuleName = Literal["topk", "threshold", "sum_threshold"]
GateName = Literal["min_entropy", "shannon", "margin"]
RULES: tuple[RuleName, ...] = ("topk", "threshold", "sum_threshold")
GATES: tuple[GateName, ...] = ("min_entropy", "shannon", "margin")
SCORE_SOURCES: tuple[tuple[Encoder, ScoreName], ...] = (("edge", "attention"), ("edge", "rollout"),
                                                       ("server", "attention"))
PAPER_SUM_THRESHOLD = 0.97
PAPER_ETA = 0.8
MAX_CACHED_CLASSES = 100
"""Per-selection server logits are cached (float16) up to this many classes; beyond, only the
predictions: 1000-class logits for 50k images × 60 selections would be ~6 GB."""
REFERENCE_JPEG_QUALITY = 90

ProgressFn = Callable[[str, int, int, str], None]
"""``(phase, done, total, info)``; phases: ``full``, ``subsets``, ``bytes``."""


# --------------------------------------------------------------------------------------------------
# Sweep grids and selection specs
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepGrid:
    """Values swept per rule. Top-k and δ are given relative to the patch count N so that one grid
    fits a 64-patch CIFAR model and a 196-patch DeiT alike."""

    topk_fractions: tuple[float, ...]
    threshold_multiples: tuple[float, ...]  # δ = multiple / N (1/N is the uniform score)
    sum_thresholds: tuple[float, ...]
    eta_quantiles: int  # thresholds at this many evenly spaced quantiles of each gate's uncertainty
    fixed_etas: tuple[float, ...]  # round η values (bits) for the entropy gates, kept for the tables
    fixed_margins: tuple[float, ...]
    # Server passes dominate the run time, so the comparisons that only need one rule get one:
    # rollout and server attention (Figs. 11, 14) use δ_sum only; random twins cover every rule
    # because the acceptance check compares against them point by point.
    comparison_rules: tuple[RuleName, ...] = ("sum_threshold",)


FULL_GRID = SweepGrid(
    topk_fractions=(1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4),
    threshold_multiples=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
    sum_thresholds=(0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99),
    eta_quantiles=40,
    fixed_etas=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0),
    fixed_margins=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
QUICK_GRID = SweepGrid(
    topk_fractions=(1 / 4, 1 / 2),
    threshold_multiples=(1.0,),
    sum_thresholds=(0.8, 0.97),
    eta_quantiles=8,
    fixed_etas=(0.0, 0.4, 0.8, 1.2),
    fixed_margins=(0.5, 1.0),
)
GRIDS = {"full": FULL_GRID, "quick": QUICK_GRID}


@dataclass(frozen=True)
class SelectionSpec:
    """One selection: which model's scores (``encoder``/``score``) and which rule at which value.

    ``score == "random"`` is the score-blind baseline: per image, as many uniformly random patches as
    the edge attention selection with the same rule and value keeps (matched patch counts, so the
    communication cost is identical point by point).
    """

    encoder: Encoder
    score: ScoreName
    rule: RuleName
    value: float
    draw: int = 0  # random specs: which independent draw (0 is the one whose bytes are measured)

    @property
    def id(self) -> str:
        base = f"{self.encoder}-{self.score}-{self.rule}-{self.value:g}"
        return f"{base}-draw{self.draw}" if self.draw else base

    @property
    def twin(self) -> SelectionSpec:
        """The selection whose per-image counts a random spec matches (itself otherwise)."""
        if self.score == "random":
            return SelectionSpec(self.encoder, "attention", self.rule, self.value)
        return self


def rule_values(grid: SweepGrid, rule: RuleName, num_patches: int) -> list[float]:
    if rule == "topk":
        return sorted({float(max(1, round(f * num_patches))) for f in grid.topk_fractions})
    if rule == "threshold":
        return sorted({round(m / num_patches, 6) for m in grid.threshold_multiples})
    return sorted(set(grid.sum_thresholds))


def build_specs(grid: SweepGrid, num_patches: int, *, rollout: bool = True, server_encoder: bool = True,
                random: bool = True, random_draws: int = 1) -> list[SelectionSpec]:
    """Every selection the sweep needs. Twins (edge attention) come before their random specs;
    ``random_draws`` independent random selections per twin (the sweep averages them)."""
    specs: list[SelectionSpec] = []
    for rule in RULES:
        for value in rule_values(grid, rule, num_patches):
            specs.append(SelectionSpec("edge", "attention", rule, value))
            if rollout and rule in grid.comparison_rules:
                specs.append(SelectionSpec("edge", "rollout", rule, value))
            if server_encoder and rule in grid.comparison_rules:
                specs.append(SelectionSpec("server", "attention", rule, value))
            if random:
                specs += [SelectionSpec("edge", "random", rule, value, d) for d in range(random_draws)]
    return specs


def gate_thresholds(u: FloatArray, kind: GateName, grid: SweepGrid) -> list[float]:
    """η values for one gate: evenly spaced quantiles of the observed uncertainty (so sent fractions
    cover 0…1 evenly whatever the model's calibration) plus round values for the tables."""
    qs = np.quantile(np.asarray(u, dtype=np.float64), np.linspace(0.0, 1.0, grid.eta_quantiles + 1))
    fixed = grid.fixed_margins if kind == "margin" else grid.fixed_etas
    values = {round(float(q), 4) for q in qs} | {float(v) for v in fixed}
    hi = 1.0 if kind == "margin" else math.inf
    return sorted({min(hi, max(0.0, v)) for v in values})


# --------------------------------------------------------------------------------------------------
# Pure sweep math
# --------------------------------------------------------------------------------------------------

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


def _exact_frontier(u: FloatArray, kind: GateName, edge_correct: FloatArray | BoolArray,
                    selections: Sequence[Selection], num_patches: int) -> tuple[FloatArray, FloatArray]:
    cost, acc = exact_points(u, kind, edge_correct, selections, num_patches)
    front = pareto_frontier(cost, acc)
    return cost[front], acc[front]


def bootstrap_acceptance(u: FloatArray, kind: GateName, edge_correct: FloatArray, server_correct: FloatArray,
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
    gaps = np.empty((resamples, len(costs)))
    loss = np.empty(resamples)
    for r in range(resamples):
        idx = rng.integers(0, n, n)
        ur, er = np.asarray(u)[idx], np.asarray(edge_correct)[idx]
        mc, ma = _exact_frontier(ur, kind, er, [(ok[idx], c[idx]) for ok, c in method], num_patches)
        bc, ba = _exact_frontier(ur, kind, er, [(ok[idx], c[idx]) for ok, c in baseline], num_patches)
        gaps[r] = [frontier_at(mc, ma, c) - frontier_at(bc, ba, c) for c in costs]
        loss[r] = float(np.mean(np.asarray(server_correct)[idx])) - frontier_at(mc, ma, 0.5)

    def interval(x: FloatArray) -> dict[str, float]:
        lo, hi = np.percentile(100 * x, [2.5, 97.5])
        return {"mean": float(np.mean(100 * x)), "lo": float(lo), "hi": float(hi)}

    return {
        "resamples": resamples,
        "method_minus_baseline": [{"cost": float(c), **interval(gaps[:, i]), "p_below": float(np.mean(gaps[:, i] < 0))}
                                  for i, c in enumerate(costs)],
        "loss_at_cost_0.5": {**interval(loss), "p_over_1_point": float(np.mean(loss > 0.01))},
    }


def bytes_fraction(send: BoolArray, sel_bytes: IntArray, full_bytes: IntArray) -> FloatArray:
    """Bytes on the link ÷ bytes of sending every image as full JPEG, over the bytes subsample.

    ``send`` (T, S) are the gate decisions of the S subsampled images, ``sel_bytes`` (S,) the encoded
    size of each one's actual selection and ``full_bytes`` (S,) its full-image JPEG size. A ratio of
    sums (not a mean of ratios), so it estimates total traffic.
    """
    total = float(np.sum(full_bytes))
    return (np.asarray(send, dtype=np.float64) @ np.asarray(sel_bytes, dtype=np.float64)) / max(total, 1.0)


# --------------------------------------------------------------------------------------------------
# Operating points
# --------------------------------------------------------------------------------------------------

@dataclass
class Point:
    """One row of ``points.csv``. Accuracy is a fraction; ``eta`` is None where no gate applies."""

    encoder: str
    score: str
    rule: str
    value: float | None
    gate: str
    eta: float | None
    images_sent_frac: float
    patch_frac: float
    comm_cost: float
    bytes_frac: float
    accuracy: float
    mean_patches_sent: float
    server_gmacs_per_image: float

    @property
    def label(self) -> str:
        if self.value is None:
            return {"none": "edge only", "full": "full image"}.get(self.rule, self.rule)
        return f"{self.encoder}/{self.score}/{self.rule}={self.value:g}"


CSV_FIELDS = [f for f in Point.__dataclass_fields__]


def write_csv(path: Path, points: Sequence[Point]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for p in points:
            row = asdict(p)
            for k, v in row.items():
                if v is None:
                    row[k] = ""
                elif isinstance(v, float):
                    row[k] = f"{v:.6g}" if k in ("value", "eta") else f"{v:.6f}"
            w.writerow(row)


def read_csv(path: Path) -> list[Point]:
    """Read ``points.csv`` back (for tests and re-plotting)."""
    out: list[Point] = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out.append(Point(
                encoder=r["encoder"], score=r["score"], rule=r["rule"],
                value=float(r["value"]) if r["value"] else None, gate=r["gate"],
                eta=float(r["eta"]) if r["eta"] else None,
                **{k: float(r[k]) for k in CSV_FIELDS[6:]}))
    return out


# --------------------------------------------------------------------------------------------------
# Configuration and cache
# --------------------------------------------------------------------------------------------------

Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class EvalConfig:
    data: str = "cifar10/test.tar"
    edge: str = "zoo:cifar10-edge"
    server: str = "zoo:cifar10-server"
    pretrained: bool = False
    limit: int | None = None
    out: str = "reports/eval"
    cache_dir: str | None = None  # default: OUT/cache
    use_cache: bool = True
    sweep: Literal["full", "quick"] = "full"
    rollout: bool = True
    server_encoder: bool = True
    precision: Precision = "fp32"
    batch_size: int = 64
    max_tokens: int = 4096  # padded tokens per server forward on selected patches
    threads: int | None = None
    codec: str = "jpeg-mosaic"  # the service's default codec (shared.config.CodecConfig)
    codec_params: tuple[tuple[str, int], ...] = ()  # e.g. (("q", 90),); codec defaults otherwise
    bytes_sample: int = 256
    random_draws: int = 1  # independent random-patch draws the random baseline is averaged over
    max_loss: float = 1.0  # accuracy points below server-only
    bootstrap: int = 200  # image resamples for the acceptance checks' confidence intervals (0: none)
    experts: tuple[str, ...] = ()  # specialist model references for the expert-routing comparison
    expert_min_share: float = 0.0  # routing.min_share for the points.csv rows of expert routing
    seed: int = 0
    plots: bool = True
    publish: str | None = None  # a markdown file whose generated section (and img/ figures) to rewrite
    # several generated sections in one file: each run rewrites the one with its name (figures img/NAME-*.png)
    publish_name: str = ""
    command: str = ""  # the command line, recorded in the report

    def __post_init__(self) -> None:
        from shared.errors import ConfigError

        if self.limit is not None and self.limit <= 0:
            raise ConfigError("limit must be positive")
        if self.batch_size < 1 or self.max_tokens < 2 or self.bytes_sample < 1:
            raise ConfigError("batch_size and bytes_sample must be ≥ 1, max_tokens ≥ 2")
        if self.sweep not in GRIDS:
            raise ConfigError(f"sweep must be one of {sorted(GRIDS)}")
        if self.max_loss < 0:
            raise ConfigError("max_loss must be ≥ 0 points")
        if self.random_draws < 1:
            raise ConfigError("random_draws must be ≥ 1")
        if self.bootstrap < 0:
            raise ConfigError("bootstrap must be ≥ 0 resamples")
        if not 0.0 <= self.expert_min_share <= 1.0:
            raise ConfigError("expert_min_share must be in [0, 1]")

    @property
    def grid(self) -> SweepGrid:
        return GRIDS[self.sweep]


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(model: Any) -> str:
    """Hash of a model's weights: the cache follows the weights, whatever reference loaded them."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def data_fingerprint(samples: Sequence[Any]) -> str:
    """Hash of sample keys, sizes, labels and a digest of the bytes: cheap even for 50k images."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.key}\0{len(s.data)}\0{s.label}\0".encode())
        h.update(hashlib.blake2b(s.data, digest_size=8).digest())
    return h.hexdigest()[:16]


class Cache:
    """One folder per (edge weights, server weights, data, precision, seed); one npz per product."""

    def __init__(self, root: Path | None, key_parts: dict[str, Any]) -> None:
        self.key = _sha(key_parts)
        self.dir = root / self.key if root is not None else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = self.dir / "meta.json"
            if not meta.is_file():
                meta.write_text(json.dumps(key_parts, indent=2, sort_keys=True) + "\n")

    def load(self, name: str) -> dict[str, np.ndarray] | None:
        if self.dir is None or not (self.dir / f"{name}.npz").is_file():
            return None
        try:
            with np.load(self.dir / f"{name}.npz") as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError):  # a truncated file from an interrupted run: recompute
            return None

    def save(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        if self.dir is None:
            return
        tmp = self.dir / f"{name}.tmp.npz"
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(self.dir / f"{name}.npz")  # atomic: readers never see half a file


# --------------------------------------------------------------------------------------------------
# Model passes (torch)
# --------------------------------------------------------------------------------------------------

@dataclass
class Arrays:
    """Everything the sweep needs, per image (B = images, N = patches)."""

    num_patches: int
    labels: IntArray
    edge_logits: FloatArray
    server_logits: FloatArray
    scores: dict[tuple[str, str], FloatArray]  # (encoder, score) → (B, N) float32
    counts: dict[str, IntArray] = field(default_factory=dict)  # spec id → (B,)
    packed_masks: dict[str, np.ndarray] = field(default_factory=dict)  # spec id → (B, ceil(N/8)) bits
    server_pred: dict[str, IntArray] = field(default_factory=dict)  # spec id → (B,)
    compute_seconds: float = 0.0  # model passes, whenever they ran (cached products included)

    def masks(self, spec_id: str, rows: IntArray) -> BoolArray:
        """Kept-patch masks of some images (unpacked on demand: all of them would be B × N × specs)."""
        return np.unpackbits(self.packed_masks[spec_id][rows], axis=1, count=self.num_patches).astype(bool)


def resolve_precision(precision: Precision) -> bool:
    """True for bf16 autocast. ``auto`` takes bf16 where a probe measures it clearly faster than fp32
    here (:mod:`shared.precision`)."""
    from shared.precision import resolve

    return resolve(precision) == "bf16"


def default_threads() -> int:
    """Torch's thread count on an idle machine, fewer on a busy one. OpenMP workers meet at a barrier
    after every op; when other processes hold the cores, each op waits for a descheduled thread
    (measured here: 25× slower for small batches at 2 threads on 2 busy cores than at 1)."""
    import torch

    cores = os.cpu_count() or 1
    free = cores - os.getloadavg()[0]
    return max(1, min(torch.get_num_threads(), int(free + 0.5)))


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _autocast(bf16: bool) -> Any:
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def _select_masks(scores: FloatArray, spec: SelectionSpec, num_patches: int) -> BoolArray:
    """(B, N) kept-patch masks for a non-random spec, through :mod:`shared.selection`."""
    from shared.selection import SelectionRule, select_batch

    rule = SelectionRule(spec.rule, int(spec.value) if spec.rule == "topk" else spec.value)
    masks = np.zeros((scores.shape[0], num_patches), dtype=bool)
    for i, sel in enumerate(select_batch(scores, rule)):
        masks[i, sel.indices] = True
    return masks


def padded_groups(counts: IntArray, max_tokens: int) -> list[IntArray]:
    """Split images into forwards: sorted by patch count, consecutive runs whose padded size
    (images × (largest count + CLS)) fits ``max_tokens``. Sorting keeps padding small; small
    forwards are the fast ones on CPU (activations stay in cache)."""
    order = np.argsort(np.asarray(counts), kind="stable")
    sorted_counts = np.asarray(counts)[order]
    groups: list[IntArray] = []
    s = 0
    while s < len(order):
        e = s + 1
        while e < len(order) and (e + 1 - s) * (int(sorted_counts[e]) + 1) <= max_tokens:
            e += 1
        groups.append(order[s:e])
        s = e
    return groups


def _server_on_masks(server: Any, tokens: Any, masks: BoolArray, max_tokens: int, bf16: bool) -> FloatArray:
    """Server logits (B, C) float32 from the kept tokens only, in padded groups with a key-padding
    mask (padding is never attended to, so each image's result is its own; see shared.subset)."""
    import torch

    from shared.subset import forward_tokens, gather_tokens

    counts = masks.sum(axis=1)
    out = np.zeros((len(counts), int(server.num_classes)), dtype=np.float32)
    for rows in padded_groups(counts, max_tokens):
        k = int(counts[rows].max())
        # Kept indices first, ascending (row-major, the order a device packs them in), then padding.
        idx = np.argsort(~masks[rows], axis=1, kind="stable")[:, :max(k, 1)]
        valid = np.arange(idx.shape[1])[None, :] < counts[rows][:, None]
        kpm = None if valid.all() else torch.from_numpy(valid)
        with _autocast(bf16):
            kept = gather_tokens(tokens[torch.from_numpy(rows)], torch.from_numpy(idx))
            logits = forward_tokens(server, kept, key_padding_mask=kpm)
        out[rows] = logits.float().numpy()
    return out


def _full_passes(edge: Any, server: Any, pixels: Any, edge_pre: Any, server_pre: Any, batch: int,
                 bf16: bool, rollout: bool) -> dict[str, np.ndarray]:
    from shared.attention import edge_forward
    from shared.datasets import normalize
    from shared.scores import scores_from_output

    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("edge_logits", "edge_attention", "edge_rollout",
                                                         "server_logits", "server_attention")}
    for s, e in _chunks(len(pixels), batch):
        with _autocast(bf16):
            out = edge_forward(edge, normalize(pixels[s:e], edge_pre), all_layers=rollout)
            sout = edge_forward(server, normalize(pixels[s:e], server_pre))
        parts["edge_logits"].append(out.logits.float().numpy())
        parts["edge_attention"].append(scores_from_output(out, "attention").numpy())
        if rollout:
            parts["edge_rollout"].append(scores_from_output(out, "rollout").numpy())
        parts["server_logits"].append(sout.logits.float().numpy())
        parts["server_attention"].append(scores_from_output(sout, "attention").numpy())
        del out, sout
    return {k: np.concatenate(v) for k, v in parts.items() if v}


def compute_passes(cfg: EvalConfig, ds: Any, edge_m: Any, server_m: Any, specs: Sequence[SelectionSpec],
                   cache: Cache, bf16: bool, report: ProgressFn) -> Arrays:
    """Full-image passes and one server pass per selection, each skipped when cached.

    Images are processed in chunks whose server tokens fit in ~512 MB (all of CIFAR-10 in one);
    inside a chunk the server's patch embeddings are computed once and every selection gathers
    from them. Results are saved as soon as their last chunk is done, so an interrupted run keeps
    what it finished.
    """
    import torch

    from shared import datasets
    from shared.models import set_fused_attention
    from shared.subset import embed_all

    n_patches = edge_m.num_patches
    edge_pre, server_pre = edge_m.preprocess, server_m.preprocess
    full = cache.load("full")
    if full is not None and cfg.rollout and "edge_rollout" not in full:
        full = None
    cached = {sp.id: cache.load(f"sel-{sp.id}") for sp in specs}
    todo = [sp for sp in specs if cached[sp.id] is None]
    chunk = max(64, int(512e6 // (n_patches * server_m.embed_dim * 4)))
    bounds = list(_chunks(len(ds), chunk))
    parts: dict[str, list[np.ndarray]] = {}
    sel_parts: dict[str, dict[str, list[np.ndarray]]] = {sp.id: {"mask": [], "pred": []} for sp in todo}
    done_units = 0
    spent: dict[str, float] = {}  # compute seconds per product
    for c_start, c_end in bounds if (full is None or todo) else []:
        last_chunk = c_end == len(ds)
        # The pixels a device owns: the edge's resize + crop; each model normalises them its own way.
        pixels, labels = datasets.to_tensor_batch(ds.samples[c_start:c_end], edge_pre)
        if full is None:
            # Only the last block's map is read from the server: the others may stay fused (faster).
            set_fused_attention(server_m.model, True)
            last_attn: Any = server_m.model.blocks[-1].attn
            last_attn.fused_attn = False
            t0 = time.perf_counter()
            got = _full_passes(edge_m.model, server_m.model, pixels, edge_pre, server_pre, cfg.batch_size,
                               bf16, cfg.rollout)
            spent["full"] = spent.get("full", 0.0) + time.perf_counter() - t0
            got["labels"] = labels.numpy()
            for k, v in got.items():
                parts.setdefault(k, []).append(v)
            report("full", c_end, len(ds), "edge + server on full images")
            source, offset = got, 0
            if last_chunk:
                full = {k: np.concatenate(v) for k, v in parts.items()}
                full["seconds"] = np.array(spent["full"])  # compute time, reported by later cached runs
                cache.save("full", full)
        else:
            source, offset = full, c_start
        if not todo:
            continue
        scores: dict[tuple[str, str], FloatArray] = {
            src: source[f"{src[0]}_{src[1]}"][offset:offset + c_end - c_start] for src in SCORE_SOURCES
            if f"{src[0]}_{src[1]}" in source}
        set_fused_attention(server_m.model, True)
        with _autocast(bf16):
            tokens = torch.cat([embed_all(server_m.model, datasets.normalize(pixels[s:e], server_pre))
                                for s, e in _chunks(len(pixels), cfg.batch_size)])
        masks_of: dict[str, BoolArray] = {}
        for sp in todo:
            t0 = time.perf_counter()
            if sp.score == "random":
                twin = masks_of.get(sp.twin.id)
                if twin is None:
                    twin = _select_masks(scores[("edge", "attention")], sp.twin, n_patches)
                # Seeded by the spec and the chunk, so a rerun draws the same patches.
                rng = np.random.default_rng([cfg.seed, c_start, *sp.id.encode()])
                masks = random_matched_selection(twin.sum(axis=1), n_patches, rng)
            else:
                masks = _select_masks(scores[(sp.encoder, sp.score)], sp, n_patches)
                masks_of[sp.id] = masks
            logits = _server_on_masks(server_m.model, tokens, masks, cfg.max_tokens, bf16)
            spent[sp.id] = spent.get(sp.id, 0.0) + time.perf_counter() - t0
            sel_parts[sp.id]["mask"].append(np.packbits(masks, axis=1))
            sel_parts[sp.id]["pred"].append(logits.argmax(axis=1).astype(np.int32))
            if logits.shape[1] <= MAX_CACHED_CLASSES:
                sel_parts[sp.id].setdefault("logits", []).append(logits.astype(np.float16))
            if last_chunk:
                result = {k: np.concatenate(v) for k, v in sel_parts.pop(sp.id).items()}
                result["seconds"] = np.array(spent[sp.id])
                cache.save(f"sel-{sp.id}", result)
                cached[sp.id] = result
            done_units += 1
            report("subsets", done_units, len(todo) * len(bounds), sp.id)
        del tokens
    assert full is not None
    data = Arrays(num_patches=n_patches, labels=full["labels"].astype(np.int64),
                  edge_logits=full["edge_logits"], server_logits=full["server_logits"],
                  scores={src: full[f"{src[0]}_{src[1]}"] for src in SCORE_SOURCES
                          if f"{src[0]}_{src[1]}" in full})
    data.compute_seconds = float(full.get("seconds", 0.0))
    for sp in specs:
        a = cached[sp.id]
        assert a is not None
        data.compute_seconds += float(a.get("seconds", 0.0))
        data.packed_masks[sp.id] = a["mask"]
        data.counts[sp.id] = np.unpackbits(a["mask"], axis=1, count=n_patches).sum(axis=1)
        data.server_pred[sp.id] = a["pred"].astype(np.int64)
    return data


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    points: list[Point]
    summary: dict[str, Any]
    files: list[Path]


def load_expert(ref: str, server_m: Any) -> Any:
    """A specialist for the expert-routing comparison: a checkpoint that names the global class ids
    of its outputs (``patchcast train --classes``) and sees the server's image and patch grid."""
    from shared.errors import ModelError
    from shared.models import build_model, check_server_layout

    expert = build_model(ref, role="server")
    check_server_layout(expert, ref)
    if not expert.class_ids:
        raise ModelError(f"{ref}: not a specialist (its checkpoint names no class ids; train one with "
                         "'patchcast train --classes')")
    if max(expert.class_ids) >= server_m.num_classes:
        raise ModelError(f"{ref}: class ids {expert.class_ids} exceed the server's {server_m.num_classes} classes")
    if (expert.grid, expert.patch_size, expert.preprocess.input_size) != (
            server_m.grid, server_m.patch_size, server_m.preprocess.input_size):
        raise ModelError(f"{ref}: another image size or patch grid than the server's")
    return expert


def expert_specs(specs: Sequence[SelectionSpec]) -> list[SelectionSpec]:
    """The selections expert routing is compared on: edge attention under the paper's δ_sum rule."""
    return [sp for sp in specs if sp.encoder == "edge" and sp.score == "attention" and sp.rule == "sum_threshold"]


EXPERT_TOPK = 5  # the edge top-k a request carries, over which routing weighs probability mass
EXPERT_MIN_SHARES = (0.0, 0.9, 0.95, 0.99)  # routing.min_share values the report compares


def route_images(edge_logits: FloatArray, experts: Sequence[Any], top_k: int = EXPERT_TOPK,
                 min_share: float = 0.0) -> IntArray:
    """Per image, the index of the expert :class:`shared.routing.ExpertRouter` picks from the edge's
    top-k softmax (as a device does), or -1 for the general server."""
    import torch

    from shared.routing import Expert, ExpertRouter

    router = ExpertRouter(tuple(Expert(f"e{i}", frozenset(m.class_ids)) for i, m in enumerate(experts)),
                          fallback="general", top_k=top_k, min_share=min_share)
    probs = torch.softmax(torch.from_numpy(np.asarray(edge_logits, dtype=np.float32)), dim=-1)
    top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    picks = [router.route(i.tolist(), p.tolist()) for i, p in zip(top_i, top_p, strict=True)]
    return np.array([-1 if m == "general" else int(m[1:]) for m in picks], dtype=np.int64)


def routed_predictions(route: IntArray, expert_preds: IntArray, general: IntArray) -> IntArray:
    """Each image's answer under ``route``: its expert's row of ``expert_preds`` (E, B), else ``general``."""
    out = np.asarray(general, dtype=np.int64).copy()
    rows = np.flatnonzero(route >= 0)
    out[rows] = expert_preds[route[rows], rows]
    return out


def expert_passes(cfg: EvalConfig, ds: Any, experts: Sequence[Any], data: Arrays, specs: Sequence[SelectionSpec],
                  cache: Cache, bf16: bool, report: ProgressFn) -> dict[str, IntArray]:
    """Every specialist on every image's kept patches, per selection: (E, B) global class ids.

    Computing all images (not only those routed) makes any routing rule a cheap combination of
    cached answers (:func:`routed_predictions`). Cached per expert's weights and selection."""
    import torch

    from shared import datasets
    from shared.models import set_fused_attention
    from shared.subset import embed_all

    out: dict[str, IntArray] = {sp.id: np.zeros((len(experts), len(data.labels)), dtype=np.int64) for sp in specs}
    done, total = 0, len(experts) * len(specs) * len(data.labels)
    for e, expert in enumerate(experts):
        tag = _sha([weights_fingerprint(expert.model), expert.class_ids])
        todo = []
        for sp in specs:
            got = cache.load(f"expert-{tag}-{sp.id}")
            if got is None:
                todo.append(sp)
            else:
                out[sp.id][e] = got["pred"]
                done += len(data.labels)
        if not todo:
            continue
        set_fused_attention(expert.model, True)
        ids = np.asarray(expert.class_ids, dtype=np.int64)
        for c_start, c_end in _chunks(len(data.labels), 2048):
            rows = np.arange(c_start, c_end)
            pixels, _ = datasets.to_tensor_batch(ds.samples[c_start:c_end], expert.preprocess)
            with _autocast(bf16):
                tokens = torch.cat([embed_all(expert.model, datasets.normalize(pixels[s:t], expert.preprocess))
                                    for s, t in _chunks(len(pixels), cfg.batch_size)])
            for sp in todo:
                logits = _server_on_masks(expert.model, tokens, data.masks(sp.id, rows), cfg.max_tokens, bf16)
                out[sp.id][e, rows] = ids[logits.argmax(axis=1)]
                done += len(rows)
                report("experts", done, total, f"expert {e}, {sp.id}")
        for sp in todo:
            cache.save(f"expert-{tag}-{sp.id}", {"pred": out[sp.id][e]})
    return out


def run_eval(cfg: EvalConfig, progress: ProgressFn | None = None) -> EvalResult:
    """Run (or load from cache) every pass, sweep, and write CSV, tables, plots and a report."""
    import torch

    from shared import datasets
    from shared.codecs import get_codec
    from shared.errors import ConfigError, ModelError
    from shared.models import build_model, check_server_layout

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    # Fail on a bad codec name or parameter now, not after the model passes.
    get_codec(cfg.codec).resolve_params(dict(cfg.codec_params))
    threads = cfg.threads or default_threads()
    torch.set_num_threads(threads)
    report = progress or (lambda *_: None)
    bf16 = resolve_precision(cfg.precision)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    edge_m = build_model(cfg.edge, pretrained=cfg.pretrained, role="edge")
    # Built unfused too: the server's own attention map is the "server as semantic encoder" score.
    server_m = build_model(cfg.server, pretrained=cfg.pretrained, role="edge")
    check_server_layout(server_m, cfg.server)
    if edge_m.grid != server_m.grid or edge_m.patch_size != server_m.patch_size:
        raise ModelError(f"edge grid {edge_m.grid}×{edge_m.patch_size}px and server grid "
                         f"{server_m.grid}×{server_m.patch_size}px differ: patches cannot be shared")
    if edge_m.preprocess.input_size != server_m.preprocess.input_size:
        raise ModelError("edge and server expect different input sizes")
    n_patches = edge_m.num_patches
    experts = [load_expert(ref, server_m) for ref in cfg.experts]
    ds = datasets.load(cfg.data).spread(cfg.limit, seed=cfg.seed)
    if len(ds) == 0:
        raise ConfigError(f"{cfg.data}: no images")
    if any(s.label is None for s in ds.samples):
        raise ConfigError(f"{cfg.data}: accuracy needs labels (an ImageFolder tree, a tar of one, "
                          "or labels.csv)")
    timings["load_s"] = time.perf_counter() - t_start

    key_parts = {"edge": weights_fingerprint(edge_m.model), "server": weights_fingerprint(server_m.model),
                 "data": data_fingerprint(ds.samples), "images": len(ds), "bf16": bf16, "seed": cfg.seed,
                 "edge_pre": edge_m.preprocess.to_json(), "server_pre": server_m.preprocess.to_json(),
                 "format": 1}
    cache_root = None if not cfg.use_cache else Path(cfg.cache_dir) if cfg.cache_dir else out_dir / "cache"
    cache = Cache(cache_root, key_parts)
    specs = build_specs(cfg.grid, n_patches, rollout=cfg.rollout, server_encoder=cfg.server_encoder,
                        random_draws=cfg.random_draws)

    t0 = time.perf_counter()
    with torch.inference_mode():
        data = compute_passes(cfg, ds, edge_m, server_m, specs, cache, bf16, report)
    timings["passes_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sample, full_bytes, sel_bytes, file_bytes = measure_bytes(cfg, ds, edge_m.preprocess, edge_m.patch_size,
                                                              data, [sp for sp in specs if not sp.draw],
                                                              cache, report)
    timings["bytes_s"] = time.perf_counter() - t0

    all_experts: dict[str, IntArray] | None = None
    expert_preds: dict[str, IntArray] | None = None
    if experts:
        t0 = time.perf_counter()
        with torch.inference_mode():
            all_experts = expert_passes(cfg, ds, experts, data, expert_specs(specs), cache, bf16, report)
        route = route_images(data.edge_logits, experts, min_share=cfg.expert_min_share)
        expert_preds = {sid: routed_predictions(route, preds, data.server_pred[sid])
                        for sid, preds in all_experts.items()}
        timings["experts_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    points, gate_u = sweep(cfg, data, specs, n_patches, server_m, sample, full_bytes, sel_bytes, expert_preds)
    timings["sweep_s"] = time.perf_counter() - t0

    summary = summarise(cfg, data, points, n_patches, edge_m, server_m, gate_u, specs, len(sample))
    if all_experts is not None:
        summary["experts"] = summarise_experts(cfg, data, experts, all_experts, gate_u, n_patches)
    summary["bytes"] = {"sample": len(sample), "codec": cfg.codec, "codec_params": dict(cfg.codec_params),
                        "reference_mean_bytes": float(np.mean(full_bytes)),
                        "jpeg_file_mean_bytes": file_bytes}
    summary["threads"] = threads
    summary["compute_s"] = round(data.compute_seconds, 1)
    summary["precision"] = "bf16" if bf16 else "fp32"
    summary["cache"] = str(cache.dir) if cache.dir else None
    timings["total_s"] = time.perf_counter() - t_start  # up to the sweep; writing outputs is extra
    summary["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    files = write_outputs(cfg, out_dir, points, summary, data, specs, n_patches, gate_u)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return EvalResult(points=points, summary=summary, files=[out_dir / "summary.json", *files])


# --------------------------------------------------------------------------------------------------
# Bytes on the wire
# --------------------------------------------------------------------------------------------------

def reference_bytes(pixels: np.ndarray, patch_size: int) -> int:
    """The full image as PatchCast would send it: the ``jpeg`` codec (table-less baseline JPEG,
    quality 90, 4:2:0) with every patch kept. Table-less on both sides keeps the ratio honest: the
    ~610 header bytes a JPEG *file* would add are not on the wire for either."""
    from shared.codecs import full_image_payload_bytes

    return full_image_payload_bytes(pixels, patch_size, REFERENCE_JPEG_QUALITY)


def jpeg_file_bytes(pixels: np.ndarray, quality: int = REFERENCE_JPEG_QUALITY) -> int:
    """Size of the same image as a standalone JPEG file (Pillow, headers included), for reference."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.tell()


def measure_bytes(cfg: EvalConfig, ds: Any, pre: Any, patch_size: int, data: Arrays,
                  specs: Sequence[SelectionSpec], cache: Cache,
                  report: ProgressFn) -> tuple[IntArray, IntArray, dict[str, IntArray], float]:
    """Encode the actual selections (the cached masks) of a fixed, seeded subsample of images with
    the chosen codec. Returns the subsample, its reference sizes (:func:`reference_bytes`), each
    selection's payload sizes, and the mean standalone JPEG file size of the subsample."""
    from shared import datasets
    from shared.codecs import get_codec

    codec = get_codec(cfg.codec)
    params = codec.resolve_params(dict(cfg.codec_params))
    n = len(data.labels)
    size = min(cfg.bytes_sample, n)
    sample = np.sort(np.random.default_rng([cfg.seed, 7]).permutation(n)[:size])
    name = "bytes-" + _sha({"codec": cfg.codec, "params": params, "size": size})
    cached = cache.load(name) or {}
    todo = [sp for sp in specs if sp.id not in cached]
    if "__reference__" in cached and not todo:
        sizes = {sp.id: cached[sp.id] for sp in specs}
        return sample, cached["__reference__"], sizes, float(cached["__file__"])
    pixels, _ = datasets.to_tensor_batch([ds.samples[int(i)] for i in sample], pre)
    px = pixels.numpy()
    ref = cached.get("__reference__")
    if ref is None:
        ref = np.array([reference_bytes(p, patch_size) for p in px], dtype=np.int64)
    file_mean = np.array(float(np.mean([jpeg_file_bytes(p) for p in px])))
    out = {sp.id: cached[sp.id] for sp in specs if sp.id in cached}
    for j, sp in enumerate(todo):
        masks = data.masks(sp.id, sample)
        # Score-aware codecs (jpeg-tiered) rank kept patches by the encoder's scores; a random
        # selection has none of its own, so it borrows the edge attention.
        scores = data.scores[(sp.encoder, "attention" if sp.score == "random" else sp.score)][sample]
        lengths = []
        for i in range(size):
            idx = np.flatnonzero(masks[i])
            lengths.append(len(codec.encode(px[i], idx, patch_size, params, scores=scores[i][idx])))
        out[sp.id] = np.array(lengths, dtype=np.int64)
        report("bytes", j + 1, len(todo), sp.id)
    cache.save(name, {"__reference__": ref, "__file__": file_mean, **out})
    return sample, ref, out, float(file_mean)


# --------------------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------------------

def spec_correctness(data: Arrays, specs: Sequence[SelectionSpec]) -> Iterator[tuple[SelectionSpec, FloatArray]]:
    """Each selection with the server's per-image correctness on it; a random selection's draws are
    averaged into its draw 0 (its expected correctness, in [0, 1])."""
    draws: dict[str, list[str]] = {}  # a random spec's id → the ids of all its draws
    for sp in specs:
        draws.setdefault(replace(sp, draw=0).id, []).append(sp.id)
    for sp in specs:
        if not sp.draw:
            yield sp, np.mean([data.server_pred[i] == data.labels for i in draws[sp.id]], axis=0)


def selections_of(data: Arrays, specs: Sequence[SelectionSpec], *, score: ScoreName,
                  encoder: Encoder = "edge") -> list[Selection]:
    """Per-image correctness and patch counts of one score's selections, every rule and value."""
    return [(correct, data.counts[sp.id]) for sp, correct in spec_correctness(data, specs)
            if sp.encoder == encoder and sp.score == score]


def sweep(cfg: EvalConfig, data: Arrays, specs: Sequence[SelectionSpec], n_patches: int, server_m: Any,
          sample: IntArray, full_bytes: IntArray, sel_bytes: dict[str, IntArray],
          expert_preds: dict[str, IntArray] | None = None) -> tuple[list[Point], dict[str, FloatArray]]:
    """Every operating point: baselines, then each selection × (no gate, each gate × each η); with
    ``expert_preds``, the same selections answered by expert routing (score ``experts``)."""
    import torch

    from shared.costs import communication_cost, model_flops
    from shared.gates import uncertainty

    n = len(data.labels)
    edge_correct = data.edge_logits.argmax(1) == data.labels
    server_correct = data.server_logits.argmax(1) == data.labels
    macs = np.array([model_flops(server_m, k + 1) for k in range(n_patches + 1)]) / 1e9
    logits_t = torch.from_numpy(np.ascontiguousarray(data.edge_logits))
    gate_u: dict[str, FloatArray] = {g: uncertainty(logits_t, g).numpy() for g in GATES}
    gate_eta = {g: gate_thresholds(gate_u[g], g, cfg.grid) for g in GATES}
    points: list[Point] = []

    def add(encoder: str, score: str, rule: str, value: float | None, gate: str, etas: Sequence[float | None],
            send: BoolArray, correct: BoolArray | FloatArray, counts: IntArray, sbytes: IntArray) -> None:
        gs = sweep_gate(edge_correct, correct, counts, send)
        bf = bytes_fraction(send[:, sample], sbytes, full_bytes)
        for t, eta in enumerate(etas):
            k, p = int(gs.images_sent[t]), int(gs.patches_sent[t])
            cost = communication_cost(k, n, p, k * n_patches)
            points.append(Point(
                encoder=encoder, score=score, rule=rule, value=value, gate=gate, eta=eta,
                images_sent_frac=k / n, patch_frac=p / (k * n_patches) if k else 0.0, comm_cost=cost,
                bytes_frac=float(bf[t]), accuracy=float(gs.accuracy[t]),
                mean_patches_sent=p / k if k else 0.0,
                server_gmacs_per_image=float(send[t].astype(np.float64) @ macs[counts]) / n))

    all_send = np.ones((1, n), dtype=bool)
    none_send = np.zeros((1, n), dtype=bool)
    full_counts = np.full(n, n_patches, dtype=np.int64)
    add("", "", "none", None, "none", [None], none_send, server_correct, full_counts, full_bytes)
    add("", "", "full", None, "none", [None], all_send, server_correct, full_counts, full_bytes)
    for g in GATES:
        add("", "", "full", None, g, gate_eta[g], send_masks(gate_u[g], g, gate_eta[g]), server_correct,
            full_counts, full_bytes)
    for sp, correct in spec_correctness(data, specs):
        counts = data.counts[sp.id]
        sb = sel_bytes[sp.id]
        add(sp.encoder, sp.score, sp.rule, sp.value, "none", [None], all_send, correct, counts, sb)
        for g in GATES:
            add(sp.encoder, sp.score, sp.rule, sp.value, g, gate_eta[g],
                send_masks(gate_u[g], g, gate_eta[g]), correct, counts, sb)
    for sid, pred in (expert_preds or {}).items():
        sp = next(x for x in specs if x.id == sid)
        correct = pred == data.labels
        counts, sb = data.counts[sid], sel_bytes[sid]
        add(sp.encoder, "experts", sp.rule, sp.value, "none", [None], all_send, correct, counts, sb)
        add(sp.encoder, "experts", sp.rule, sp.value, "min_entropy", gate_eta["min_entropy"],
            send_masks(gate_u["min_entropy"], "min_entropy", gate_eta["min_entropy"]), correct, counts, sb)
    return points, gate_u


# --------------------------------------------------------------------------------------------------
# Summary, tables, plots
# --------------------------------------------------------------------------------------------------

def _is_method(p: Point, gate: str = "min_entropy", score: str = "attention", encoder: str = "edge",
               rules: Sequence[str] = RULES) -> bool:
    """Edge attention selection (any of ``rules``) under ``gate`` (its η = 0 twin: no gate)."""
    return (p.encoder == encoder and p.score == score and p.rule in rules and p.gate in (gate, "none"))


def _deployable(p: Point) -> bool:
    """What a device can run: every point except those whose patches the *server* chose (the
    server's attention needs the full image, so those are an upper bound, not a configuration)."""
    return p.encoder != "server"


def _is_full(p: Point, gate: str) -> bool:
    """Full images under ``gate`` (the gate alone, no patch selection)."""
    return p.rule == "full" and p.gate in (gate, "none")


def _edge_only(points: Sequence[Point]) -> Point:
    return next(p for p in points if p.rule == "none")


def _server_only(points: Sequence[Point]) -> Point:
    return next(p for p in points if p.rule == "full" and p.gate == "none")


def series(points: Sequence[Point], pred: Callable[[Point], bool], *, with_edge_only: bool = True,
           x: str = "comm_cost") -> tuple[FloatArray, FloatArray]:
    chosen = [p for p in points if pred(p)]
    if with_edge_only:
        chosen.append(_edge_only(points))
    return (np.array([getattr(p, x) for p in chosen], dtype=np.float64),
            np.array([p.accuracy for p in chosen], dtype=np.float64))


def frontier_points(points: Sequence[Point], pred: Callable[[Point], bool]) -> list[Point]:
    chosen = [p for p in points if pred(p)] + [_edge_only(points)]
    idx = pareto_frontier(np.array([p.comm_cost for p in chosen]), np.array([p.accuracy for p in chosen]))
    return [chosen[int(i)] for i in idx]


def best_point(points: Sequence[Point], pred: Callable[[Point], bool], min_accuracy: float) -> Point | None:
    """Cheapest point (comm cost, then higher accuracy) with accuracy ≥ ``min_accuracy``."""
    ok = [p for p in points if pred(p) and p.accuracy >= min_accuracy - 1e-12]
    return min(ok, key=lambda p: (p.comm_cost, -p.accuracy)) if ok else None


def _find(points: Sequence[Point], **kw: Any) -> Point | None:
    for p in points:
        if all((abs(getattr(p, k) - v) < 1e-9 if isinstance(v, float) and getattr(p, k) is not None
                else getattr(p, k) == v) for k, v in kw.items()):
            return p
    return None


def describe(p: Point) -> str:
    """One line naming an operating point, e.g. ``edge/attention/sum_threshold=0.97, min_entropy η=0.8``."""
    gate = "no gate" if p.gate == "none" else f"{p.gate} η={p.eta:g}"
    return p.label if p.rule == "none" else f"{p.label}, {gate}"


def _point_json(p: Point | None) -> dict[str, Any] | None:
    return None if p is None else {**asdict(p), "label": p.label, "description": describe(p)}


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

    edge_only, server_only = _edge_only(points), _server_only(points)
    target = server_only.accuracy - cfg.max_loss / 100.0
    method = frontier_points(points, _is_method)
    mc = np.array([p.comm_cost for p in method])
    ma = np.array([p.accuracy for p in method])
    at_half = frontier_at(mc, ma, 0.5)
    mcost, macc = series(points, lambda p: _is_method(p))
    rcost, racc = series(points, lambda p: _is_method(p, score="random"))
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
    paper = _find(points, encoder="edge", score="attention", rule="sum_threshold", value=PAPER_SUM_THRESHOLD,
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
        "best_point": _point_json(best_point(points, _deployable, target)),
        "best_point_paper_rule": _point_json(best_point(
            points, lambda p: _is_method(p, rules=("sum_threshold",)), target)),
        "best_point_by_bytes": _point_json(min(
            (p for p in points if _deployable(p) and p.accuracy >= target - 1e-12),
            key=lambda p: (p.bytes_frac, -p.accuracy), default=None)),
        "paper_point": _point_json(paper),
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
        "frontier": [_point_json(p) for p in method],
        # top-N/4 patches, where the paper's rules spend most of their budget
        "selection_geometry": {f"{enc}/{score}": selection_geometry(sc, max(1, n_patches // 4))
                               for (enc, score), sc in sorted(data.scores.items())
                               if score == "attention" and math.isqrt(n_patches) ** 2 == n_patches},
    }


EXPERT_COSTS = (0.1, 0.2, 0.3, 0.5, 0.75)


def summarise_experts(cfg: EvalConfig, data: Arrays, experts: Sequence[Any], all_experts: dict[str, IntArray],
                      gate_u: dict[str, FloatArray], n_patches: int) -> dict[str, Any]:
    """Expert routing against the general server on the same δ_sum selections and min-entropy gate,
    for several ``min_share`` settings: where images went, how often their true class was among the
    routed expert's, and accuracy at the paper's point and along both exact frontiers."""
    labels = data.labels
    edge_correct = data.edge_logits.argmax(1) == labels
    u = gate_u["min_entropy"]
    sids = list(all_experts)

    def frontier(preds: dict[str, IntArray]) -> tuple[FloatArray, FloatArray]:
        return _exact_frontier(u, "min_entropy", edge_correct,
                               [(preds[sid] == labels, data.counts[sid]) for sid in sids], n_patches)

    def at_paper(preds: dict[str, IntArray]) -> float | None:
        sid = next((x for x in sids if x.endswith(f"-sum_threshold-{PAPER_SUM_THRESHOLD:g}")), None)
        if sid is None:
            return None
        send = send_masks(u, "min_entropy", [PAPER_ETA])[0]
        return float(np.where(send, preds[sid] == labels, edge_correct).mean())

    general_preds = {sid: data.server_pred[sid] for sid in sids}
    general = frontier(general_preds)
    settings = []
    for share in sorted({*EXPERT_MIN_SHARES, cfg.expert_min_share}):
        route = route_images(data.edge_logits, experts, min_share=share)
        preds = {sid: routed_predictions(route, all_experts[sid], data.server_pred[sid]) for sid in sids}
        routed = frontier(preds)
        covered = np.array([r >= 0 and int(y) in experts[r].class_ids for r, y in zip(route, labels, strict=True)])
        settings.append({
            "min_share": share,
            "routed_share": [float(np.mean(route == i)) for i in range(len(experts))],
            "general_share": float(np.mean(route < 0)),
            "true_class_covered_when_routed": float(covered.sum() / max(1, int(np.sum(route >= 0)))),
            "paper_point": at_paper(preds),
            "frontier": [frontier_at(*routed, c) for c in EXPERT_COSTS],
        })
    return {
        "models": [{"ref": ref, "classes": m.class_ids} for ref, m in zip(cfg.experts, experts, strict=True)],
        "costs": list(EXPERT_COSTS),
        "general": {"paper_point": at_paper(general_preds),
                    "frontier": [frontier_at(*general, c) for c in EXPERT_COSTS]},
        "settings": settings,
    }


def _expert_lines(x: dict[str, Any] | None, h: str) -> list[str]:
    if not x:
        return []
    lines = ["", f"{h}# Expert routing", "",
             "Each sent image goes to the specialist whose classes hold the most of the edge's top-5 probability "
             "mass (`shared.routing`), on the same δ_sum selections and min-entropy gate as the general server; "
             "with `min_share` > 0 only when that specialist holds at least that share of the mass, else to the "
             "general server. Accuracy: the paper's point (δ_sum "
             f"{PAPER_SUM_THRESHOLD}, η {PAPER_ETA}) and the δ_sum frontier at every η up to each comm cost.", ""]
    lines += [f"- `{m['ref']}`: classes {m['classes']}" for m in x["models"]]
    costs = x["costs"]
    lines += ["", "| routing | to experts | true class covered | paper point | "
              + " | ".join(f"cost ≤ {c:g}" for c in costs) + " |",
              "|---|---|---|---|" + "---|" * len(costs)]
    g = x["general"]
    lines.append("| general server only | 0 % | | " + _pct(g["paper_point"]) + " | "
                 + " | ".join(_pct(a) for a in g["frontier"]) + " |")
    for st in x["settings"]:
        diffs = [f"{_pct(a)} ({100 * (a - b):+.2f})" for a, b in zip(st["frontier"], g["frontier"], strict=True)]
        pp, gp = st["paper_point"], g["paper_point"]
        paper = f"{_pct(pp)} ({100 * (pp - gp):+.2f})" if pp is not None and gp is not None else "–"
        lines.append(f"| experts, min_share {st['min_share']:g} | {100 * (1 - st['general_share']):.1f} % | "
                     f"{100 * st['true_class_covered_when_routed']:.1f} % | {paper} | " + " | ".join(diffs) + " |")
    return lines


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
            p = _find(points, encoder="edge", score=s, rule="sum_threshold", value=v, gate="none")
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
        p = _find(points, encoder="edge", score="attention", rule="sum_threshold", value=PAPER_SUM_THRESHOLD,
                  gate="min_entropy", eta=float(eta))
        kept_acc = f"{100 * edge_correct[kept].mean():.2f} %" if kept.any() else "–"
        end = f"{100 * p.accuracy:.2f} % | {p.comm_cost:.3f}" if p else "– | –"
        lines.append(f"| {eta:g} | {100 * send.mean():.1f} % | {kept_acc} | {end} |")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f} %"


FIGURES = (("fig8_tradeoff.png", "Accuracy vs communication cost with the Pareto frontier (paper Fig. 8)"),
           ("fig12_rules.png", "Selection rules (paper Fig. 12)"),
           ("fig11_scores.png", "Mean attention vs rollout (paper Fig. 11)"),
           ("fig13_gates.png", "Min-entropy vs Shannon entropy vs margin gate (paper Fig. 13)"),
           ("fig14_encoder.png", "Edge vs server as semantic encoder (paper Fig. 14)"),
           ("fig_bytes.png", "Accuracy vs measured bytes"))


def report_markdown(summary: dict[str, Any], table2: str, table3: str, *, img_prefix: str | None = "",
                    level: int = 1, title: str = "PatchCast evaluation") -> str:
    """The run's report. ``img_prefix`` is prepended to figure file names (None: no figures);
    ``level`` is the heading depth of the title, so the report can sit inside another document."""
    h = "#" * level
    acc = summary["acceptance"]
    e, s = summary["edge"], summary["server"]
    t = summary.get("timings_s", {})
    lines = [
        f"{h} {title}", "",
        f"- Command: `{summary['config'].get('command') or 'patchcast eval'}`",
        f"- Images: {summary['images']:,} ({summary['config']['data']}), "
        f"{summary['num_patches']} patches per image; {summary.get('precision', '')}, "
        f"{summary.get('threads', '?')} thread(s); model passes {summary.get('compute_s', 0):.0f} s "
        f"(when computed; this run {t.get('total_s', 0):.0f} s with the cache)",
        f"- Edge `{e['ref']}`: **{_pct(e['accuracy'])}** ({e['gmacs']:.3f} GMACs/image); server "
        f"`{s['ref']}` on full images: **{_pct(s['accuracy'])}** ({s['gmacs']:.3f} GMACs/image)",
    ]
    pp = summary["paper_point"]
    if pp:
        lines.append(f"- Paper setting (mean attention, δ_sum = {PAPER_SUM_THRESHOLD}, min-entropy "
                     f"η = {PAPER_ETA}): {_pct(pp['accuracy'])} at comm cost {pp['comm_cost']:.3f} "
                     f"({100 * (1 - pp['comm_cost']):.0f} % less communication), "
                     f"{100 * pp['images_sent_frac']:.1f} % of images sent, "
                     f"bytes {pp['bytes_frac']:.3f} of full JPEG")
    for key, what in (("best_point", "Cheapest deployable point (any edge score, rule and gate)"),
                      ("best_point_paper_rule", "Cheapest with the paper's rule (δ_sum, min-entropy)"),
                      ("best_point_by_bytes", "Fewest bytes (any edge score, rule and gate)")):
        bp = summary[key]
        found = (f"{bp['description']}: {_pct(bp['accuracy'])} at comm cost {bp['comm_cost']:.3f}, "
                 f"bytes {bp['bytes_frac']:.3f}" if bp else "none")
        lines.append(f"- {what} within {summary['max_loss_points']:g} point(s) of server-only "
                     f"(≥ {_pct(summary['target_accuracy'])}): {found}")
    b = summary.get("bytes")
    if b:
        lines.append(f"- Bytes: `{b['codec']}` codec {b['codec_params'] or '(defaults)'} on the actual "
                     f"selections of {b['sample']} images; reference = the same images as full-image "
                     f"table-less JPEG q{REFERENCE_JPEG_QUALITY}, mean {b['reference_mean_bytes']:.0f} B "
                     f"(as standalone JPEG files with headers: {b['jpeg_file_mean_bytes']:.0f} B)")
    lines += [
        "", f"{h}# Acceptance", "",
        f"- Method frontier (edge mean attention, any rule, min-entropy gate) at comm cost ≤ 0.5: "
        f"{_pct(acc['frontier_accuracy_at_cost_0.5'])}, {acc['loss_at_cost_0.5_points']:.2f} points below "
        f"server-only → {'PASS' if acc['within_1_point_at_cost_0.5'] else 'MISS'} (≤ 1 point)",
        f"- Versus random patches (matched counts{_draws_note(summary)}), frontier against frontier: at the "
        f"{len(acc['random_frontier_costs'])} costs of the random frontier, method minus random is at "
        f"worst {acc['min_margin_over_random_frontier_points']:+.2f} points → "
        f"{'PASS' if acc['beats_random_frontier_everywhere'] else 'MISS'} (≥ 0 everywhere)",
        *_exact_lines(acc.get("exact_eta")),
        f"- Point by point (same selection rule and value, same gate and η, so the same images and the "
        f"same patch counts): method ≥ random at {acc['matched_points_method_not_worse']} of "
        f"{acc['matched_points']} points; method minus random: mean "
        f"{acc['matched_points_mean_margin_points']:+.2f} points, worst "
        f"{acc['matched_points_min_margin_points']:+.2f}",
    ]
    lines += _expert_lines(summary.get("experts"), h)
    geometry = summary.get("selection_geometry") or {}
    if geometry:
        lines += ["", f"{h}# Where attention looks", "",
                  "Top N/4 patches by each model's last-block CLS attention, against uniform random picks "
                  "(an attention sink shows as kept corners; an object as a central share above random).", "",
                  "| score | k | kept patches in the central half of the grid | images keeping both bottom "
                  "corners |", "|---|---|---|---|"]
        for name, geo in geometry.items():
            lines.append(f"| {name} | {geo['k']} | {_pct(geo['central_share'])} (random "
                         f"{_pct(geo['central_share_random'])}) | {_pct(geo['bottom_corners'])} (random "
                         f"{_pct(geo['bottom_corners_random'])}) |")
    if img_prefix is not None:
        lines += ["", f"{h}# Figures", ""]
        for name, caption in FIGURES:
            lines += [f"![{caption}]({img_prefix}{name})", "", f"*{caption}.*", ""]
    lines += [
        "", f"{h}# Expected patches per δ_sum (paper Table II)", "", table2,
        "", f"{h}# Images sent per η, min-entropy gate (paper Table III)", "", table3,
        "", f"{h}# Frontier (method)", "",
        "Every 0.05 of communication cost, the first frontier point at or above it "
        "(all points: `points.csv`, `summary.json`).", "",
        "| comm cost | accuracy | bytes | operating point |", "|---|---|---|---|",
    ]
    for p in thin_frontier(summary["frontier"], 0.05):
        lines.append(f"| {p['comm_cost']:.3f} | {_pct(p['accuracy'])} | {p['bytes_frac']:.3f} | "
                     f"{p['description']} |")
    return "\n".join(lines) + "\n"


def _exact_lines(x: dict[str, Any] | None) -> list[str]:
    """The acceptance checks again with η at every observed value (summaries from before lack them)."""
    if not x:
        return []
    lines = [f"- With η at every observed uncertainty value (the exact curves the η grid samples): method "
             f"frontier at comm cost ≤ 0.5 {_pct(x['frontier_accuracy_at_cost_0.5'])}, "
             f"{x['loss_at_cost_0.5_points']:.2f} points below server-only → "
             f"{'PASS' if x['within_1_point_at_cost_0.5'] else 'MISS'}"]
    if x["random_frontier_points"]:
        lines.append(f"  - against random, frontier against frontier: method at or above random at "
                     f"{x['random_frontier_points_beaten_or_tied']:,} of the random frontier's "
                     f"{x['random_frontier_points']:,} costs, worst "
                     f"{x['min_margin_over_random_frontier_points']:+.2f} points → "
                     f"{'PASS' if x['beats_random_frontier_everywhere'] else 'MISS'}"
                     + (f" (below it only at comm cost ≤ {max(x['costs_below_random']):.3f})"
                        if x.get("costs_below_random") else ""))
    boot = x.get("bootstrap")
    if boot:
        loss = boot["loss_at_cost_0.5"]
        lines += [
            f"  - sampling noise, a paired bootstrap over the test images ({boot['resamples']} resamples, "
            f"both frontiers and server-only recomputed on each): server-only minus the method's frontier "
            f"at comm cost ≤ 0.5 {loss['mean']:.2f} points, 95 % interval [{loss['lo']:.2f}, {loss['hi']:.2f}], "
            f"over 1 point in {100 * loss['p_over_1_point']:.0f} % of resamples; method minus random:", "",
            "  | comm cost | method − random, points | 95 % interval | resamples with method below |",
            "  |---|---|---|---|",
            *(f"  | {g['cost']:g} | {g['mean']:+.2f} | [{g['lo']:+.2f}, {g['hi']:+.2f}] | "
              f"{100 * g['p_below']:.0f} % |" for g in boot["method_minus_baseline"]),
            "",
        ]
    return lines


def _draws_note(summary: dict[str, Any]) -> str:
    n = int(summary.get("config", {}).get("random_draws", 1))
    return f"; accuracy averaged over {n} independent draws" if n > 1 else "; one draw"


def thin_frontier(front: Sequence[dict[str, Any]], step: float) -> list[dict[str, Any]]:
    """The first point at or above each multiple of ``step`` in cost, plus the first and last."""
    kept: list[dict[str, Any]] = []
    next_cost = 0.0
    for i, p in enumerate(front):
        if p["comm_cost"] >= next_cost - 1e-12 or i == len(front) - 1:
            kept.append(p)
            next_cost = (math.floor(p["comm_cost"] / step + 1e-9) + 1) * step
    return kept


PUBLISH_BEGIN = "<!-- patchcast eval: generated section, rewritten by `patchcast eval --publish` -->"
PUBLISH_END = "<!-- patchcast eval: end of generated section -->"


def publish_markers(name: str = "") -> tuple[str, str]:
    """The comments around a generated section: one unnamed section, or one per ``--publish-name``."""
    if not name:
        return PUBLISH_BEGIN, PUBLISH_END
    return (f"<!-- patchcast eval {name}: generated section, rewritten by `patchcast eval --publish "
            f"--publish-name {name}` -->", f"<!-- patchcast eval {name}: end of generated section -->")


def publish(doc: Path, out_dir: Path, summary: dict[str, Any], table2: str, table3: str, name: str = "") -> None:
    """Copy the figures next to ``doc`` (``img/``, named ``NAME-fig….png`` for a named section) and
    rewrite only the generated section of ``doc`` (the one called ``name``), keeping the hand-written
    text and the other sections around it."""
    img = doc.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    prefix = f"{name}-" if name else ""
    for fig, _ in FIGURES:
        if (out_dir / fig).is_file():
            shutil.copyfile(out_dir / fig, img / f"{prefix}{fig}")
    begin, end = publish_markers(name)
    report = report_markdown(summary, table2, table3, img_prefix=f"img/{prefix}", level=2,
                             title=f"PatchCast evaluation: {name}" if name else "PatchCast evaluation")
    block = f"{begin}\n\n{report}\n{end}"
    text = doc.read_text() if doc.is_file() else ""
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text else "") + block + "\n"
    doc.write_text(text)


def write_outputs(cfg: EvalConfig, out_dir: Path, points: list[Point], summary: dict[str, Any],
                  data: Arrays, specs: Sequence[SelectionSpec], n_patches: int,
                  gate_u: dict[str, FloatArray]) -> list[Path]:
    files = [out_dir / "points.csv", out_dir / "tables.md", out_dir / "report.md"]
    write_csv(files[0], points)
    t2 = table_expected_patches(data, specs, n_patches, points)
    t3 = table_sent_fraction(points, gate_u, cfg.grid, data)
    files[1].write_text("## Table II: expected patches per δ_sum\n\n" + t2 +
                        "\n\n## Table III: images sent per η (min-entropy)\n\n" + t3 + "\n")
    files[2].write_text(report_markdown(summary, t2, t3, img_prefix="" if cfg.plots else None))
    if cfg.plots:
        files += plot_all(points, out_dir, summary)
    if cfg.publish:
        publish(Path(cfg.publish), out_dir, summary, t2, t3, cfg.publish_name)
        files.append(Path(cfg.publish))
    return files


# ---- plots -----------------------------------------------------------------------------------------

def _frontier_xy(points: Sequence[Point], pred: Callable[[Point], bool]) -> tuple[list[float], list[float]]:
    """Frontier as a step curve, held flat to cost 1 so curves that stop early stay comparable."""
    f = frontier_points(points, pred)
    return [p.comm_cost for p in f] + [1.0], [100 * p.accuracy for p in f] + [100 * f[-1].accuracy]


def _nogate_xy(points: Sequence[Point], **kw: Any) -> tuple[list[float], list[float]]:
    """Every image sent: accuracy vs kept fraction, ending at the full image (server-only)."""
    chosen = sorted((p for p in points
                     if p.gate == "none" and all(getattr(p, k) == v for k, v in kw.items())),
                    key=lambda p: p.patch_frac)
    full = _server_only(points)
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

    # Fig. 8: the trade-off and its frontier.
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs, ys = series(points, _is_method, with_edge_only=False)
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
        ax.step(*_frontier_xy(points, _is_method), where="post", color="tab:blue", lw=2,
                label="frontier: attention")
        ax.step(*_frontier_xy(points, lambda p: _is_method(p, score="random")), where="post",
                color="tab:orange", lw=1.5, ls="-.", label="frontier: random patches")
    ax.step(*_frontier_xy(points, lambda p: _is_full(p, "min_entropy")), where="post",
            color="tab:green", lw=1.2, ls=":", label="frontier: full images, gate only")
    if summary["paper_point"]:
        pp = summary["paper_point"]
        ax.plot(pp["comm_cost"], 100 * pp["accuracy"], "r*", ms=12, label="δ_sum 0.97, η 0.8")
    if summary["best_point"]:
        bp = summary["best_point"]
        ax.plot(bp["comm_cost"], 100 * bp["accuracy"], "kD", ms=6,
                label=f"cheapest within {summary['max_loss_points']:g} pt")
    baselines(ax)
    ax.set_xlabel("communication cost (images sent × patches sent)")
    ax.set_ylim(*ylim)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Accuracy vs communication cost (cf. paper Fig. 8)", fontsize=10)
    save(fig, "fig8_tradeoff.png")

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

    sum_only = ("sum_threshold",)
    two_panel("fig11_scores.png", "Mean attention vs attention rollout, δ_sum rule (cf. paper Fig. 11)", [
        ("mean attention", {"encoder": "edge", "score": "attention", "rule": "sum_threshold"},
         lambda p: _is_method(p, rules=sum_only), "-o"),
        ("rollout", {"encoder": "edge", "score": "rollout", "rule": "sum_threshold"},
         lambda p: _is_method(p, score="rollout", rules=sum_only), "--s"),
        ("random, matched", {"encoder": "edge", "score": "random", "rule": "sum_threshold"},
         lambda p: _is_method(p, score="random", rules=sum_only), ":^"),
    ])
    two_panel("fig12_rules.png", "Selection rules, mean attention (cf. paper Fig. 12)", [
        ("top-k", {"encoder": "edge", "score": "attention", "rule": "topk"},
         lambda p: _is_method(p, rules=("topk",)), "-o"),
        ("threshold δ", {"encoder": "edge", "score": "attention", "rule": "threshold"},
         lambda p: _is_method(p, rules=("threshold",)), "--s"),
        ("sum-threshold δ_sum", {"encoder": "edge", "score": "attention", "rule": "sum_threshold"},
         lambda p: _is_method(p, rules=("sum_threshold",)), "-.^"),
    ])
    two_panel("fig14_encoder.png", "Edge vs server attention as semantic encoder, δ_sum (cf. Fig. 14)", [
        ("edge attention", {"encoder": "edge", "score": "attention", "rule": "sum_threshold"},
         lambda p: _is_method(p, rules=sum_only), "-o"),
        ("server attention", {"encoder": "server", "score": "attention", "rule": "sum_threshold"},
         lambda p: _is_method(p, encoder="server", rules=sum_only), "--s"),
        ("random, matched", {"encoder": "edge", "score": "random", "rule": "sum_threshold"},
         lambda p: _is_method(p, score="random", rules=sum_only), ":^"),
    ])

    # Fig. 13: gates.
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for g, color in zip(GATES, ("tab:blue", "tab:red", "tab:purple"), strict=True):
        ax.step(*_frontier_xy(points, partial(_is_method, gate=g)), where="post", color=color, lw=1.8,
                label=f"{g}, attention selection")
        ax.step(*_frontier_xy(points, partial(_is_full, gate=g)), where="post", color=color, lw=1, ls=":",
                label=f"{g}, full images")
    baselines(ax)
    ax.set_xlabel("communication cost")
    ax.set_ylim(*ylim)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Gates: min-entropy vs Shannon vs margin (cf. paper Fig. 13)", fontsize=10)
    save(fig, "fig13_gates.png")

    # Bytes: what the link actually carries.
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    def bytes_frontier(pred: Callable[[Point], bool]) -> tuple[list[float], list[float]]:
        chosen = [p for p in points if pred(p)] + [_edge_only(points)]
        idx = pareto_frontier(np.array([p.bytes_frac for p in chosen]),
                              np.array([p.accuracy for p in chosen]))
        xs = [chosen[i].bytes_frac for i in idx]
        ys = [100 * chosen[i].accuracy for i in idx]
        return [*xs, max(1.0, xs[-1])], [*ys, ys[-1]]  # held flat to 1, like the cost frontiers

    for score, color in (("attention", "tab:blue"), ("random", "tab:orange")):
        ax.step(*bytes_frontier(partial(_is_method, score=score)), where="post", color=color,
                label=f"{score} selection, frontier")
    ax.step(*bytes_frontier(partial(_is_full, gate="min_entropy")), where="post", color="tab:green", ls=":",
            label="full images, gate only")
    baselines(ax)
    ax.set_xlabel(f"bytes ÷ full-image JPEG q{REFERENCE_JPEG_QUALITY} (patches: codec "
                  f"{summary['config']['codec']})")
    ax.set_ylim(*ylim)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Accuracy vs bytes on the link", fontsize=10)
    save(fig, "fig_bytes.png")
    return files
