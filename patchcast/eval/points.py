"""Operating points: the patch method's :class:`Point` (one row of ``points.csv``), the predicates
that pick curves out of a sweep, and the helpers both evaluations use to choose and serialise a point
(:func:`cheapest`, :func:`point_json`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from patchcast.eval.arrays import FloatArray
from patchcast.eval.frontier import pareto_frontier
from patchcast.eval.grid import RULES


class Scored(Protocol):
    """Any operating point: an accuracy and some cost attributes."""

    accuracy: float


P = TypeVar("P", bound=Scored)


def cheapest(points: Sequence[P], min_accuracy: float, cost: str) -> P | None:
    """The point lowest in ``cost`` (an attribute name; then higher accuracy) with accuracy ≥ ``min_accuracy``."""
    ok = [p for p in points if p.accuracy >= min_accuracy - 1e-12]
    return min(ok, key=lambda p: (getattr(p, cost), -p.accuracy)) if ok else None


def point_json(p: Any, **extra: Any) -> dict[str, Any] | None:
    """A point (a dataclass) as a JSON object, ``extra`` keys appended; an infinite η as ``"inf"``."""
    if p is None:
        return None
    d = {**asdict(p), **extra}
    if isinstance(d.get("eta"), float) and math.isinf(d["eta"]):
        d["eta"] = "inf"
    return d


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


def is_method(p: Point, gate: str = "min_entropy", score: str = "attention", encoder: str = "edge",
               rules: Sequence[str] = RULES) -> bool:
    """Edge attention selection (any of ``rules``) under ``gate`` (its η = 0 twin: no gate)."""
    return (p.encoder == encoder and p.score == score and p.rule in rules and p.gate in (gate, "none"))


def deployable(p: Point) -> bool:
    """What a device can run: every point except those whose patches the *server* chose (the
    server's attention needs the full image, so those are an upper bound, not a configuration)."""
    return p.encoder != "server"


def is_full(p: Point, gate: str) -> bool:
    """Full images under ``gate`` (the gate alone, no patch selection)."""
    return p.rule == "full" and p.gate in (gate, "none")


def edge_only_point(points: Sequence[Point]) -> Point:
    return next(p for p in points if p.rule == "none")


def server_only_point(points: Sequence[Point]) -> Point:
    return next(p for p in points if p.rule == "full" and p.gate == "none")


def series(points: Sequence[Point], pred: Callable[[Point], bool], *, with_edge_only: bool = True,
           x: str = "comm_cost") -> tuple[FloatArray, FloatArray]:
    chosen = [p for p in points if pred(p)]
    if with_edge_only:
        chosen.append(edge_only_point(points))
    return (np.array([getattr(p, x) for p in chosen], dtype=np.float64),
            np.array([p.accuracy for p in chosen], dtype=np.float64))


def frontier_points(points: Sequence[Point], pred: Callable[[Point], bool]) -> list[Point]:
    chosen = [p for p in points if pred(p)] + [edge_only_point(points)]
    idx = pareto_frontier(np.array([p.comm_cost for p in chosen]), np.array([p.accuracy for p in chosen]))
    return [chosen[int(i)] for i in idx]


def find_point(points: Sequence[Point], **kw: Any) -> Point | None:
    for p in points:
        if all((abs(getattr(p, k) - v) < 1e-9 if isinstance(v, float) and getattr(p, k) is not None
                else getattr(p, k) == v) for k, v in kw.items()):
            return p
    return None


def describe(p: Point) -> str:
    """One line naming an operating point, e.g. ``edge/attention/sum_threshold=0.97, min_entropy η=0.8``."""
    gate = "no gate" if p.gate == "none" else f"{p.gate} η={p.eta:g}"
    return p.label if p.rule == "none" else f"{p.label}, {gate}"
