"""What a patch-method sweep varies: selection rules and their values, scores, gates and thresholds η.

A :class:`SelectionSpec` names one selection (whose scores, which rule at which value); the grids
give the values per rule relative to the patch count, so one grid fits a 64-patch CIFAR model and a
196-patch DeiT alike. :func:`threshold_grid` is the η grid both evaluations share: evenly spaced
quantiles of an observed uncertainty plus round values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from patchcast.eval.arrays import FloatArray

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


def threshold_grid(u: FloatArray, quantiles: int, fixed: Sequence[float], hi: float = math.inf) -> list[float]:
    """Thresholds η: evenly spaced quantiles of the observed uncertainty ``u`` (so the sent or asked
    fraction covers 0…1 evenly whatever the model's calibration), rounded to 4 decimals, plus the
    ``fixed`` values, clipped to [0, ``hi``], sorted and distinct."""
    qs = np.quantile(np.asarray(u, dtype=np.float64), np.linspace(0.0, 1.0, quantiles + 1))
    values = {round(float(q), 4) for q in qs} | {float(v) for v in fixed}
    return sorted({min(hi, max(0.0, v)) for v in values})


def gate_thresholds(u: FloatArray, kind: GateName, grid: SweepGrid) -> list[float]:
    """η values for one gate of the patch method: the grid's quantiles plus round values for the
    tables (margins are at most 1)."""
    if kind == "margin":
        return threshold_grid(u, grid.eta_quantiles, grid.fixed_margins, hi=1.0)
    return threshold_grid(u, grid.eta_quantiles, grid.fixed_etas)
