"""``patchcast eval-region`` on 64 real CIFAR-10 test images with the zoo server: the numbers it reports
are the ones an independent recomputation gives, and its costs follow the exchange's definition."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from patchcast.cli import build_parser, main
from patchcast.eval.csvio import read_points
from patchcast.eval.region import RegionEvalConfig, RegionEvalResult, RegionPoint, run_region_eval
from shared import datasets
from shared.region import FUSIONS, choose_window, downsample, from_patches, hybrid_patches, to_patches, upsample

IMAGES = 64
FACTORS = (2, 4)
PNGS = ("region_tradeoff.png", "region_bytes.png")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small forwards: extra threads only wait on each other on a busy machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_path() -> Path:
    from shared.models import ZOO_DIR

    path = datasets.resolve("cifar10/test.tar")
    if not path.is_file() or not (ZOO_DIR / "cifar10-server.safetensors").is_file():
        pytest.skip("CIFAR-10 test split or zoo models not available")
    return path


@pytest.fixture(scope="module")
def result(data_path: Path, tmp_path_factory: pytest.TempPathFactory) -> RegionEvalResult:
    out = tmp_path_factory.mktemp("region-eval")
    cfg = RegionEvalConfig(data=str(data_path), limit=IMAGES, out=str(out), downscales=FACTORS, threads=1,
                           bytes_sample=16, eta_quantiles=16)
    return run_region_eval(cfg)


@pytest.fixture(scope="module")
def pixels(data_path: Path, result: RegionEvalResult) -> tuple[np.ndarray, np.ndarray]:
    """The same seeded spread, decoded here: (B, 32, 32, 3) uint8 and labels."""
    from shared.models import build_model

    pre = build_model("zoo:cifar10-server").preprocess
    px, labels = datasets.to_tensor_batch(datasets.load(data_path).spread(IMAGES, seed=0).samples, pre)
    return px.numpy(), labels.numpy()


def _points(result: RegionEvalResult, **kw: object) -> list:
    return [p for p in result.points if all(getattr(p, k) == v for k, v in kw.items())]


def test_outputs_are_written_and_read_back(result: RegionEvalResult) -> None:
    out = Path(result.summary["config"]["out"])
    for name in ("points.csv", "report.md", "summary.json", *PNGS):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in PNGS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = read_points(out / "points.csv", RegionPoint)
    assert len(back) == len(result.points)
    for a, b in zip(back, result.points, strict=True):
        assert (a.kind, a.downscale, a.fusion, a.window_side) == (b.kind, b.downscale, b.fusion, b.window_side)
        assert a.eta == pytest.approx(b.eta, abs=1e-5) if b.eta is not None else a.eta is None
        assert a.accuracy == pytest.approx(b.accuracy, abs=1e-6)
    report = (out / "report.md").read_text()
    for s in FACTORS:
        assert f"## Downscale s = {s}" in report
    # one table row per fusion × side, per factor
    assert sum(line.startswith(("| image |", "| probs |", "| image+probs |")) for line in report.splitlines()) \
        == len(FACTORS) * len(FUSIONS) * 4
    assert result.summary["images"] == IMAGES


def test_costs_follow_the_exchange(result: RegionEvalResult) -> None:
    passes, sizes = result.passes, result.sizes
    n = passes.num_patches
    assert n == 64 and passes.window_sides == {0.25: 2, 0.375: 3, 0.5: 4, 0.625: 5}
    ref = float(sizes.reference.sum())
    server = _points(result, kind="server")[0]
    assert server.pixel_frac == 1.0 and server.asked_frac == 1.0
    for s in FACTORS:
        glance = _points(result, kind="glance", downscale=s)[0]
        assert glance.pixel_frac == pytest.approx(1 / s**2)
        assert glance.bytes_frac == pytest.approx(sizes.glance[s].sum() / ref)
        assert 0 < glance.bytes_frac < 1, "a downsampled image is smaller than the full one"
        glance_correct = passes.scales[s].glance_probs.argmax(1) == passes.labels
        assert glance.accuracy == pytest.approx(glance_correct.mean())
        for f, k in passes.window_sides.items():
            for fusion in FUSIONS:
                curve = _points(result, kind="region", downscale=s, side_fraction=f, fusion=fusion)
                never = [p for p in curve if p.eta == math.inf]
                always = [p for p in curve if p.eta == 0.0]
                assert len(never) == 1 and len(always) == 1
                # η = +inf never asks: the glance alone, at its cost.
                assert never[0].asked_frac == 0.0 and never[0].accuracy == glance.accuracy
                assert never[0].pixel_frac == pytest.approx(1 / s**2)
                assert never[0].bytes_frac == pytest.approx(glance.bytes_frac)
                # η = 0 always asks: glance + the window's share of the pixels for every image.
                fused_correct = passes.scales[s].fused(f, fusion).argmax(1) == passes.labels
                assert always[0].asked_frac == 1.0 and always[0].accuracy == pytest.approx(fused_correct.mean())
                assert always[0].pixel_frac == pytest.approx(1 / s**2 + k * k / n)
                assert always[0].bytes_frac == pytest.approx(
                    (sizes.glance[s].sum() + sizes.region[s][f].sum()) / ref)
                both = float(np.mean(glance_correct & fused_correct))
                either = float(np.mean(glance_correct | fused_correct))
                for p in curve:  # every point: the cost is the glance's plus the asked images' windows
                    assert p.pixel_frac == pytest.approx(1 / s**2 + p.asked_frac * k * k / n)
                    # Each image keeps its glance answer or takes the fused one: only the asked ones change.
                    assert both - 1e-9 <= p.accuracy <= either + 1e-9
                    assert abs(p.accuracy - glance.accuracy) <= p.asked_frac + 1e-9
                asked = sorted(p.asked_frac for p in curve)
                assert asked[0] == 0.0 and asked[-1] == 1.0 and len(set(asked)) > 5, "η spans the asked fraction"
    summary = result.summary
    assert summary["server"]["accuracy"] == server.accuracy
    for s in FACTORS:
        rows = summary["scales"][str(s)]["rows"]
        assert len(rows) == len(FUSIONS) * 4
        for r in rows:
            b = r["at_budget"]
            assert b is None or b["pixel_frac"] <= 0.5 + 1e-9
            w = r["within_loss"]
            assert w is None or w["accuracy"] >= server.accuracy - 0.01 - 1e-9


def test_fusions_are_probability_vectors(result: RegionEvalResult) -> None:
    passes = result.passes
    b = len(passes.labels)
    for sc in passes.scales.values():
        for f in passes.window_sides:
            for fusion in FUSIONS:
                probs = sc.fused(f, fusion)
                assert probs.shape == (b, 10) and np.all(probs >= 0)
                np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
            np.testing.assert_allclose(sc.fused(f, "image+probs"), (sc.glance_probs + sc.image_probs[f]) / 2,
                                       atol=1e-7)
            np.testing.assert_allclose(sc.fused(f, "probs"), (sc.glance_probs + sc.window_probs[f]) / 2, atol=1e-7)
        np.testing.assert_allclose(sc.glance_probs.sum(axis=1), 1.0, atol=1e-5)
        # min-entropy in bits, from the glance's own probabilities
        np.testing.assert_allclose(sc.glance_u, -np.log2(sc.glance_probs.max(axis=1)), atol=1e-4)


def test_windows_are_chosen_by_the_server_attention(result: RegionEvalResult) -> None:
    passes = result.passes
    rows, cols = passes.grid
    for sc in passes.scales.values():
        att = sc.attention
        assert att.shape == (len(passes.labels), rows * cols) and np.all(att >= 0)
        np.testing.assert_allclose(att.sum(axis=1), 1.0, atol=1e-5)
        for f, k in passes.window_sides.items():
            win = sc.windows[f]
            assert win.shape == (len(passes.labels), k * k)
            for i in range(len(win)):
                np.testing.assert_array_equal(win[i], choose_window(att[i], passes.grid, k))
                r, c = np.divmod(win[i], cols)
                assert r.max() - r.min() == k - 1 and c.max() - c.min() == k - 1, "a k×k square"
                # brute force: no other k×k window holds more attention
                grid = att[i].reshape(rows, cols).astype(np.float64)
                best = max(grid[t:t + k, left:left + k].sum() for t in range(rows - k + 1)
                           for left in range(cols - k + 1))
                assert grid.reshape(-1)[win[i]].sum() == pytest.approx(best, abs=1e-9)
        # the attention is an image-dependent map, not a constant window
        assert len({tuple(w) for w in sc.windows[0.5]}) > 1


def test_forwards_match_a_plain_timm_forward(result: RegionEvalResult, pixels: tuple[np.ndarray, np.ndarray]) -> None:
    """The glance's probabilities and CLS attention, the hybrid image's and the full image's probabilities
    recomputed with timm's own forward on reassembled images (shared.attention reads the maps)."""
    from shared.attention import edge_forward
    from shared.models import build_model
    from shared.scores import scores_from_output

    px, labels = pixels
    passes = result.passes
    np.testing.assert_array_equal(labels, passes.labels)
    loaded = build_model("zoo:cifar10-server", role="edge")  # unfused attention: maps can be read
    model, pre, p = loaded.model, loaded.preprocess, loaded.patch_size

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            out = edge_forward(model, datasets.normalize(torch.from_numpy(images), pre))
        return out.logits.softmax(-1).numpy(), scores_from_output(out, "attention").numpy()

    full_probs, _ = run(px)
    np.testing.assert_allclose(passes.server_probs, full_probs, atol=1e-4)
    assert result.summary["server"]["accuracy"] == pytest.approx(np.mean(full_probs.argmax(1) == labels))
    some = slice(0, 16)
    for s, sc in passes.scales.items():
        glances = np.stack([upsample(downsample(x, s), s) for x in px[some]])
        g_probs, g_att = run(glances)
        np.testing.assert_allclose(sc.glance_probs[some], g_probs, atol=1e-4)
        np.testing.assert_allclose(sc.attention[some], g_att, atol=1e-5)
        for f in passes.window_sides:
            hybrids = np.stack([
                from_patches(hybrid_patches(to_patches(g, p), to_patches(x, p)[w], w), passes.grid)
                for g, x, w in zip(glances, px[some], sc.windows[f][some], strict=True)])
            h_probs, _ = run(hybrids)
            np.testing.assert_allclose(sc.image_probs[f][some], h_probs, atol=1e-4)


def test_cli_options_and_one_line_errors(data_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["eval-region", "--downscale", "2", "--downscale", "4", "--limit", "5"])
    assert args.command == "eval-region" and args.downscale == ["2", "4"] and args.limit == 5
    assert not hasattr(build_parser().parse_args(["eval-region"]), "downscale")  # default 2, set by the handler
    # 3 does not divide the 4-px patches: one line, a config error, before any image is read.
    assert main(["eval-region", "--data", str(data_path), "--downscale", "2,3", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error [config]" in err[0] and "downscale 3" in err[0]
    assert main(["eval-region", "--downscale", "two", "--out", str(tmp_path)]) == 1
    assert "error [config]" in capsys.readouterr().err


def test_the_centre_baseline_is_the_middle_window(result: RegionEvalResult) -> None:
    from shared.region import centre_window

    passes = result.passes
    assert centre_window((8, 8), 4).tolist() == [18, 19, 20, 21, 26, 27, 28, 29, 34, 35, 36, 37, 42, 43, 44, 45]
    for s, sc in passes.scales.items():
        for f, k in passes.window_sides.items():
            # where the attention chose the centre itself, the two hybrid forwards saw the same pixels
            same = np.array([np.array_equal(w, centre_window(passes.grid, k)) for w in sc.windows[f]])
            np.testing.assert_allclose(sc.image_probs[f][same], sc.centre_probs[f][same], atol=1e-5)
            choice = next(c for c in result.summary["scales"][str(s)]["window_choice"] if c["side_fraction"] == f)
            assert choice["centre"] == float(np.mean(sc.centre_probs[f].argmax(1) == passes.labels))


def test_through_the_codec_the_server_sees_what_the_codec_delivers(
        data_path: Path, tmp_path: Path, pixels: tuple[np.ndarray, np.ndarray], result: RegionEvalResult) -> None:
    """With ``through_codec`` the glance and window forwards run on the codec's decoded pixels: a lossless
    codec changes nothing, and JPEG's glances equal timm's forward on glances this test round-trips."""
    from shared.attention import edge_forward
    from shared.codecs import get_codec
    from shared.models import build_model

    few = 16
    common: dict[str, Any] = {"data": str(data_path), "limit": IMAGES, "downscales": (2,), "sides": (0.5,),
                              "threads": 1, "bytes_sample": 4, "eta_quantiles": 4, "plots": False}
    lossless = run_region_eval(RegionEvalConfig(out=str(tmp_path / "png"), codec="png", through_codec=True,
                                                **common)).passes
    np.testing.assert_allclose(lossless.scales[2].glance_probs, result.passes.scales[2].glance_probs, atol=1e-6)
    np.testing.assert_allclose(lossless.scales[2].image_probs[0.5], result.passes.scales[2].image_probs[0.5],
                               atol=1e-6)

    lossy = run_region_eval(RegionEvalConfig(out=str(tmp_path / "jpeg"), codec="jpeg-mosaic", quality=50,
                                             through_codec=True, **common))
    assert lossy.summary["pixels"] == "jpeg-mosaic q50 round trip"
    assert "after a `jpeg-mosaic` q50 round trip" in (tmp_path / "jpeg" / "report.md").read_text()
    passes = lossy.passes
    codec = get_codec("jpeg-mosaic")
    loaded = build_model("zoo:cifar10-server", role="edge")
    px = pixels[0][:few]

    def sent_glance(x: np.ndarray) -> np.ndarray:
        small = downsample(x, 2)
        idx = np.arange(64)
        back = codec.decode(codec.encode(small, idx, 2, {"q": 50}), small.shape[:2], idx, 2, {"q": 50})
        return upsample(from_patches(back, (8, 8)), 2)

    glances = np.stack([sent_glance(x) for x in px])
    with torch.inference_mode():
        out = edge_forward(loaded.model, datasets.normalize(torch.from_numpy(glances), loaded.preprocess))
    np.testing.assert_allclose(passes.scales[2].glance_probs[:few], out.logits.softmax(-1).numpy(), atol=1e-4)
    assert not np.allclose(passes.scales[2].glance_probs, result.passes.scales[2].glance_probs, atol=1e-3)
