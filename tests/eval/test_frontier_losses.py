"""scripts/frontier_losses.py: where a frontier point's accuracy goes, checked against brute force and
against the eval's own frontier on a tiny cached run."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from eval_helpers import cached_tiny_eval

from shared.gates import UncertaintyKind, should_send, uncertainty

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "frontier_losses.py"


@pytest.fixture(scope="module")
def fl() -> ModuleType:
    spec = importlib.util.spec_from_file_location("frontier_losses", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["frontier_losses"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _passes(fl: ModuleType, seed: int = 0, n: int = 60, patches: int = 16) -> Any:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4)).astype(np.float32)
    logits[:, 0] = np.round(logits[:, 0], 1)  # some tied uncertainties
    server_ok = rng.random(n) < 0.8
    selections = {f"topk-{k}": (server_ok & (rng.random(n) < 0.6 + 0.05 * k), np.full(n, k, dtype=np.int64))
                  for k in (4, 8)}
    selections["sum_threshold-0.9"] = (server_ok & (rng.random(n) < 0.9), rng.integers(1, patches + 1, n))
    return fl.Passes(labels=labels, edge_logits=logits, edge_ok=logits.argmax(1) == labels, server_ok=server_ok,
                     num_patches=patches, selections=selections)


def _brute_best(passes: Any, kind: UncertaintyKind, budget: float) -> float:
    """Every threshold the gate could use (each observed value, and one past them all), sent by the
    service's own :func:`shared.gates.should_send`."""
    logits = torch.from_numpy(passes.edge_logits)
    values = sorted(set(uncertainty(logits, kind).tolist()))
    thresholds = [*values, values[-1] + 1.0] if kind != "margin" else [-1.0, *values]
    edge_ok, n = passes.edge_ok, len(passes.labels)
    best = float(edge_ok.mean())
    for (ok, counts), t in itertools.product(passes.selections.values(), thresholds):
        send = should_send(logits, kind, float(np.float32(t))).numpy()
        cost = counts[send].sum() / (n * passes.num_patches)
        if cost <= budget + 1e-12:
            best = max(best, float(np.where(send, ok, edge_ok).mean()))
    return best


@pytest.mark.parametrize("kind", ["min_entropy", "shannon", "margin"])
@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_best_gate_is_the_best_threshold(fl: ModuleType, kind: UncertaintyKind, budget: float) -> None:
    passes = _passes(fl)
    got = fl.best_gate(passes, kind, budget)
    assert got.accuracy == pytest.approx(_brute_best(passes, kind, budget), abs=1e-12)
    assert got.cost <= budget + 1e-12 and 0.0 <= got.sent <= 1.0


def test_the_loss_splits_into_gate_and_partial_images(fl: ModuleType) -> None:
    passes = _passes(fl, seed=1)
    point = fl.best_gate(passes, "min_entropy", 0.4)
    split = fl.split_loss(passes, point)
    assert split["total_points"] == pytest.approx(split["gate_points"] + split["partial_images_points"])
    assert split["total_points"] == pytest.approx((point.accuracy - passes.server_ok.mean()) * 100)


def test_the_oracle_gate_bounds_every_gate(fl: ModuleType) -> None:
    passes = _passes(fl, seed=2)
    oracle = fl.oracle_gate(passes, 0.3)
    assert oracle.cost <= 0.3 + 1e-12
    for kind in ("min_entropy", "shannon", "margin"):
        assert oracle.accuracy >= fl.best_gate(passes, kind, 0.3).accuracy


def test_two_level_budget_stays_within_it(fl: ModuleType) -> None:
    passes = _passes(fl, seed=3)
    point, second, head = fl.two_level(passes, 0.3, steps=10)
    assert point.cost <= 0.3 + 1e-12 and 0.0 <= head <= point.sent <= 1.0
    assert second in passes.selections and point.rule in passes.selections


def _logits(passes: Any, seed: int) -> dict[str, np.ndarray]:
    """Server logits per rule whose argmax is right exactly where the rule's ``ok`` says."""
    rng = np.random.default_rng(seed)
    out = {}
    for rule, (ok, _) in passes.selections.items():
        logits = rng.normal(size=(len(ok), 4)).astype(np.float32)
        wrong = (passes.labels + 1) % 4
        logits[np.arange(len(ok)), np.where(ok, passes.labels, wrong)] += 10.0
        out[rule] = logits
    return out


def test_fusion_spans_the_edge_and_the_gate(fl: ModuleType) -> None:
    """Server weight 1 is the min-entropy gate itself; weight 0 answers every sent image with the edge's
    own label, so sending never changes an answer: edge-only accuracy at cost 0."""
    passes = _passes(fl, seed=5)
    logits = _logits(passes, seed=5)
    gate = fl.best_gate(passes, "min_entropy", 0.4)
    assert fl.fused(passes, logits, 0.4, 1.0).accuracy == pytest.approx(gate.accuracy, abs=1e-12)
    edge_only = fl.fused(passes, logits, 0.4, 0.0)
    assert edge_only.accuracy == pytest.approx(passes.edge_ok.mean()) and edge_only.cost == 0.0
    with pytest.raises(ValueError):
        fl.fused(passes, logits, 0.4, 1.5)


def test_learned_gate_finds_what_the_logits_give_away(fl: ModuleType) -> None:
    """Where sending helps exactly for one predicted class (the edge always wrong there, the server
    always right) and nowhere else, the cross-validated gate finds that class and beats min-entropy."""
    rng = np.random.default_rng(6)
    n, patches = 400, 16
    logits = rng.normal(size=(n, 4)).astype(np.float32)
    logits[np.arange(n), rng.integers(0, 4, n)] += 3.0  # confident edges too: min-entropy is no oracle
    predicted = logits.argmax(1)
    labels = np.where(predicted == 2, (predicted + 1) % 4, predicted)  # the edge: wrong on class 2 only
    ok = predicted == 2  # the server on its patches: right on class 2, wrong elsewhere (sending those loses)
    passes = fl.Passes(labels=labels, edge_logits=logits, edge_ok=predicted == labels, server_ok=np.ones(n, bool),
                       num_patches=patches, selections={"topk-8": (ok, np.full(n, 8, dtype=np.int64))})
    budget = 0.5 * float((predicted == 2).mean()) + 0.01  # room for exactly the class-2 images
    point, splits = fl.learned_gate(passes, budget, splits=3)
    assert len(splits) == 3 and point.cost <= budget + 1e-12
    assert point.accuracy == pytest.approx(1.0)  # every class-2 image sent and answered right
    assert point.accuracy > fl.best_gate(passes, "min_entropy", budget).accuracy


def test_auroc_is_the_pairwise_probability(fl: ModuleType) -> None:
    rng = np.random.default_rng(4)
    score = np.round(rng.normal(size=80), 1)  # ties count one half
    positive = rng.random(80) < 0.3
    pairs = [(a > b) + 0.5 * (a == b) for a, b in itertools.product(score[positive], score[~positive])]
    assert fl.auroc(score, positive) == pytest.approx(float(np.mean(pairs)))


def test_agrees_with_the_eval_frontier_on_a_cached_run(fl: ModuleType, tmp_path: Path) -> None:
    paths = cached_tiny_eval(tmp_path)
    out = paths["out"]
    figures = tmp_path / "losses.json"
    assert fl.main([str(out), "--budget", "0.5", "--json", str(figures)]) == 0
    got = json.loads(figures.read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert got["images"] == summary["images"] == 30
    assert got["server_accuracy"] == pytest.approx(summary["server"]["accuracy"])
    assert got["edge_accuracy"] == pytest.approx(summary["edge"]["accuracy"])
    # the min-entropy gate at every η over the edge-attention rules is the eval's exact-η method frontier
    assert got["gates"]["min_entropy"]["accuracy"] == pytest.approx(
        summary["acceptance"]["exact_eta"]["frontier_accuracy_at_cost_0.5"], abs=1e-12)
    # the extensions ran on the eval's cached server logits: weight 1 is the gate itself again
    assert set(got["fusion"]) == {"0.5", "0.7", "0.8", "0.9"} and len(got["learned_gate"]["splits"]) == 5
    # the top-up includes one round: at every η over the same rules it is at least the gate's point
    assert got["top_up"]["accuracy"] >= got["gates"]["min_entropy"]["accuracy"] - 1 / 30
    assert len(got["top_up"]["held_out"]["top_up"]) == 10
    plot = tmp_path / "top-up.png"
    assert fl.main([str(out), "--budget", "0.5", "--fusion-weights", "1", "--splits", "0", "--json",
                    str(figures), "--plot", str(plot)]) == 0
    again = json.loads(figures.read_text())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = again["top_up"]["curves"]
    assert len(curves["one_round"]) == len(curves["top_up"]) == 21  # comm cost 0.1 … 0.6 by 0.025
    for one, both, budget in zip(curves["one_round"], curves["top_up"], np.arange(0.1, 0.6001, 0.025), strict=True):
        assert one["first"] == one["second"] or one["first"] == "edge only"  # one round asks for nothing
        assert max(one["cost"], both["cost"]) <= budget + 1e-9
        assert both["accuracy"] >= one["accuracy"]  # the top-up's pairs include every one-round rule
    accuracies = [p["accuracy"] for p in curves["top_up"]]
    assert accuracies == sorted(accuracies), "a larger budget allows every point of a smaller one"
    # (the cache holds the logits as float16: a near-tie may flip one of the 30 answers)
    assert again["fusion"]["1"]["accuracy"] == pytest.approx(got["gates"]["min_entropy"]["accuracy"], abs=1 / 30)
    assert again["learned_gate"] == {}
    with pytest.raises(SystemExit):
        fl.main([str(paths["data"])])  # no cached eval there


def _top_up_case(fl: ModuleType, seed: int = 5, n: int = 40, patches: int = 12) -> tuple[Any, dict[str, Any]]:
    """Passes and top-up rules: top-k masks of one random ranking per image (so top-4 ⊂ top-8 ⊂ whole),
    the server right more often with more patches, continuous uncertainties (no ties)."""
    rng = np.random.default_rng(seed)
    passes = _passes(fl, seed=seed, n=n, patches=patches)
    passes = fl.Passes(labels=passes.labels, edge_logits=rng.normal(size=(n, 4)).astype(np.float32) * 2,
                       edge_ok=rng.random(n) < 0.55, server_ok=passes.server_ok, num_patches=patches, selections={})
    ranking = np.argsort(rng.random((n, patches)), axis=1)
    rules: dict[str, Any] = {}
    for k, p_right in ((4, 0.5), (8, 0.7)):
        masks = np.zeros((n, patches), dtype=bool)
        np.put_along_axis(masks, ranking[:, :k], True, axis=1)
        rules[f"topk-{k}"] = (masks, rng.random(n) < p_right, rng.random(n) * 2)
    rules[fl.FULL] = (np.ones((n, patches), dtype=bool), passes.server_ok, rng.random(n) * 2)
    return passes, rules


def _brute_top_up(fl: ModuleType, passes: Any, rules: dict[str, Any], budget: float) -> float:
    """Every pair, every edge threshold (each observed uncertainty, and none), every server threshold."""
    u_edge = fl.edge_uncertainty(passes, "min_entropy")
    best = float(passes.edge_ok.mean())
    for a, b in fl.top_up_pairs(rules):
        ma, ok_a, u_a = rules[a]
        mb, ok_b, _ = rules[b]
        for eta in u_edge:
            send = u_edge >= eta
            for eta2 in [*u_a, np.inf]:
                ask = send & (u_a >= eta2) & (a != b)
                cost = (ma.sum(1)[send].sum() + (mb.sum(1) - ma.sum(1))[ask].sum()) / (len(u_edge) * passes.num_patches)
                if cost <= budget + 1e-12:
                    best = max(best, float(np.where(ask, ok_b, np.where(send, ok_a, passes.edge_ok)).mean()))
    return best


@pytest.mark.parametrize("budget", [0.2, 0.35, 0.6])
def test_top_up_is_the_best_pair_and_thresholds(fl: ModuleType, budget: float) -> None:
    passes, rules = _top_up_case(fl)
    pairs = fl.top_up_pairs(rules)
    assert ("topk-4", "topk-8") in pairs and ("topk-4", fl.FULL) in pairs and ("topk-8", "topk-4") not in pairs
    assert ("topk-4", "topk-4") in pairs and all(a != fl.FULL for a, _ in pairs)
    got = fl.server_tops_up(rules, passes, budget, pairs, sends=len(passes.labels))  # every n
    assert got.accuracy == pytest.approx(_brute_top_up(fl, passes, rules, budget), abs=1e-12)
    assert got.cost <= budget + 1e-12
    # its thresholds, applied to the same images, give the same point (no tied uncertainties here)
    acc, cost = fl.apply_top_up(rules, passes, got, np.arange(len(passes.labels)))
    assert acc == pytest.approx(got.accuracy) and cost == pytest.approx(got.cost)
    one_round = fl.server_tops_up(rules, passes, budget, [p for p in pairs if p[0] == p[1]], sends=40)
    assert one_round.asked == 0 and one_round.accuracy <= got.accuracy


def test_top_up_held_out_scores_each_half_with_the_other_halfs_choice(fl: ModuleType) -> None:
    passes, rules = _top_up_case(fl, seed=6, n=60)
    held = fl.top_up_held_out(rules, passes, 0.4, splits=3)
    assert set(held) == {"top_up", "one_round"} and all(len(v) == 6 for v in held.values())
    halves = np.array_split(np.random.default_rng(0).permutation(60), 2)
    point = fl.server_tops_up(rules, passes, 0.4, fl.top_up_pairs(rules), halves[0])
    acc, cost = fl.apply_top_up(rules, passes, point, halves[1])
    assert held["top_up"][0] == pytest.approx(((acc - passes.server_ok[halves[1]].mean()) * 100, cost))


def test_top_up_held_out_with_the_rules_fixed_chooses_only_the_thresholds(fl: ModuleType) -> None:
    passes, rules = _top_up_case(fl, seed=7, n=60)
    pairs = fl.top_up_pairs(rules)
    pair = next(p for p in pairs if p[0] != p[1])
    rule = next(p[0] for p in pairs if p[0] == p[1])
    held = fl.top_up_held_out(rules, passes, 0.4, splits=2, pair=pair, rule=rule)
    halves = np.array_split(np.random.default_rng(1).permutation(60), 2)
    for name, candidates in (("top_up", [pair]), ("one_round", [(rule, rule)])):
        point = fl.server_tops_up(rules, passes, 0.4, candidates, halves[1])
        assert (point.first, point.second) in ({(*candidates[0],)} | {("edge only", "edge only")})
        acc, cost = fl.apply_top_up(rules, passes, point, halves[0])
        assert held[name][3] == pytest.approx(((acc - passes.server_ok[halves[0]].mean()) * 100, cost))
    with pytest.raises(ValueError, match="no rule pair"):
        fl.top_up_held_out(rules, passes, 0.4, splits=1, pair=("nope", "full"))
