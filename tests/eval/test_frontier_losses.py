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
from eval_helpers import tiny_eval_set

from patchcast.cli import main as patchcast_main
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


def test_auroc_is_the_pairwise_probability(fl: ModuleType) -> None:
    rng = np.random.default_rng(4)
    score = np.round(rng.normal(size=80), 1)  # ties count one half
    positive = rng.random(80) < 0.3
    pairs = [(a > b) + 0.5 * (a == b) for a, b in itertools.product(score[positive], score[~positive])]
    assert fl.auroc(score, positive) == pytest.approx(float(np.mean(pairs)))


def test_agrees_with_the_eval_frontier_on_a_cached_run(fl: ModuleType, tmp_path: Path) -> None:
    paths = tiny_eval_set(tmp_path, classes=3, per_class=10, patch_size=8, depth=1)
    out = tmp_path / "out"
    assert patchcast_main(["eval", "--data", str(paths["data"]), "--edge", f"file:{paths['edge']}", "--server",
                           f"file:{paths['server']}", "--sweep", "quick", "--out", str(out), "--threads", "1",
                           "--bytes-sample", "4", "--bootstrap", "10", "--no-plots", "--no-rollout",
                           "--no-server-encoder"]) == 0
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
    with pytest.raises(SystemExit):
        fl.main([str(paths["data"])])  # no cached eval there
