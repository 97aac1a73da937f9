"""The edge's min-entropy gate on the CPU (``_min_entropy_topk``) gives what the general torch path
(``_gate_topk``: ``Gate.decide``, softmax, ``torch.topk``) gives, bit for bit: the send decisions, the
uncertainties, the top-k ids and probabilities. Where it cannot promise that (a tie among the top k + 1
probabilities, NaN logits) it hands over to the general path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_node.engine import TOPK, EdgeEngine, EdgeGate, _gate_topk, _min_entropy_topk
from shared.attention import EdgeOutput
from shared.config import CodecConfig, GateConfig, SelectionConfig
from shared.gates import Gate
from shared.models import build_model


def _bits(values: list[float]) -> list[int]:
    return np.asarray(values, dtype=np.float32).view(np.int32).tolist()


def _same(fast: EdgeGate, ref: EdgeGate) -> None:
    assert fast.send == ref.send
    assert _bits(fast.uncertainty) == _bits(ref.uncertainty)
    assert fast.topk_ids == ref.topk_ids
    assert [_bits(list(p)) for p in fast.topk_probs] == [_bits(list(p)) for p in ref.topk_probs]


def _general(logits: torch.Tensor, threshold: float) -> EdgeGate:
    with torch.inference_mode():
        return _gate_topk(Gate("min_entropy", threshold), logits)


@pytest.mark.parametrize("classes", [2, 3, 10, 100])
@pytest.mark.parametrize("scale", [0.1, 3.0, 40.0])
def test_fast_gate_matches_the_general_path(classes: int, scale: float) -> None:
    g = torch.Generator().manual_seed(classes * 100 + int(scale * 10))
    logits = torch.randn(256, classes, generator=g) * scale
    u = _general(logits, 0.0).uncertainty  # every uncertainty, to put η on and around them
    thresholds = [0.0, 0.8, float(np.median(u)), float(np.float32(u[0])), math.nextafter(u[1], math.inf),
                  float(np.nextafter(np.float32(u[2]), np.float32(0.0))), math.log2(classes)]
    probs = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True).values[:, : TOPK + 1]
    tied = bool((probs[:, 1:] == probs[:, :-1]).any())  # e.g. probabilities that underflow to 0 at scale 40
    for eta in thresholds:
        fast = _min_entropy_topk(logits, eta)
        if tied:
            assert fast is None
        else:
            assert fast is not None
            _same(fast, _general(logits, eta))


def test_eta_is_compared_in_float32_as_torch_does() -> None:
    """η = 0.7 is not a float32: float32(0.7) < 0.7. An image whose uncertainty is float32(0.7) is sent by
    torch's float32 comparison (a float64 comparison would keep it); logits built for that uncertainty."""
    target = np.float32(0.7)
    # two classes, p = 2^-0.7: logits (log p, log(1 - p)) give log_softmax max ≈ -0.7·ln 2
    for nudge in range(-40, 41):  # find logits whose float32 uncertainty is exactly float32(0.7)
        p = 2.0 ** -(0.7 + nudge * 1e-8)
        logits = torch.tensor([[math.log(p), math.log(1 - p)]], dtype=torch.float32)
        ref = _general(logits, 0.7)
        if np.float32(ref.uncertainty[0]) == target:
            break
    else:
        pytest.skip("no logits found whose uncertainty rounds to float32(0.7)")
    assert ref.send == [0]  # torch compares in float32
    fast = _min_entropy_topk(logits, 0.7)
    assert fast is not None
    _same(fast, ref)


def test_ties_and_nan_go_to_the_general_path() -> None:
    tie = torch.tensor([[0.1, 2.0, 2.0, 2.0, 0.5, -1.0, 0.0, 0.3, 0.2, 0.4]])
    assert _min_entropy_topk(tie, 0.8) is None
    below = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -1.0, -1.0, -1.0]])  # ties below the top k+1
    assert TOPK + 1 <= 6
    fast = _min_entropy_topk(below, 0.8)
    assert fast is not None
    _same(fast, _general(below, 0.8))
    nan = torch.tensor([[float("nan")] + [0.0] * 9])
    assert _min_entropy_topk(nan, 0.8) is None


def test_engine_gate_topk_uses_it_and_matches() -> None:
    torch.manual_seed(0)
    loaded = build_model("zoo:cifar10-edge", role="edge")
    engine = EdgeEngine(loaded, GateConfig("min_entropy", 0.8), SelectionConfig("topk", 16, "attention"),
                        CodecConfig("raw", 90))
    rng = np.random.default_rng(3)
    pixels = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(32)]
    out: EdgeOutput = engine.forward(engine.images(pixels))
    ref = _general(out.logits.float(), 0.8)
    _same(engine.gate_topk(out), ref)
    for i in range(4):  # batch 1, as a device runs it
        _same(engine.gate_topk(out.rows([i])), _general(out.logits[i:i + 1].float(), 0.8))


def test_an_eta_beyond_float32_sends_nothing_as_torch() -> None:
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(5))
    fast = _min_entropy_topk(logits, 1e39)  # float32(1e39) = inf: no uncertainty reaches it
    assert fast is not None
    _same(fast, _general(logits, 1e39))
    assert fast.send == []
