"""EdgeEngine.run scores only the images its gate sends: the decisions are those of scoring the whole
batch and reading the sent rows (the reference), bit for bit."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from edge_node.engine import EdgeEngine
from shared.config import CodecConfig, GateConfig, SelectionConfig
from shared.datasets import Sample
from shared.models import LoadedModel, build_model
from shared.scores import scores_float64
from shared.selection import SelectionRule, select_batch


def _samples(count: int, size: int = 32) -> list[Sample]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(Sample(f"img{i}.png", buf.getvalue()))
    return out


@pytest.fixture(scope="module")
def edge() -> LoadedModel:
    torch.manual_seed(0)
    return build_model("zoo:cifar10-edge", role="edge")


def _median_threshold(engine: EdgeEngine, samples: list[Sample]) -> float:
    """An η between the batch's uncertainties, so that the gate sends some images and keeps others."""
    out = engine.forward(engine.images([engine.pixels(s) for s in samples]))
    u = np.sort(engine.gate_topk(out).uncertainty)
    return float((u[len(u) // 2 - 1] + u[len(u) // 2]) / 2)


@pytest.mark.parametrize("score", ["attention", "rollout"])
def test_run_scores_only_sent_images_same_decisions(edge: LoadedModel, score: str) -> None:
    samples = _samples(8)
    selection = SelectionConfig(rule="sum_threshold", value=0.9, score=score)  # type: ignore[arg-type]
    probe = EdgeEngine(edge, GateConfig(), selection, CodecConfig(), measure_full_bytes=True)
    gate = GateConfig(threshold=_median_threshold(probe, samples))
    engine = EdgeEngine(edge, gate, selection, CodecConfig(), measure_full_bytes=True)
    decisions = engine.run(samples)

    # the reference: the whole batch scored, the sent rows selected and encoded
    pixels = [engine.pixels(s) for s in samples]
    out = engine.forward(engine.images(pixels))
    sent = engine.gate_topk(out).send
    assert 0 < len(sent) < len(samples)  # both paths are exercised
    all_scores = scores_float64(out, score)  # type: ignore[arg-type]
    chosen = select_batch(all_scores[sent], SelectionRule(selection.rule, selection.value))
    assert [d.send for d in decisions] == [i in sent for i in range(len(samples))]
    for sel, i in zip(chosen, sent, strict=True):
        d = decisions[i]
        assert d.indices is not None and d.payload is not None
        assert np.array_equal(d.indices, sel.indices)
        assert d.payload == engine.payload(pixels[i], np.asarray(sel.indices, dtype=np.int64), all_scores[i])
        assert d.full_payload_bytes is not None and d.full_payload_bytes == engine.full_bytes(pixels[i])
    for i in set(range(len(samples))) - set(sent):
        assert decisions[i].indices is None and decisions[i].payload is None


def test_edge_output_rows_are_the_rows_bit_for_bit(edge: LoadedModel) -> None:
    engine = EdgeEngine(edge, GateConfig(), SelectionConfig(score="rollout"), CodecConfig())
    out = engine.forward(engine.images([engine.pixels(s) for s in _samples(6)]))
    assert out.rows(range(6)) is out
    for kind in ("attention", "rollout"):
        whole = scores_float64(out, kind)
        for rows in ([3], [0, 2, 5], [5, 1]):
            part = out.rows(rows)
            assert torch.equal(part.logits, out.logits[rows])
            assert np.array_equal(scores_float64(part, kind), whole[rows])


def test_select_refuses_scores_that_do_not_match_the_chosen_images(edge: LoadedModel) -> None:
    engine = EdgeEngine(edge, GateConfig(), SelectionConfig(), CodecConfig())
    assert engine.select(None, []) == {}
    with pytest.raises(ValueError, match="2 images chosen"):
        engine.select(np.full((3, 64), 1 / 64), [0, 2])
