"""Offloading gates: hand-worked uncertainties, decisions at the threshold, and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from shared.errors import ConfigError
from shared.gates import Gate, should_send, uncertainty

PROPS = settings(max_examples=50, deadline=None)

# Row 0: p = (1/2, 1/4, 1/4)  → H∞ = 1 bit, H = 1/2·1 + 2·1/4·2 = 1.5 bits, margin = 1/4.
# Row 1: uniform over 3 classes → H∞ = H = log2 3, margin 0.
# Row 2: p = (1/8, 7/8, 0) via a −inf logit → H∞ = −log2(7/8), H = 1/8·3 + 7/8·log2(8/7), margin 3/4.
LOGITS = torch.tensor([
    [math.log(2.0), 0.0, 0.0],
    [5.0, 5.0, 5.0],
    [0.0, math.log(7.0), -math.inf],
])
H_INF = [1.0, math.log2(3), -math.log2(7 / 8)]
SHANNON = [1.5, math.log2(3), 3 / 8 + 7 / 8 * math.log2(8 / 7)]
MARGIN = [0.25, 0.0, 0.75]


@pytest.mark.parametrize(("kind", "expected"), [("min_entropy", H_INF), ("shannon", SHANNON),
                                                ("margin", MARGIN)])
def test_uncertainty_hand_worked(kind: str, expected: list[float]) -> None:
    u = uncertainty(LOGITS, kind)  # type: ignore[arg-type]
    assert u.dtype == torch.float32 and u.shape == (3,)
    assert torch.allclose(u, torch.tensor(expected), atol=1e-6)


def test_decisions_either_side_of_the_threshold() -> None:
    # H∞ = 1.0, 1.585, 0.193 bits.
    assert should_send(LOGITS, "min_entropy", 0.99).tolist() == [True, True, False]
    assert should_send(LOGITS, "min_entropy", 1.01).tolist() == [False, True, False]
    assert should_send(LOGITS, "min_entropy", 0.0).tolist() == [True, True, True]
    # H = 1.5, 1.585, 0.544 bits.
    assert should_send(LOGITS, "shannon", 1.55).tolist() == [False, True, False]
    # margin 0.25, 0, 0.75: send when the margin is at most the threshold (0 ≤ 0 included).
    assert should_send(LOGITS, "margin", 0.0).tolist() == [False, True, False]
    assert should_send(LOGITS, "margin", 0.5).tolist() == [True, True, False]
    assert Gate("margin", 1.0).should_send(LOGITS).tolist() == [True, True, True]


def test_extreme_logits_stay_finite() -> None:
    logits = torch.tensor([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4], [0.0, -math.inf, -math.inf]])
    for kind in ("min_entropy", "shannon", "margin"):
        u = uncertainty(logits, kind)
        assert torch.isfinite(u).all(), kind
    h_inf = uncertainty(logits, "min_entropy")
    assert torch.allclose(h_inf, torch.tensor([0.0, math.log2(3), 0.0]), atol=1e-6)
    assert torch.allclose(uncertainty(logits, "margin"), torch.tensor([1.0, 0.0, 1.0]), atol=1e-6)


def test_bf16_logits_use_float32_math() -> None:
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for kind in ("min_entropy", "shannon", "margin"):
        u = uncertainty(logits, kind)
        assert u.dtype == torch.float32
        assert torch.equal(u, uncertainty(logits.float(), kind))


def test_gate_object_and_validation() -> None:
    gate = Gate("min_entropy", 1)
    assert isinstance(gate.threshold, float)
    assert torch.equal(gate.should_send(LOGITS), should_send(LOGITS, "min_entropy", 1.0))
    assert torch.equal(gate.uncertainty(LOGITS), uncertainty(LOGITS, "min_entropy"))
    for kind, thr in [("entropy", 1.0), ("min_entropy", -0.1), ("shannon", math.nan), ("margin", 1.5),
                      ("margin", -0.1), ("min_entropy", math.inf), ("min_entropy", "x"), ("margin", True)]:
        with pytest.raises(ConfigError):
            Gate(kind, thr)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        uncertainty(LOGITS, "entropy")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        uncertainty(torch.zeros(3), "shannon")
    with pytest.raises(ValueError):
        uncertainty(torch.zeros(2, 1), "margin")


logit_batches = arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(2, 12)),
                       elements=st.floats(-30, 30, width=32)).map(torch.from_numpy)


@PROPS
@given(logit_batches, st.floats(0.0, 5.0), st.floats(0.0, 5.0))
def test_entropy_gates_are_monotone(logits: torch.Tensor, a: float, b: float) -> None:
    lo, hi = min(a, b), max(a, b)
    for kind in ("min_entropy", "shannon"):
        sent_hi = should_send(logits, kind, hi)
        sent_lo = should_send(logits, kind, lo)
        assert not (sent_hi & ~sent_lo).any()  # a higher η never sends an image a lower η keeps


@PROPS
@given(logit_batches, st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_margin_gate_is_monotone(logits: torch.Tensor, a: float, b: float) -> None:
    lo, hi = min(a, b), max(a, b)
    assert not (should_send(logits, "margin", lo) & ~should_send(logits, "margin", hi)).any()


@PROPS
@given(logit_batches)
def test_uncertainty_ranges(logits: torch.Tensor) -> None:
    c = logits.shape[1]
    h_inf = uncertainty(logits, "min_entropy")
    h = uncertainty(logits, "shannon")
    m = uncertainty(logits, "margin")
    eps = 1e-5
    assert ((h_inf >= -eps) & (h_inf <= math.log2(c) + eps)).all()
    assert ((h >= -eps) & (h <= math.log2(c) + eps)).all()
    assert (h >= h_inf - eps).all()  # Shannon entropy ≥ min-entropy for every distribution
    assert ((m >= -eps) & (m <= 1 + eps)).all()
    # min-entropy and margin read the same top probability: p1 = 2^{−H∞} ≥ margin.
    assert (torch.exp2(-h_inf) >= m - eps).all()
