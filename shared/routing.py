"""Expert routing: which worker pool answers an uncertain image.

Several specialist server models, each trained on a subset of the classes, serve their own request
topic (``patchcast/v1/req/<model_id>/<device>``, one shared-subscription pool each). An image the
edge sends goes to the expert whose classes hold the most of the edge model's top-k probability
mass; when no expert covers any of it, to the general server. Pure and synchronous: the edge calls
:meth:`ExpertRouter.route` per request, tests call it directly.

Config form (``routing.experts``): ``"MODEL_ID=C,C,…; MODEL_ID=C,…"`` with global class ids, e.g.
``"cifar10-vehicles=0,1,8,9; cifar10-animals=2,3,4,5,6,7"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from shared.errors import BadTopicError, ConfigError
from shared.topics import validate_id


def _check_model_id(value: str, what: str) -> None:
    """A model id is a topic level: a bad one is a configuration error here."""
    try:
        validate_id(value, what)
    except BadTopicError as exc:
        raise ConfigError(exc.message) from exc


@dataclass(frozen=True)
class Expert:
    """One specialist pool: its request-topic model id and the global class ids it was trained on."""

    model_id: str
    classes: frozenset[int]

    def __post_init__(self) -> None:
        _check_model_id(self.model_id, "expert model id")
        if not self.classes:
            raise ConfigError(f"expert {self.model_id!r} covers no classes")
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in self.classes):
            raise ConfigError(f"expert {self.model_id!r}: class ids must be integers ≥ 0")

    def mass(self, topk_ids: Sequence[int], topk_probs: Sequence[float]) -> float:
        """Edge probability on this expert's classes among the given top-k."""
        return float(sum(p for c, p in zip(topk_ids, topk_probs, strict=True) if c in self.classes))


def parse_experts(text: str) -> tuple[Expert, ...]:
    """``"A=0,1; B=2,3"`` → experts in the order written (the order breaks ties); ``""`` → none."""
    experts: list[Expert] = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, sep, ids = part.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"routing.experts: {part!r} is not MODEL_ID=C,C,…")
        try:
            classes = frozenset(int(c) for c in ids.split(",") if c.strip())
        except ValueError as exc:
            raise ConfigError(f"routing.experts: {part!r}: class ids must be integers") from exc
        experts.append(Expert(name.strip(), classes))
    names = [e.model_id for e in experts]
    if len(set(names)) != len(names):
        raise ConfigError(f"routing.experts: a model id appears twice in {names}")
    return tuple(experts)


@dataclass(frozen=True)
class ExpertRouter:
    """Top-k mass routing over ``experts``; ``fallback`` (the general server) when none applies."""

    experts: tuple[Expert, ...]
    fallback: str
    top_k: int = 5
    min_share: float = 0.0  # the expert must hold at least this share of the top-k mass, else fallback

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ConfigError("routing.top_k must be ≥ 1")
        if not 0.0 <= self.min_share <= 1.0:
            raise ConfigError("routing.min_share must be in [0, 1]")
        _check_model_id(self.fallback, "fallback model id")

    @property
    def model_ids(self) -> tuple[str, ...]:
        """Every request topic this router can pick, the fallback last."""
        return (*(e.model_id for e in self.experts), self.fallback)

    def route(self, topk_ids: Sequence[int], topk_probs: Sequence[float]) -> str:
        """The expert covering the most of the edge's top-``top_k`` probability mass (the first listed
        on a tie); the fallback when there are no experts, none covers any of that mass, or the best
        covers less than ``min_share`` of it (the edge is torn between experts)."""
        if len(topk_ids) != len(topk_probs):
            raise ValueError("topk_ids and topk_probs differ in length")
        ids, probs = list(topk_ids)[: self.top_k], list(topk_probs)[: self.top_k]
        best, best_mass = self.fallback, 0.0
        for expert in self.experts:
            mass = expert.mass(ids, probs)
            if mass > best_mass and not math.isclose(mass, best_mass, abs_tol=1e-12):
                best, best_mass = expert.model_id, mass
        if self.min_share and best_mass < self.min_share * sum(probs) - 1e-12:
            return self.fallback
        return best
