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


@pytest.mark.parametrize(("first", "offer", "offered"), [
    (("topk", 16), ("topk", 40), 40),  # a larger top-k: the offer is exactly it
    (("sum_threshold", 0.5), ("all", 1), 64),  # every patch offered
])
def test_top_up_offers_the_sent_patches_and_the_offer_rule_on_the_same_scores(
        edge: LoadedModel, first: tuple[str, float], offer: tuple[str, float], offered: int) -> None:
    samples = _samples(8)
    selection = SelectionConfig(rule=first[0], value=first[1], offer_rule=offer[0],  # type: ignore[arg-type]
                                offer_value=offer[1])
    probe = EdgeEngine(edge, GateConfig(), selection, CodecConfig())
    gate = GateConfig(threshold=_median_threshold(probe, samples))
    plain = EdgeEngine(edge, gate, selection, CodecConfig()).run(samples)
    engine = EdgeEngine(edge, gate, selection, CodecConfig(), top_up=True)
    decisions = engine.run(samples)

    pixels = [engine.pixels(s) for s in samples]
    out = engine.forward(engine.images(pixels))
    scores = scores_float64(out, "attention")
    for i, (d, p) in enumerate(zip(decisions, plain, strict=True)):
        assert d.send == p.send and d.payload == p.payload  # the first leg is the plain request, bit for bit
        if not d.send:
            assert d.offer is None and d.pixels is None
            continue
        assert d.indices is not None and d.offer is not None and d.pixels is not None
        np.testing.assert_array_equal(d.pixels, pixels[i])  # held for the second leg
        if offer[0] == "all":
            expected = np.arange(64)
        else:
            expected = select_batch(scores[i:i + 1], SelectionRule(offer[0], offer[1]))[0].indices  # type: ignore[arg-type]
        np.testing.assert_array_equal(d.offer, np.union1d(d.indices, expected))
        assert d.offer.size == offered and np.isin(d.indices, d.offer).all()


def test_top_up_offers_nothing_when_the_offer_rule_adds_no_patch(edge: LoadedModel) -> None:
    selection = SelectionConfig(rule="topk", value=24, offer_rule="topk", offer_value=10)
    engine = EdgeEngine(edge, GateConfig(threshold=0.0), selection, CodecConfig(), top_up=True)
    decisions = engine.run(_samples(4))
    assert all(d.send and d.offer is None and d.pixels is None for d in decisions)


def test_top_up_and_region_offload_exclude_each_other(edge: LoadedModel) -> None:
    from shared.config import RegionConfig
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match="either"):
        EdgeEngine(edge, GateConfig(), SelectionConfig(), CodecConfig(), region=RegionConfig(), top_up=True)


def test_spread_selects_and_offers_in_the_spread_order(edge: LoadedModel) -> None:
    """selection.spread: the sent patches and the top-up's offer are the spread order's prefixes on the same
    scores, so the offer holds the sent patches."""
    samples = _samples(6)
    selection = SelectionConfig(rule="topk", value=16, offer_rule="topk", offer_value=32, spread=2)
    engine = EdgeEngine(edge, GateConfig(threshold=0.0), selection, CodecConfig(), top_up=True)  # sends all
    decisions = engine.run(samples)
    scores = scores_float64(engine.forward(engine.images([engine.pixels(s) for s in samples])), "attention")
    differs = 0
    for i, d in enumerate(decisions):
        assert d.send and d.indices is not None and d.offer is not None
        sent = select_batch(scores[i:i + 1], SelectionRule("topk", 16, spread=2))[0].indices
        np.testing.assert_array_equal(d.indices, sent)
        np.testing.assert_array_equal(d.offer, select_batch(scores[i:i + 1], SelectionRule("topk", 32, spread=2))[0]
                                      .indices)
        differs += not np.array_equal(sent, select_batch(scores[i:i + 1], SelectionRule("topk", 16))[0].indices)
    assert differs > 0  # not the paper's top-16 on these images
