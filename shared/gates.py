"""Offloading gates: send an image to the server only when the edge model is unsure.

Uncertainty of the edge's softmax p over C classes (computed in float32 from log_softmax):

* ``min_entropy`` (the paper's gate): H∞ = −log2 max_c p_c, in bits, in [0, log2 C].
* ``shannon``: H = −Σ_c p_c log2 p_c, in bits, in [0, log2 C].
* ``margin``: p(1) − p(2), top-1 minus top-2 probability, in [0, 1] (a *confidence*: low = unsure).

Decision: send iff H ≥ η for the entropies; send iff margin ≤ threshold for ``margin``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from shared.errors import ConfigError

UncertaintyKind = Literal["min_entropy", "shannon", "margin"]
UNCERTAINTY_KINDS: tuple[UncertaintyKind, ...] = ("min_entropy", "shannon", "margin")
_LN2 = math.log(2.0)


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be (B, C) with C ≥ 1, got shape {tuple(logits.shape)}")
    return torch.log_softmax(logits.detach().float(), dim=-1)


def uncertainty(logits: torch.Tensor, kind: UncertaintyKind) -> torch.Tensor:
    """Per-image uncertainty (B,) float32 of kind ``kind`` (see the module docstring for units)."""
    logp = _log_probs(logits)
    if kind == "min_entropy":
        return -logp.max(dim=-1).values / _LN2
    if kind == "shannon":
        p = logp.exp()
        # 0 · log 0 = 0 (a class with -inf logit contributes nothing, not NaN).
        plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
        return (-plogp.sum(dim=-1) / _LN2).clamp_min(0.0)
    if kind == "margin":
        if logp.shape[1] < 2:
            raise ValueError("margin needs at least two classes")
        top2 = logp.topk(2, dim=-1).values.exp()
        return top2[:, 0] - top2[:, 1]
    raise ConfigError(f"unknown uncertainty kind {kind!r}; expected one of {UNCERTAINTY_KINDS}")


def should_send(logits: torch.Tensor, kind: UncertaintyKind, threshold: float) -> torch.Tensor:
    """Bool (B,): True where the image goes to the server."""
    return _sends(uncertainty(logits, kind), kind, threshold)


def _sends(u: torch.Tensor, kind: UncertaintyKind, threshold: float) -> torch.Tensor:
    return u <= threshold if kind == "margin" else u >= threshold


@dataclass(frozen=True)
class Gate:
    """A validated gate: ``threshold`` is η in bits (entropies, ≥ 0) or the margin cut-off in [0, 1].

    η = 0 sends every image for the entropies; margin threshold 1 sends every image.
    """

    kind: UncertaintyKind
    threshold: float

    def __post_init__(self) -> None:
        if self.kind not in UNCERTAINTY_KINDS:
            raise ConfigError(f"unknown gate kind {self.kind!r}; expected one of {UNCERTAINTY_KINDS}")
        try:
            value = float(self.threshold)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"gate threshold must be a number, got {self.threshold!r}") from exc
        if isinstance(self.threshold, bool) or not math.isfinite(value):
            raise ConfigError(f"gate threshold must be finite, got {self.threshold!r}")
        if self.kind == "margin" and not 0.0 <= value <= 1.0:
            raise ConfigError(f"margin gate threshold must be in [0, 1], got {value}")
        if self.kind != "margin" and value < 0.0:
            raise ConfigError(f"{self.kind} gate threshold η must be ≥ 0 bits, got {value}")
        object.__setattr__(self, "threshold", value)

    def uncertainty(self, logits: torch.Tensor) -> torch.Tensor:
        return uncertainty(logits, self.kind)

    def should_send(self, logits: torch.Tensor) -> torch.Tensor:
        return should_send(logits, self.kind, self.threshold)

    def decide(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(:meth:`should_send`, :meth:`uncertainty`) from one uncertainty computation."""
        u = uncertainty(logits, self.kind)
        return _sends(u, self.kind, self.threshold), u
