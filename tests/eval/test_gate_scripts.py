"""scripts/edge_gate_views.py and scripts/top_up_two_legs.py on a tiny cached eval: their figures
against ``frontier_losses.py``'s on the same cache, and their refusals; attention_vs_random.py's and
spread_cell_sweep.py's rows."""

from __future__ import annotations

import importlib
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from eval_helpers import cached_tiny_eval

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
N = 30


@pytest.fixture(scope="module")
def scripts() -> Iterator[dict[str, ModuleType]]:
    """The three scripts as modules (the two new ones import ``frontier_losses`` from their folder)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield {name: importlib.import_module(name) for name in ("frontier_losses", "edge_gate_views",
                                                                 "top_up_two_legs", "spread_cell_sweep")}
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="module")
def cached_eval(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return cached_tiny_eval(tmp_path_factory.mktemp("gate-scripts"))


def _args(paths: dict[str, Path]) -> list[str]:
    return [str(paths["out"]), "--data", str(paths["data"]), "--threads", "1"]


def test_flip_average_is_the_mean_of_two_distributions(scripts: dict[str, ModuleType]) -> None:
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(5, 4)).astype(np.float32) * 3 for _ in range(2))
    views = scripts["edge_gate_views"]
    same = views.flip_averaged(a, a)
    np.testing.assert_allclose(same, torch.log_softmax(torch.from_numpy(a), 1).numpy(), atol=1e-6)
    mixed = views.flip_averaged(a, b)
    np.testing.assert_allclose(mixed, views.flip_averaged(b, a), atol=0)
    expected = (np.exp(a) / np.exp(a).sum(1, keepdims=True) + np.exp(b) / np.exp(b).sum(1, keepdims=True)) / 2
    np.testing.assert_allclose(np.exp(mixed), expected, rtol=1e-5)


def test_edge_gate_views_plain_edge_is_the_frontier_scripts_gate(scripts: dict[str, ModuleType],
                                                                 cached_eval: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    fl = scripts["frontier_losses"]
    figures = tmp_path / "views.json"
    assert scripts["edge_gate_views"].main([*_args(cached_eval), "--edge", f"file:{cached_eval['edge']}",
                                            "--budget", "0.5", "--splits", "2", "--json", str(figures)]) == 0
    got: dict[str, Any] = json.loads(figures.read_text())
    passes = fl.load(fl.find_cache(cached_eval["out"]))
    # the cache keeps logits as float16: the recomputed fp32 ones are within its rounding
    assert got["images"] == N and got["check_max_abs_logit_difference"] <= 1e-3
    expected = fl.best_gate(passes, "min_entropy", 0.5)
    assert got["plain"]["one_round"]["accuracy"] == pytest.approx(expected.accuracy, abs=1e-12)
    assert got["plain"]["edge_accuracy"] == pytest.approx(float(passes.edge_ok.mean()))
    for name in ("plain", "flip_averaged"):
        assert got[name]["one_round"]["cost"] <= 0.5 + 1e-12 and got[name]["top_up"]["cost"] <= 0.5 + 1e-12
        assert got[name]["top_up"]["accuracy"] >= got[name]["one_round"]["accuracy"] - 1 / N
        assert len(got[name]["held_out"]["top_up"]) == 4  # 2 splits × 2 halves
    assert len(got["learned_gate_on_features"]["splits"]) == 2


def test_mirrored_masks_mirror_the_grid(scripts: dict[str, ModuleType]) -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((6, 12)) < 0.5  # a 3 × 4 grid
    mirrored = scripts["edge_gate_views"].mirror_masks(masks, 4)
    for b, (r, c) in itertools.product(range(6), itertools.product(range(3), range(4))):
        assert mirrored[b, r * 4 + (3 - c)] == masks[b, r * 4 + c]
    np.testing.assert_array_equal(scripts["edge_gate_views"].mirror_masks(mirrored, 4), masks)


def test_edge_gate_views_with_a_mirror_averaged_server(scripts: dict[str, ModuleType], cached_eval: dict[str, Path],
                                                       tmp_path: Path) -> None:
    fl = scripts["frontier_losses"]
    cache = fl.find_cache(cached_eval["out"])
    rules = list(_nested_rules(fl, cache, fl.load(cache).num_patches))
    figures = tmp_path / "mirror.json"
    models = ["--edge", f"file:{cached_eval['edge']}", "--server", f"file:{cached_eval['server']}"]
    assert scripts["edge_gate_views"].main([*_args(cached_eval), *models, "--budget", "0.5", "--splits", "1",
                                            "--mirror-server", *rules, "--json", str(figures)]) == 0
    got = json.loads(figures.read_text())["mirrored_server"]
    assert got["rules"] == rules and got["check_max_abs_logit_difference"] <= 1e-3
    # the plain server over these rules is the frontier script's gate restricted to them
    passes = fl.load(cache)
    restricted = fl.best_gate(fl.Passes(**{**passes.__dict__, "selections": {r: passes.selections[r] for r in rules}}),
                              "min_entropy", 0.5)
    assert got["plain_server_plain_edge"]["accuracy"] == pytest.approx(restricted.accuracy, abs=1e-12)
    assert got["plain_server_plain_edge"]["server_accuracy"] == pytest.approx(float(passes.server_ok.mean()))
    for key in ("mirror_averaged_server_plain_edge", "mirror_averaged_server_flip_averaged_edge"):
        assert got[key]["cost"] <= 0.5 + 1e-12 and 0.0 <= got[key]["server_accuracy"] <= 1.0
    with pytest.raises(SystemExit, match="no cached selection"):
        scripts["edge_gate_views"].main([*_args(cached_eval), *models, "--mirror-server", "topk-999"])
    with pytest.raises(SystemExit, match="server's logits differ"):
        scripts["edge_gate_views"].main([*_args(cached_eval), "--edge", f"file:{cached_eval['edge']}", "--server",
                                         f"file:{cached_eval['edge']}", "--mirror-server", *rules])


def test_mirror_averaged_server_on_every_rule_adds_its_top_up(scripts: dict[str, ModuleType],
                                                              cached_eval: dict[str, Path], tmp_path: Path) -> None:
    fl = scripts["frontier_losses"]
    cache = fl.find_cache(cached_eval["out"])
    figures = tmp_path / "mirror-all.json"
    models = ["--edge", f"file:{cached_eval['edge']}", "--server", f"file:{cached_eval['server']}"]
    assert scripts["edge_gate_views"].main([*_args(cached_eval), *models, "--budget", "0.5", "--splits", "1",
                                            "--mirror-server", "all", "--json", str(figures)]) == 0
    got = json.loads(figures.read_text())["mirrored_server"]
    assert set(got["rules"]) == set(fl.top_up_rules(cache, fl.load(cache))) - {fl.FULL}
    top_up = got["top_up"]
    own = got["mirror_averaged_server_plain_edge"]["server_accuracy"]
    assert top_up["server_accuracy"] == pytest.approx(own, abs=1e-12)
    for edge in ("plain", "flip_averaged"):
        point, one_round = top_up[f"{edge}_edge"], got[f"mirror_averaged_server_{edge}_edge"]
        assert point["cost"] <= 0.5 + 1e-12
        # every one-round pair is among the top-up's candidates (its η on a coarser grid of sends)
        assert point["accuracy"] >= one_round["accuracy"] - 1 / N
        assert len(point["held_out"]["top_up"]) == 2 and len(point["held_out_pair_fixed"]["top_up"]) == 2


def test_edge_gate_views_refuses_another_edge_than_the_evals(scripts: dict[str, ModuleType],
                                                             cached_eval: dict[str, Path]) -> None:
    with pytest.raises(SystemExit, match="differ from the cache"):
        scripts["edge_gate_views"].main([*_args(cached_eval), "--edge", f"file:{cached_eval['server']}"])


def _nested_rules(fl: ModuleType, cache: Path, patches: int) -> tuple[str, str]:
    """Two cached top-k rules, the smaller one's patches inside the larger's on every image."""
    ks = sorted(int(p.stem.rsplit("-", 1)[1]) for p in cache.glob(f"{fl.SELECTION_PREFIX}topk-*.npz"))
    assert len(ks) >= 2, ks
    return f"topk-{ks[0]}", f"topk-{ks[-1]}"


def _between(values: np.ndarray) -> float:
    """A threshold halfway between the two middle distinct values (no image sits on it)."""
    distinct = np.unique(values.astype(np.float64))
    mid = len(distinct) // 2
    return float((distinct[mid - 1] + distinct[mid]) / 2)


def test_two_legs_of_a_lossless_codec_are_the_offline_top_up(scripts: dict[str, ModuleType],
                                                            cached_eval: dict[str, Path], tmp_path: Path) -> None:
    fl, legs = scripts["frontier_losses"], scripts["top_up_two_legs"]
    cache = fl.find_cache(cached_eval["out"])
    passes = fl.load(cache)
    first, second = _nested_rules(fl, cache, passes.num_patches)
    rules = fl.top_up_rules(cache, passes)
    eta = _between(fl.edge_uncertainty(passes, "min_entropy"))
    eta2 = _between(rules[first][2])
    figures = tmp_path / "legs.json"
    assert legs.main([*_args(cached_eval), "--edge", f"file:{cached_eval['edge']}", "--server",
                      f"file:{cached_eval['server']}", "--first", first, "--second", second, "--eta", str(eta),
                      "--eta2", str(eta2), "--codec", "raw", "--json", str(figures)]) == 0
    got = json.loads(figures.read_text())
    # exact pixels: the layout cannot matter, and the server's answers are the eval's cached ones
    assert got["one_payload"] == got["two_payloads"] and got["asked_same_label"] == 1.0
    point = fl.TopUp(0.0, 0.0, 0.0, 0.0, first, second, eta, eta2)
    accuracy, cost = fl.apply_top_up(rules, passes, point, np.arange(N))
    assert got["one_payload"] == pytest.approx(accuracy, abs=1 / N)  # float16 cache: one near-tie may flip
    assert got["cost"] == pytest.approx(cost, abs=float(passes.num_patches) / (N * passes.num_patches))
    assert 0.0 < got["sent"] < 1.0


def test_two_legs_through_jpeg_and_its_refusals(scripts: dict[str, ModuleType], cached_eval: dict[str, Path],
                                                tmp_path: Path) -> None:
    fl, legs = scripts["frontier_losses"], scripts["top_up_two_legs"]
    cache = fl.find_cache(cached_eval["out"])
    first, second = _nested_rules(fl, cache, fl.load(cache).num_patches)
    common = [*_args(cached_eval), "--edge", f"file:{cached_eval['edge']}", "--server",
              f"file:{cached_eval['server']}", "--eta", "0", "--eta2", "0"]
    figures = tmp_path / "jpeg.json"
    assert legs.main([*common, "--first", first, "--second", second, "--codec-param", "q=50", "--json",
                      str(figures)]) == 0
    got = json.loads(figures.read_text())
    assert got["sent"] == got["asked"] == 1.0 and got["codec_params"]["q"] == 50  # η = η₂ = 0: every image, both legs
    assert 0.0 <= got["two_payloads"] <= 1.0 and 0.0 <= got["asked_same_label"] <= 1.0
    with pytest.raises(SystemExit, match="not a superset"):
        legs.main([*common, "--first", second, "--second", first])
    with pytest.raises(SystemExit, match="no cached selection"):
        legs.main([*common, "--first", "topk-999"])
    for bad in (["--codec-param", "q=x"], ["--codec-param", "zz=3"], ["--codec", "nope"]):
        with pytest.raises(SystemExit) as exit_:  # argparse's error: a usage message, status 2
            legs.main([*common, *bad])
        assert exit_.value.code == 2


def test_attention_vs_random_spread_rows(cached_eval: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``attention_vs_random.py --spread 2``: the plain rows are those of a run without it (their own
    random draws), and with every patch kept each order is the server on the whole image."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        avr = importlib.import_module("attention_vs_random")
    finally:
        sys.path.remove(str(SCRIPTS))
    base = ["attention_vs_random.py", "--data", str(cached_eval["data"]), "--edge", f"file:{cached_eval['edge']}",
            "--server", f"file:{cached_eval['server']}", "--fractions", "0.25,0.5,1.0", "--draws", "3",
            "--bootstrap", "20", "--threads", "1"]
    runs = {}
    for name, extra in (("plain", []), ("spread", ["--spread", "2"]), ("oracle", ["--spread", "2", "--oracle"])):
        monkeypatch.setattr(sys, "argv", [*base, *extra, "--json", str(tmp_path / f"{name}.json")])
        assert avr.main() == 0
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    keys = ("k", "attention", "random", "diff_points", "ci95_points")
    assert [{k: r[k] for k in keys} for r in runs["plain"]["rows"]] == \
        [{k: r[k] for k in keys} for r in runs["spread"]["rows"]]
    assert all("spread" not in r for r in runs["plain"]["rows"])
    quarter, half, whole = runs["spread"]["rows"]
    assert quarter["k"] == 4 and whole["k"] == 16  # 4×4 patches: at k = 4, one per 2×2 cell
    full = runs["spread"]["server_full"]
    assert whole["spread"] == whole["stratified_random"] == whole["attention"] == full
    for r in (quarter, half):
        assert 0.0 <= r["spread"] <= 1.0 and 0.0 <= r["stratified_random"] <= 1.0
        assert r["spread_diff_points"] == pytest.approx(100 * (r["spread"] - r["random"]), abs=1e-9)
        assert r["spread_over_stratified_points"] == pytest.approx(100 * (r["spread"] - r["stratified_random"]),
                                                                   abs=1e-9)
        lo, hi = r["spread_ci95_points"]
        assert lo <= r["spread_diff_points"] <= hi
    # --oracle adds the server's own attention in both orders and leaves the spread rows as they were
    spread_keys = ("spread", "stratified_random", "spread_diff_points", "spread_ci95_points",
                   "spread_over_stratified_points", "spread_over_stratified_ci95_points")
    assert [{k: r[k] for k in spread_keys} for r in runs["spread"]["rows"]] == \
        [{k: r[k] for k in spread_keys} for r in runs["oracle"]["rows"]]
    o_quarter, o_half, o_whole = runs["oracle"]["rows"]
    assert o_whole["oracle_spread"] == o_whole["oracle"] == full
    for r in (o_quarter, o_half):
        assert r["oracle_spread_diff_points"] == pytest.approx(100 * (r["oracle_spread"] - r["random"]), abs=1e-9)
        lo, hi = r["oracle_spread_ci95_points"]
        assert lo <= r["oracle_spread_diff_points"] <= hi


def test_hybrid_order_hand_worked(scripts: dict[str, ModuleType]) -> None:
    """4×4 grid, 2×2 cells: each cell's best patch first (by score), then every other patch by score."""
    scores = np.array([[16, 15, 2, 1,
                        14, 13, 3, 4,
                        5, 6, 12, 11,
                        7, 8, 10, 9]], dtype=np.float64)
    hybrid = scripts["spread_cell_sweep"].hybrid_order(scores, 2)
    # cell bests: 16 (index 0), 4 (7), 8 (13), 12 (10); by score: 0, 10, 13, 7
    # the rest by score: 15 (1), 14 (4), 13 (5), 11 (11), 10 (14), 9 (15), 7 (12), 6 (9), 5 (8), 3 (6), 2 (2), 1 (3)
    assert hybrid.tolist() == [[0, 10, 13, 7, 1, 4, 5, 11, 14, 15, 12, 9, 8, 6, 2, 3]]
    # with one cell the whole grid, the order is top-k; every row a permutation
    rng = np.random.default_rng(0)
    batch = rng.random((6, 16))
    orders = scripts["spread_cell_sweep"].orders(batch, [2, 4])
    np.testing.assert_array_equal(orders["hybrid4"], orders["topk"])
    np.testing.assert_array_equal(orders["topk"], np.argsort(-batch, axis=1, kind="stable"))
    for order in orders.values():
        np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(16), (6, 1)))


def test_spread_cell_sweep_rows(scripts: dict[str, ModuleType], cached_eval: dict[str, Path], tmp_path: Path) -> None:
    """The sweep's figures: with every patch kept each order is the server on the whole image; its spread and
    top-k rows are attention_vs_random.py's on the same photos (the same random draws too)."""
    out = tmp_path / "sweep.json"
    common = ["--data", str(cached_eval["data"]), "--edge", f"file:{cached_eval['edge']}",
              "--server", f"file:{cached_eval['server']}", "--draws", "2", "--threads", "1"]
    assert scripts["spread_cell_sweep"].main([*common, "--cells", "2,3", "--fractions", "0.25,1.0",
                                              "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    quarter, whole = got["rows"]
    assert set(quarter["orders"]) == {"topk", "spread2", "hybrid2", "spread3", "hybrid3"}
    assert all(o["accuracy"] == got["server_full"] for o in whole["orders"].values())
    assert whole["random"] == got["server_full"]
    for o in quarter["orders"].values():
        assert o["over_random_points"] == pytest.approx(100 * (o["accuracy"] - quarter["random"]), abs=1e-9)
    assert got["best"] in quarter["orders"]
    sys.path.insert(0, str(SCRIPTS))
    try:
        avr = importlib.import_module("attention_vs_random")
    finally:
        sys.path.remove(str(SCRIPTS))
    avr_json = tmp_path / "avr.json"
    argv = ["attention_vs_random.py", *common, "--fractions", "0.25", "--spread", "2", "--bootstrap", "5",
            "--json", str(avr_json)]
    saved, sys.argv = sys.argv, argv
    try:
        assert avr.main() == 0
    finally:
        sys.argv = saved
    row = json.loads(avr_json.read_text())["rows"][0]
    assert quarter["orders"]["topk"]["accuracy"] == row["attention"]
    assert quarter["orders"]["spread2"]["accuracy"] == row["spread"]
    assert quarter["random"] == pytest.approx(row["random"], abs=1e-12)


@pytest.mark.parametrize("bad", [["--cells", "1,2"], ["--cells", "2,x"], ["--fractions", "0,0.5"],
                                 ["--fractions", "1.5"], ["--draws", "0"]])
def test_spread_cell_sweep_refuses_bad_arguments(scripts: dict[str, ModuleType], bad: list[str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before any model or photo is loaded: a usage error (exit 2), not a traceback."""
    with pytest.raises(SystemExit) as exit_:
        scripts["spread_cell_sweep"].main(bad)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err
