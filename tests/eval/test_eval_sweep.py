"""The sweep math of ``patchcast eval``: pure numpy, checked against the shared definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcast.eval.bytes import bytes_fraction
from patchcast.eval.frontier import (
    bootstrap_acceptance,
    compare_frontiers,
    exact_gate_curve,
    frontier_at,
    pareto_frontier,
    random_matched_selection,
    send_masks,
    sweep_gate,
    thin_frontier,
)
from patchcast.eval.grid import FULL_GRID, QUICK_GRID, SelectionSpec, build_specs, gate_thresholds
from patchcast.eval.passes import padded_groups
from patchcast.eval.summary import selection_geometry
from shared.costs import communication_cost
from shared.gates import should_send, uncertainty


@pytest.mark.parametrize("kind", ["min_entropy", "shannon", "margin"])
def test_send_masks_match_shared_gate(kind: str) -> None:
    logits = torch.randn(300, 10, generator=torch.Generator().manual_seed(1)) * 3
    u = uncertainty(logits, kind).numpy()  # type: ignore[arg-type]
    # Observed values are the hard case: the threshold equals an image's uncertainty exactly.
    thresholds = [*gate_thresholds(u, kind, FULL_GRID), float(u[0]), float(u[17])]  # type: ignore[arg-type]
    masks = send_masks(u, kind, thresholds)  # type: ignore[arg-type]
    for t, row in zip(thresholds, masks, strict=True):
        assert np.array_equal(row, should_send(logits, kind, t).numpy()), (kind, t)  # type: ignore[arg-type]


def test_gate_thresholds_cover_all_sent_fractions() -> None:
    u = np.random.default_rng(0).uniform(0, 3.3, 1000).astype(np.float32)
    etas = gate_thresholds(u, "min_entropy", QUICK_GRID)
    sent = send_masks(u, "min_entropy", etas).mean(axis=1)
    assert etas == sorted(etas) and sent[0] == 1.0 and sent[-1] < 0.01
    assert set(QUICK_GRID.fixed_etas) <= set(etas)
    margins = gate_thresholds(np.random.default_rng(0).uniform(0, 1, 100), "margin", QUICK_GRID)
    assert min(margins) >= 0.0 and max(margins) <= 1.0


def test_sweep_gate_by_hand() -> None:
    edge = np.array([True, False, False, True])
    server = np.array([False, True, True, True])
    counts = np.array([10, 20, 30, 40])
    send = np.array([[False, False, False, False], [False, True, True, False], [True, True, True, True]])
    gs = sweep_gate(edge, server, counts, send)
    assert gs.images_sent.tolist() == [0, 2, 4]
    assert gs.patches_sent.tolist() == [0, 50, 100]
    assert gs.accuracy.tolist() == [0.5, 1.0, 0.75]
    # The paper's metric from those counts, N = 64 patches per image.
    assert communication_cost(2, 4, 50, 2 * 64) == pytest.approx(50 / (4 * 64))


def test_sweep_gate_takes_expected_correctness() -> None:
    """A baseline averaged over draws is right with a probability; the sweep averages it exactly."""
    edge = np.array([True, False])
    server = np.array([0.25, 0.5])  # e.g. right in 1 of 4 and 2 of 4 random draws
    gs = sweep_gate(edge, server, np.array([3, 5]), np.array([[True, True], [False, True]]))
    assert gs.accuracy.tolist() == [0.375, 0.75]


def test_exact_gate_curve_by_hand() -> None:
    # min-entropy sends the most uncertain first; images 1 and 2 tie, so no threshold splits them
    u = np.array([0.1, 0.9, 0.9, 0.5], dtype=np.float32)
    edge = np.array([True, False, True, False])
    server = np.array([True, True, False, True])
    cost, acc = exact_gate_curve(u, "min_entropy", edge, server, np.array([8, 4, 6, 2]), 8)
    assert cost.tolist() == pytest.approx([0.0, 10 / 32, 12 / 32, 20 / 32])
    assert acc.tolist() == [0.5, 0.5, 0.75, 0.75]


@pytest.mark.parametrize("kind", ["min_entropy", "shannon", "margin"])
def test_exact_gate_curve_is_sweep_gate_at_every_threshold(kind: str) -> None:
    """Each point of the exact curve is ``sweep_gate`` at one observed η, and every observed η
    (plus one beyond all of them: nothing sent) gives a point of the curve."""
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(size=(400, 10)).astype(np.float32) * 2)
    logits[::7] = logits[3]  # tied uncertainties
    u = uncertainty(logits, kind).numpy()  # type: ignore[arg-type]
    edge = rng.random(400) < 0.6
    server = rng.random(400)  # expected correctness, as for averaged random draws
    counts = rng.integers(1, 65, 400)
    cost, acc = exact_gate_curve(u, kind, edge, server, counts, 64)  # type: ignore[arg-type]
    beyond = -1.0 if kind == "margin" else float(u.max()) + 1.0
    etas = [*sorted({float(x) for x in u}), beyond]
    gs = sweep_gate(edge, server, counts, send_masks(u, kind, etas))  # type: ignore[arg-type]
    grid = {(round(p / (400 * 64), 12), round(a, 12)) for p, a in zip(gs.patches_sent, gs.accuracy, strict=True)}
    exact = {(round(c, 12), round(a, 12)) for c, a in zip(cost, acc, strict=True)}
    assert exact == grid
    assert len(cost) == len(np.unique(u.astype(np.float32))) + 1


def test_bootstrap_acceptance_pairs_its_resamples() -> None:
    """Method and baseline are recomputed on the same resampled images: identical selections give a
    gap of exactly zero in every resample, and a server right on every image a loss of exactly zero."""
    rng = np.random.default_rng(5)
    u = rng.random(300).astype(np.float32)
    edge = rng.random(300) < 0.5
    sel = [(rng.random(300) < 0.7, rng.integers(1, 65, 300)) for _ in range(3)]
    boot = bootstrap_acceptance(u, "min_entropy", edge, np.ones(300, dtype=bool), sel, list(sel), 64, resamples=30)
    assert boot["resamples"] == 30
    assert all(g["mean"] == g["lo"] == g["hi"] == 0.0 and g["p_below"] == 0.0 for g in boot["method_minus_baseline"])
    # A server right on every image, sent whole: at cost 0.5 the frontier sends the most uncertain half.
    full = [(np.ones(300), np.full(300, 64))]
    worse = [(np.zeros(300), np.full(300, 64))]
    boot = bootstrap_acceptance(u, "min_entropy", edge, np.ones(300, dtype=bool), full, worse, 64, resamples=30)
    assert all(g["lo"] >= 0.0 and g["p_below"] == 0.0 for g in boot["method_minus_baseline"])
    assert all(g["mean"] > 0.0 for g in boot["method_minus_baseline"])
    assert 0.0 < boot["loss_at_cost_0.5"]["mean"] < 50.0 and boot["loss_at_cost_0.5"]["p_over_1_point"] == 1.0


def test_random_draws_are_distinct_specs_of_one_twin() -> None:
    specs = build_specs(QUICK_GRID, 64, rollout=False, server_encoder=False, random_draws=3)
    randoms = [s for s in specs if s.score == "random"]
    assert len(randoms) == 3 * len([s for s in specs if s.score == "attention"])
    assert len({s.id for s in specs}) == len(specs)
    assert {s.twin for s in randoms if s.rule == "topk" and s.value == 16} == {
        SelectionSpec("edge", "attention", "topk", 16.0)}
    assert SelectionSpec("edge", "random", "topk", 16.0, 2).id == "edge-random-topk-16-draw2"
    assert SelectionSpec("edge", "random", "topk", 16.0).id == "edge-random-topk-16"  # caches stay valid


def _dominated(i: int, cost: np.ndarray, acc: np.ndarray) -> bool:
    return bool(np.any((cost <= cost[i]) & (acc >= acc[i]) & ((cost < cost[i]) | (acc > acc[i]))))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=40))
def test_pareto_frontier_is_exactly_the_undominated_set(pts: list[tuple[int, int]]) -> None:
    cost = np.array([p[0] / 20 for p in pts])
    acc = np.array([p[1] / 20 for p in pts])
    front = pareto_frontier(cost, acc)
    assert np.all(np.diff(cost[front]) > 0) and np.all(np.diff(acc[front]) > 0)  # monotone
    for i in range(len(pts)):
        on = any(cost[j] == cost[i] and acc[j] == acc[i] for j in front)
        assert on != _dominated(i, cost, acc)


def test_frontier_at_and_comparison() -> None:
    fc, fa = np.array([0.0, 0.2, 0.5]), np.array([0.7, 0.8, 0.9])
    assert [frontier_at(fc, fa, c) for c in (0.1, 0.5, 9.0)] == [0.7, 0.9, 0.9]
    assert np.isnan(frontier_at(fc + 0.1, fa, 0.05))
    cmp = compare_frontiers(fc, fa, np.array([0.0, 0.3, 0.6]), np.array([0.7, 0.75, 0.95]))
    assert cmp.costs == [0.0, 0.3, 0.6] and cmp.method == [0.7, 0.8, 0.9]
    assert not cmp.beats_everywhere and cmp.min_margin == pytest.approx(-0.05)


def test_random_matched_selection_keeps_counts() -> None:
    counts = np.array([0, 1, 5, 64, 33])
    masks = random_matched_selection(counts, 64, np.random.default_rng(3))
    assert masks.shape == (5, 64) and masks.sum(axis=1).tolist() == counts.tolist()
    again = random_matched_selection(counts, 64, np.random.default_rng(3))
    assert np.array_equal(masks, again)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 64), min_size=1, max_size=300), st.integers(1, 3000))
def test_padded_groups_partition_and_respect_budget(counts: list[int], budget: int) -> None:
    c = np.array(counts)
    groups = padded_groups(c, budget)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(counts)))
    for g in groups:  # over budget only when one image alone exceeds it
        assert len(g) == 1 or len(g) * (c[g].max() + 1) <= budget


def test_bytes_fraction_is_a_ratio_of_sums() -> None:
    send = np.array([[True, False], [True, True], [False, False]])
    got = bytes_fraction(send, np.array([30, 10]), np.array([100, 300]))
    assert got.tolist() == [30 / 400, 40 / 400, 0.0]


def test_specs_have_twins_and_scale_with_patches() -> None:
    specs = build_specs(FULL_GRID, 196)
    ids = [s.id for s in specs]
    assert len(ids) == len(set(ids))
    for i, s in enumerate(specs):
        if s.score == "random":
            assert s.twin.id in ids[:i]
    topk = sorted(s.value for s in specs if s.rule == "topk" and s.score == "attention")
    assert topk[0] == 12 and topk[-1] == 147  # 1/16 and 3/4 of 196
    assert SelectionSpec("edge", "attention", "sum_threshold", 0.97).id == "edge-attention-sum_threshold-0.97"
    assert {s.rule for s in specs if s.score == "rollout"} == set(FULL_GRID.comparison_rules)


def test_thin_frontier_keeps_one_point_per_cost_step() -> None:
    front = [{"comm_cost": c} for c in (0.0, 0.001, 0.02, 0.049, 0.05, 0.07, 0.12, 0.13, 0.5, 0.74)]
    assert [p["comm_cost"] for p in thin_frontier(front, 0.05)] == [0.0, 0.05, 0.12, 0.5, 0.74]


def test_selection_geometry_hand_worked() -> None:
    # 4×4 grid, k = 4. Image 0 keeps the central 2×2 block; image 1 the four corners (a sink).
    scores = np.zeros((2, 16), dtype=np.float32)
    scores[0, [5, 6, 9, 10]] = 1.0
    scores[1, [0, 3, 12, 15]] = 1.0
    geo = selection_geometry(scores, 4)
    assert geo["central_share"] == pytest.approx(0.5)  # 4 of the 8 kept patches are central
    assert geo["bottom_corners"] == pytest.approx(0.5)  # image 1 only
    assert geo["central_share_random"] == pytest.approx(4 / 16)
    assert geo["bottom_corners_random"] == pytest.approx(4 * 3 / (16 * 15))
    # uniform random scores land near the random expectations
    rng = np.random.default_rng(0)
    geo = selection_geometry(rng.random((20_000, 64)).astype(np.float32), 16)
    assert geo["central_share"] == pytest.approx(0.25, abs=0.01)
    assert geo["bottom_corners"] == pytest.approx(16 * 15 / (64 * 63), abs=0.01)
    with pytest.raises(ValueError):
        selection_geometry(scores[:, :15], 4)  # not a square grid
