"""Patch selection rules and the selection bitmask.

Rules (``SelectionRule.kind``), applied to one image's scores s (N,), s_i ≥ 0:

* ``topk``: the k highest-scoring patches (k clipped to N).
* ``threshold``: every patch with s_i ≥ δ.
* ``sum_threshold``: sort descending; keep the longest prefix whose cumulative *share* of the total
  mass is ≤ δ_sum (the official implementation's rule; scores are renormalised to sum 1 first, and
  the comparison allows ``SUM_TOLERANCE`` of float rounding so that δ_sum = 1 keeps every patch).
* ``random_k``: k patches uniformly at random without replacement (a score-blind baseline).

Order (``SelectionRule.spread``): the rule decides *how many* patches an image keeps, the order *which*.
``spread = 0`` (the paper's) keeps the highest-scoring ones. ``spread = c ≥ 2`` splits the square patch
grid into c×c cells and keeps patches round by round: first the best patch of every cell, then the
second best of every cell, and so on, within a round by score (descending). The count is the rule's
(δ and δ_sum still count by score and mass); only the kept patches spread over the image. Measured on
Imagenette (docs/results.md): where an object fills most of the photo, neighbouring patches carry the
same evidence, and a cluster of the top patches tells the server less than the same number spread
over the photo by attention. The order is a prefix order, so one image's selections at growing counts
are nested (the top-up's offer holds the sent patches).

Degenerate cases: when ``threshold``/``sum_threshold`` keep fewer than ``min_patches`` patches
(for ``sum_threshold`` the prefix is empty when the top patch alone holds more than δ_sum), the top
``min(min_patches, N)`` patches are kept instead. ``min_patches=0`` allows an empty selection.

Ties: the descending order is a *stable* sort, so among equal scores the lower patch index (row-major
order) ranks first. Top-k at a tie therefore keeps the lowest indices; threshold rules are
tie-consistent by construction (equal scores are kept or dropped together, except where
``min_patches`` cuts through a tie).

The bitmask layout (:mod:`shared.bitmask`: :func:`mask_nbytes`, :func:`pack_mask`, :func:`unpack_mask`) is part of
the wire contract.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from shared.bitmask import pack_mask, unpack_mask
from shared.errors import ConfigError

RuleKind = Literal["topk", "threshold", "sum_threshold", "random_k"]
RULE_KINDS: tuple[RuleKind, ...] = ("topk", "threshold", "sum_threshold", "random_k")
SUM_TOLERANCE = 1e-9
"""Absolute slack on the cumulative share (float64) in ``sum_threshold``."""


@dataclass(frozen=True)
class SelectionRule:
    """A patch selection rule. ``value`` is k (``topk``, ``random_k``), δ (``threshold``) or δ_sum
    (``sum_threshold``)."""

    kind: RuleKind
    value: float
    min_patches: int = 1
    spread: int = 0  # cell side (patches) of the spread order; 0 or 1: by score alone (the paper's)

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ConfigError(f"unknown selection rule {self.kind!r}; expected one of {RULE_KINDS}")
        sp = self.spread
        if isinstance(sp, bool) or not isinstance(sp, int) or sp < 0:
            raise ConfigError(f"spread must be an integer ≥ 0 (a cell side in patches), got {self.spread!r}")
        mp = self.min_patches
        if isinstance(mp, bool) or not isinstance(mp, int) or mp < 0:
            raise ConfigError(f"min_patches must be an integer ≥ 0, got {self.min_patches!r}")
        try:
            value = float(self.value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.kind}: value must be a number, got {self.value!r}") from exc
        if isinstance(self.value, bool) or not math.isfinite(value):
            raise ConfigError(f"{self.kind}: value must be a finite number, got {self.value!r}")
        if self.kind in ("topk", "random_k"):
            if value != int(value) or value < 1:
                raise ConfigError(f"{self.kind}: k must be an integer ≥ 1, got {self.value!r}")
            if int(value) < self.min_patches:
                raise ConfigError(f"{self.kind}: k={int(value)} is below min_patches={self.min_patches}")
            object.__setattr__(self, "value", int(value))
        elif self.kind == "threshold":
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"threshold: δ must be in [0, 1] (scores sum to 1), got {value}")
        elif not 0.0 < value <= 1.0:
            raise ConfigError(f"sum_threshold: δ_sum must be in (0, 1], got {value}")

    @property
    def k(self) -> int:
        """k of ``topk``/``random_k``."""
        if self.kind not in ("topk", "random_k"):
            raise ConfigError(f"rule {self.kind!r} has no k")
        return int(self.value)


@dataclass(frozen=True, eq=False)
class Selection:
    """Kept patches of one image: ``indices`` sorted ascending, unique, int64, in [0, num_patches)."""

    indices: np.ndarray
    num_patches: int

    def __post_init__(self) -> None:
        if self.num_patches <= 0:
            raise ValueError(f"num_patches must be positive, got {self.num_patches}")
        idx = np.asarray(self.indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} shape {idx.shape}")
        idx = idx.astype(np.int64, copy=True)
        if idx.size and (idx[0] < 0 or idx[-1] >= self.num_patches or np.any(np.diff(idx) <= 0)):
            raise ValueError(f"indices must be sorted, unique and in [0, {self.num_patches})")
        idx.setflags(write=False)  # frozen all the way down
        object.__setattr__(self, "indices", idx)

    @classmethod
    def _checked_by_caller(cls, indices: np.ndarray, num_patches: int) -> Selection:
        """A Selection of ``indices`` that the caller made sorted, unique, in range and its own (a fresh int64
        array): :func:`select_batch`'s, without checking them again."""
        selection = object.__new__(cls)
        indices.setflags(write=False)
        object.__setattr__(selection, "indices", indices)
        object.__setattr__(selection, "num_patches", num_patches)
        return selection

    @classmethod
    def from_mask(cls, data: bytes, num_patches: int) -> Selection:
        return cls(unpack_mask(data, num_patches), num_patches)

    @property
    def mask(self) -> bytes:
        return pack_mask(self.indices, self.num_patches)

    def index_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The indices as a (writable) int64 tensor; ``indices`` itself is a read-only array."""
        return torch.tensor(self.indices, dtype=torch.long, device=device)

    @property
    def num_kept(self) -> int:
        return int(self.indices.size)

    @property
    def fraction(self) -> float:
        """Kept patches ÷ all patches of the image."""
        return self.num_kept / self.num_patches

    def __len__(self) -> int:
        return self.num_kept

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selection):
            return NotImplemented
        return self.num_patches == other.num_patches and np.array_equal(self.indices, other.indices)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking array field: not hashable


def _as_scores(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to(device="cpu", dtype=torch.float64).numpy()
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"scores must be (B, N) with N ≥ 1, got shape {arr.shape}")
    if not bool(((arr >= 0) & (arr < np.inf)).all()):  # NaN fails both
        raise ValueError("scores must be finite and non-negative")
    return arr


def _kept_counts(ordered: np.ndarray, rule: SelectionRule) -> np.ndarray:
    """How many leading patches of each row's descending order the rule keeps (before min_patches)."""
    b, n = ordered.shape
    if rule.kind == "topk":
        return np.full(b, min(rule.k, n), dtype=np.int64)
    if rule.kind == "threshold":
        return np.count_nonzero(ordered >= float(rule.value), axis=1).astype(np.int64)
    total = ordered.sum(axis=1, keepdims=True)
    has_mass = total > 0
    share = np.cumsum(ordered, axis=1) / (total if has_mass.all() else np.where(has_mass, total, 1.0))
    counts = np.count_nonzero(share <= float(rule.value) + SUM_TOLERANCE, axis=1)
    # All-zero rows have no mass to share out: treat them as degenerate.
    return counts * has_mass[:, 0]


def spread_order(scores: np.ndarray, cell: int) -> np.ndarray:
    """(B, N) → (B, N) int64: each row's patches in the spread order of ``cell``×``cell`` cells (see the
    module doc): by rank within the cell, then by score descending, then by index. The grid must be
    square; cells at its far edges are smaller when ``cell`` does not divide its side."""
    b, n = scores.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"the spread order needs a square patch grid, got {n} patches")
    rows, cols = np.divmod(np.arange(n), side)
    per_row = -(-side // cell)
    cell_id = (rows // cell) * per_row + cols // cell
    # by cell, then score descending (lexsort is stable: ties → lower index); the cells' layout in that
    # order is the same on every row, so a patch's rank in its cell is its position minus its cell's start
    by_cell = np.lexsort((-scores, np.broadcast_to(cell_id, scores.shape)), axis=-1)
    sorted_ids = np.sort(cell_id, kind="stable")
    starts = np.searchsorted(sorted_ids, np.arange(cell_id.max() + 1))
    rank = np.empty((b, n), dtype=np.int64)
    np.put_along_axis(rank, by_cell, (np.arange(n) - starts[sorted_ids])[None, :].repeat(b, 0), axis=1)
    return np.lexsort((-scores, rank), axis=-1).astype(np.int64, copy=False)


def _pairwise_sum(values: list[float], start: int, n: int) -> float:
    """numpy's sum of ``values[start:start + n]`` (float64, contiguous), the same additions in the same
    order: its pairwise summation (8 partial sums in blocks of up to 128, halves above that)."""
    if n < 8:
        total = -0.0
        for v in values[start:start + n]:
            total += v
        return total
    if n <= 128:
        r = values[start:start + 8]
        end = start + n - n % 8
        for i in range(start + 8, end, 8):
            r = [a + b for a, b in zip(r, values[i:i + 8], strict=True)]
        total = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for v in values[end:start + n]:
            total += v
        return total
    half = n // 2
    half -= half % 8
    return _pairwise_sum(values, start, half) + _pairwise_sum(values, start + half, n - half)


def _select_row(row: list[float], rule: SelectionRule) -> Selection:
    """:func:`select_batch` of one row of valid scores (finite, ≥ 0; not ``random_k``) in plain Python:
    the same order (stable, descending), the same float64 sums and shares (numpy's pairwise sum, then a
    running sum), so the same patches. A device selects one image at a time, and a dozen numpy calls on
    100 values cost it more than this (their code is cold after the forward)."""
    n = len(row)
    order = sorted(range(n), key=row.__getitem__, reverse=True)  # stable: ties → lower index first
    if rule.kind == "topk":
        count = min(rule.k, n)
    elif rule.kind == "threshold":
        delta = float(rule.value)
        count = sum(1 for v in row if v >= delta)
    else:
        ordered = [row[i] for i in order]
        total = _pairwise_sum(ordered, 0, n)
        count = 0
        if total > 0:  # np.cumsum's running sum; the shares never decrease, so bisect counts those ≤ δ_sum
            count = bisect.bisect_right([c / total for c in itertools.accumulate(ordered)],
                                        float(rule.value) + SUM_TOLERANCE)
    count = max(count, min(rule.min_patches, n))
    return Selection._checked_by_caller(np.array(sorted(order[:count]), dtype=np.int64), n)


def select_batch(scores: np.ndarray | torch.Tensor, rule: SelectionRule, *,
                 rng: np.random.Generator | None = None) -> list[Selection]:
    """Apply ``rule`` to every row of ``scores`` (B, N). ``rng`` is used by ``random_k`` only (a fresh
    unseeded generator when ``None``). One float64 row (a device's image) takes :func:`_select_row`."""
    if (rule.kind != "random_k" and rule.spread < 2 and isinstance(scores, np.ndarray)
            and scores.dtype == np.float64 and scores.ndim == 2 and scores.shape[0] == 1 and scores.shape[1] > 0):
        row = scores[0].tolist()
        if all(0.0 <= v < math.inf for v in row):  # NaN fails both; otherwise _as_scores says what is wrong
            return [_select_row(row, rule)]
    arr = _as_scores(scores)
    b, n = arr.shape
    if rule.kind == "random_k":
        gen = rng if rng is not None else np.random.default_rng()
        k = min(rule.k, n)
        return [Selection(np.sort(gen.choice(n, size=k, replace=False)), n) for _ in range(b)]
    order = np.argsort(-arr, axis=1, kind="stable")  # descending; ties → lower index first
    ordered = arr[np.arange(b)[:, None], order]
    counts = np.maximum(_kept_counts(ordered, rule), min(rule.min_patches, n)).tolist()
    if rule.spread >= 2:  # the rule counts by score; the spread order picks which
        order = spread_order(arr, rule.spread)
    # each row: a prefix of a permutation of 0..n-1 (unique, in range), sorted into a fresh int64 array
    return [Selection._checked_by_caller(np.sort(order[i, : counts[i]]).astype(np.int64, copy=False), n)
            for i in range(b)]


def select(scores: np.ndarray | torch.Tensor, rule: SelectionRule, *,
           rng: np.random.Generator | None = None) -> Selection:
    """Apply ``rule`` to one image's scores (N,)."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to(device="cpu", dtype=torch.float64).numpy()  # numpy has no bf16
    arr = np.asarray(scores)
    if arr.ndim != 1:
        raise ValueError(f"scores must be (N,), got shape {arr.shape}")
    return select_batch(arr[None, :], rule, rng=rng)[0]
