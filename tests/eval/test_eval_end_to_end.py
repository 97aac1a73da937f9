"""``patchcast eval`` end to end on tiny random-init models: files exist and agree with each other."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import tiny_eval_set

from patchcast.cli import main
from patchcast.eval.csvio import read_points
from patchcast.eval.frontier import BOOTSTRAP_COSTS, frontier_at
from patchcast.eval.points import Point
from patchcast.eval.report import PUBLISH_BEGIN, publish_markers
from shared import datasets
from shared.models import LoadedModel, Preprocess, VitArch, build_model, save_checkpoint

FIGURES = ["fig8_tradeoff.png", "fig11_scores.png", "fig12_rules.png", "fig13_gates.png", "fig14_encoder.png",
           "fig_bytes.png"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only wait on each other on a busy machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_eval_set(tmp_path_factory.mktemp("evalset"))


def _args(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["eval", "--data", str(setup["data"]), "--edge", f"file:{setup['edge']}", "--server",
            f"file:{setup['server']}", "--sweep", "quick", "--out", str(out), "--bytes-sample", "12",
            "--threads", "1", "--limit", "40", "--bootstrap", "20", *extra]


def test_eval_end_to_end(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n\nHand-written analysis.\n")
    assert main(_args(setup, out, "--publish", str(doc))) == 0
    for name in ["points.csv", "report.md", "tables.md", "summary.json", *FIGURES]:
        assert (out / name).is_file(), name
    for fig in FIGURES:
        assert (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = read_points(out / "points.csv", Point)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 40

    # The paper's metric, recomputed from the CSV's own columns.
    for p in points:
        assert p.comm_cost == pytest.approx(p.images_sent_frac * p.patch_frac, abs=2e-6)
        assert 0.0 <= p.comm_cost <= 1.0 and 0.0 <= p.accuracy <= 1.0

    # Server-only accuracy, computed here independently with the plain timm forward.
    server = build_model(f"file:{setup['server']}")
    ds = datasets.load(str(setup["data"])).spread(40, seed=0)
    pixels, labels = datasets.to_tensor_batch(ds.samples, server.preprocess)
    with torch.inference_mode():
        expected = float((server.model(datasets.normalize(pixels, server.preprocess)).argmax(-1) == labels)
                         .float().mean())
    server_only = next(p for p in points if p.rule == "full" and p.gate == "none")
    assert server_only.accuracy == pytest.approx(expected, abs=1e-9)
    assert server_only.comm_cost == 1.0 and server_only.bytes_frac == pytest.approx(1.0)
    edge_only = next(p for p in points if p.rule == "none")
    assert edge_only.comm_cost == 0.0 and edge_only.images_sent_frac == 0.0

    # The frontier is monotone: cost and accuracy both strictly increase.
    front = summary["frontier"]
    assert front[0]["comm_cost"] == 0.0
    for a, b in itertools.pairwise(front):
        assert b["comm_cost"] > a["comm_cost"] and b["accuracy"] > a["accuracy"]

    # The exact frontier (every η) passes through every grid point of the method, so it is at or
    # above the grid's frontier at every cost; and it ends where everything is sent.
    exact = summary["acceptance"]["exact_eta"]
    xc = np.array([c for c, _ in exact["method_frontier"]])
    xa = np.array([a for _, a in exact["method_frontier"]])
    for p in points:
        if p.encoder == "edge" and p.score == "attention" and p.gate in ("min_entropy", "none"):
            assert frontier_at(xc, xa, p.comm_cost) >= p.accuracy - 1e-12, p
    assert exact["frontier_accuracy_at_cost_0.5"] >= summary["acceptance"]["frontier_accuracy_at_cost_0.5"] - 1e-12
    boot = exact["bootstrap"]
    assert boot["resamples"] == 20 and len(boot["method_minus_baseline"]) == len(BOOTSTRAP_COSTS)
    assert all(g["lo"] <= g["mean"] <= g["hi"] for g in boot["method_minus_baseline"])

    # η = 0 sends every image (min-entropy ≥ 0), so it equals the no-gate row of the same selection.
    nogate = {(p.encoder, p.score, p.rule, p.value): p for p in points if p.gate == "none"}
    for p in points:
        if p.gate == "min_entropy" and p.eta == 0.0:
            q = nogate[(p.encoder, p.score, p.rule, p.value)]
            assert (p.accuracy, p.comm_cost) == (q.accuracy, q.comm_cost)

    # Random patches are matched point by point: identical traffic, only the patches differ.
    costs = {(p.rule, p.value, p.gate, p.eta): p.comm_cost for p in points
             if p.encoder == "edge" and p.score == "attention"}
    randoms = [p for p in points if p.score == "random"]
    assert randoms and all(p.comm_cost == costs[(p.rule, p.value, p.gate, p.eta)] for p in randoms)

    # The recommended point is the cheapest that meets the target.
    best = summary["best_point"]
    assert best["accuracy"] >= summary["target_accuracy"] - 1e-12
    assert "Table II" in (out / "tables.md").read_text() and "Acceptance" in (out / "report.md").read_text()

    # Publishing keeps the hand-written text, embeds the figures from img/, and replaces (not appends)
    # its own section when run again.
    text = doc.read_text()
    assert text.startswith("# Results\n\nHand-written analysis.") and "](img/fig8_tradeoff.png)" in text
    assert all((doc.parent / "img" / fig).is_file() for fig in FIGURES)
    doc.write_text(text + "\nA closing remark.\n")
    assert main(_args(setup, out, "--publish", str(doc), "--no-plots")) == 0
    again = doc.read_text()
    assert again.count(PUBLISH_BEGIN) == 1 and again.endswith("A closing remark.\n")
    # A named section (another dataset) sits beside the unnamed one; each run rewrites only its own.
    assert main(_args(setup, out, "--publish", str(doc), "--publish-name", "photos", "--no-plots")) == 0
    assert main(_args(setup, out, "--publish", str(doc), "--publish-name", "photos", "--no-plots")) == 0
    named = doc.read_text()
    begin, end = publish_markers("photos")
    assert named.count(PUBLISH_BEGIN) == 1 and named.count(begin) == 1 and named.count(end) == 1
    assert "](img/photos-fig8_tradeoff.png)" in named and named.startswith(again)


def test_cached_selection_matches_a_per_image_forward(setup: dict[str, Path], tmp_path: Path) -> None:
    """One selection recomputed independently: edge attention → shared.selection → server on the
    kept patches' pixels, one image at a time (no batching, no padding)."""
    from shared.attention import edge_forward
    from shared.scores import cls_attention_scores
    from shared.selection import SelectionRule, select
    from shared.subset import forward_subset, patchify

    out = tmp_path / "out"
    assert main(_args(setup, out, "--no-plots", "--no-rollout", "--no-server-encoder")) == 0
    (sel_file,) = (out / "cache").rglob("sel-edge-attention-sum_threshold-0.8.npz")
    with np.load(sel_file) as z:
        masks = np.unpackbits(z["mask"], axis=1, count=64).astype(bool)
        preds, logits = z["pred"], z["logits"]
    assert logits.shape == (40, 4) and np.array_equal(logits.astype(np.float32).argmax(1), preds)
    edge = build_model(f"file:{setup['edge']}", role="edge")
    server = build_model(f"file:{setup['server']}")
    ds = datasets.load(str(setup["data"])).spread(40, seed=0)
    pixels, labels = datasets.to_tensor_batch(ds.samples, edge.preprocess)
    with torch.inference_mode():
        scores = cls_attention_scores(edge_forward(edge.model, datasets.normalize(pixels, edge.preprocess))
                                      .cls_attention)
        patches = patchify(datasets.normalize(pixels, server.preprocess), 4)
        for i in range(40):
            kept = select(scores[i], SelectionRule("sum_threshold", 0.8)).indices
            assert np.array_equal(np.flatnonzero(masks[i]), kept)
            idx = torch.from_numpy(kept.copy())[None]
            logit = forward_subset(server.model, patches[i:i + 1, idx[0]], idx)
            assert int(logit.argmax()) == int(preds[i])
    points = read_points(out / "points.csv", Point)
    row = next(p for p in points if p.score == "attention" and p.rule == "sum_threshold" and p.value == 0.8
               and p.gate == "none")
    assert row.accuracy == pytest.approx(float(np.mean(preds == labels.numpy())), abs=1e-9)
    assert row.patch_frac == pytest.approx(masks.mean(), abs=1e-6)


def test_expert_routing_answers_each_image_with_its_routed_specialist(setup: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """``--expert``: recomputed by hand, image by image: the routing rule on the edge's top-5 and the
    routed specialist's own forward on the kept patches, mapped to global class ids. (With 4 classes
    every image's top-5 touches both experts, so the general-server fallback is unit-tested instead.)"""
    from patchcast.eval.experts import route_images, routed_predictions
    from shared.routing import Expert, ExpertRouter
    from shared.subset import forward_subset, patchify

    pre = Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic", 1.0)
    paths, classes = [], ([2, 1], [3, 0])
    for seed, ids in enumerate(classes, start=7):
        torch.manual_seed(seed)
        arch = VitArch(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=2, num_classes=2)
        paths.append(tmp_path / f"expert{seed}.safetensors")
        save_checkpoint(paths[-1], LoadedModel(arch.build().eval(), "expert", pre, [f"c{c}" for c in ids],
                                               class_ids=ids), arch=arch)
    # An edge whose probabilities differ from image to image (a scaled-up head), so routing splits.
    torch.manual_seed(30)
    edge_arch = VitArch(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=4)
    edge_model = edge_arch.build().eval()
    with torch.no_grad():
        head = edge_model.head
        assert isinstance(head, torch.nn.Linear)
        head.weight.mul_(5.0)
    edge_path = tmp_path / "edge.safetensors"
    save_checkpoint(edge_path, LoadedModel(edge_model, "edge", pre, []), arch=edge_arch)
    out = tmp_path / "out"
    assert main([*_args(setup, out, "--no-plots", "--no-rollout", "--no-server-encoder",
                        *(a for p in paths for a in ("--expert", f"file:{p}"))), "--edge", f"file:{edge_path}"]) == 0
    (full_file,) = (out / "cache").rglob("full.npz")
    (sel_file,) = (out / "cache").rglob("sel-edge-attention-sum_threshold-0.8.npz")
    expert_files = sorted((out / "cache").rglob("expert-*-edge-attention-sum_threshold-0.8.npz"))
    with np.load(full_file) as z:
        edge_logits = z["edge_logits"]
    with np.load(sel_file) as z:
        masks = np.unpackbits(z["mask"], axis=1, count=64).astype(bool)
        general = z["pred"]
    answers = {}  # expert index → its answer for every image (told apart by the classes they use)
    for f in expert_files:
        with np.load(f) as z:
            answers[next(i for i, ids in enumerate(classes) if set(z["pred"].tolist()) <= set(ids))] = z["pred"]
    assert sorted(answers) == [0, 1]
    experts = [build_model(f"file:{p}") for p in paths]
    route = route_images(edge_logits, experts)
    router = ExpertRouter(tuple(Expert(f"e{i}", frozenset(ids)) for i, ids in enumerate(classes)), fallback="general")
    probs = torch.softmax(torch.from_numpy(edge_logits), dim=-1)
    ds = datasets.load(str(setup["data"])).spread(40, seed=0)
    pixels, _ = datasets.to_tensor_batch(ds.samples, pre)
    patches = patchify(datasets.normalize(pixels, pre), 4)
    assert {0, 1} <= set(route.tolist()), "both experts answer some images"
    checked = 0
    with torch.inference_mode():
        for i in range(40):
            top_p, top_i = probs[i].topk(4)
            assert f"e{route[i]}" == router.route(top_i.tolist(), top_p.tolist())
            idx = torch.from_numpy(np.flatnonzero(masks[i]))
            for e, expert in enumerate(experts):  # every expert answers every image (routing picks later)
                logit = forward_subset(expert.model, patches[i:i + 1, idx], idx[None])[0]
                if float(logit.max() - logit.min()) > 1e-3:
                    assert answers[e][i] == classes[e][int(logit.argmax())]
                    checked += 1
    assert checked >= 72  # all but near-ties
    routed = routed_predictions(route, np.stack([answers[0], answers[1]]), general)
    assert all(routed[i] == answers[route[i]][i] for i in range(40))
    summary = json.loads((out / "summary.json").read_text())
    x = summary["experts"]
    assert [m["classes"] for m in x["models"]] == [[2, 1], [3, 0]] and x["costs"] == [0.1, 0.2, 0.3, 0.5, 0.75]
    share0 = next(st for st in x["settings"] if st["min_share"] == 0.0)
    assert share0["general_share"] == 0.0 and sum(share0["routed_share"]) == pytest.approx(1.0)
    strict = next(st for st in x["settings"] if st["min_share"] == 0.99)
    assert strict["general_share"] >= share0["general_share"]
    assert "Expert routing" in (out / "report.md").read_text()
    points = read_points(out / "points.csv", Point)
    row = next(q for q in points if q.score == "experts" and q.value == 0.8 and q.gate == "none")
    assert row.accuracy == pytest.approx(float(np.mean(routed == np.array([s.label for s in ds.samples]))))


def test_second_run_reads_the_cache(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(_args(setup, out, "--no-plots")) == 0
    first = (out / "points.csv").read_text()
    cached = sorted(p.name for p in (out / "cache").rglob("*.npz"))
    assert any(n.startswith("sel-edge-random") for n in cached) and "full.npz" in cached
    t0 = time.perf_counter()
    assert main(_args(setup, out, "--no-plots")) == 0
    assert (out / "points.csv").read_text() == first
    assert json.loads((out / "summary.json").read_text())["timings_s"]["passes_s"] < 0.5
    assert time.perf_counter() - t0 < 30


def test_random_baseline_averages_its_draws(setup: dict[str, Path], tmp_path: Path) -> None:
    """With --random-draws 3 every random point's accuracy is the mean over the three cached draws
    (recomputed here from each draw's cached predictions), draw 0 is the single-draw run's draw, and
    the attention points do not change."""
    one, three = tmp_path / "one", tmp_path / "three"
    assert main(_args(setup, one, "--no-plots")) == 0
    assert main(_args(setup, three, "--no-plots", "--random-draws", "3")) == 0
    p1, p3 = read_points(one / "points.csv", Point), read_points(three / "points.csv", Point)
    assert [p for p in p1 if p.score != "random"] == [p for p in p3 if p.score != "random"]
    caches = {f.name: f for f in (three / "cache").rglob("sel-*.npz")}
    labels = datasets.load(str(setup["data"])).spread(40, seed=0)
    y = np.array([s.label for s in labels.samples])
    nogate = [p for p in p3 if p.score == "random" and p.gate == "none"]
    assert nogate
    differs = False
    for p in nogate:
        base = f"sel-edge-random-{p.rule}-{p.value:g}"
        right = [np.load(caches[f"{base}{suffix}.npz"])["pred"] == y for suffix in ("", "-draw1", "-draw2")]
        assert p.accuracy == pytest.approx(float(np.mean(right)), abs=1e-12)
        single = next(q for q in p1 if (q.score, q.rule, q.value, q.gate) == ("random", p.rule, p.value, "none"))
        assert single.accuracy == pytest.approx(float(np.mean(right[0])), abs=1e-12)
        masks = [np.load(caches[f"{base}{suffix}.npz"])["mask"] for suffix in ("", "-draw1")]
        differs |= not np.array_equal(*masks)
    assert differs  # the draws really are different selections (same counts, other patches)
    assert "averaged over 3 independent draws" in (three / "report.md").read_text()
    with pytest.raises(SystemExit):
        main(_args(setup, tmp_path / "bad", "--random-draws", "x"))


def test_eval_is_registered() -> None:
    from patchcast.cli import build_parser

    args = build_parser().parse_args(["eval", "--limit", "5", "--max-loss", "0.5"])
    assert args.command == "eval" and args.limit == 5 and args.max_loss == 0.5


@pytest.mark.timeout(600)
def test_limit_500_with_the_zoo_on_cifar10(tmp_path: Path) -> None:
    """The issue's quick look, exactly as a user types it (full sweep, plots): about a minute on 2
    cores. The edge-only and server-only accuracies are re-computed here with a plain forward over
    the same seeded spread of 500 test images, an independent check of the eval's data path."""
    from patchcast.train import evaluate
    from shared.models import ZOO_DIR

    path = datasets.resolve("cifar10/test.tar")
    if not path.is_file() or not (ZOO_DIR / "cifar10-edge.safetensors").is_file():
        pytest.skip("CIFAR-10 test split or zoo models not available")
    out = tmp_path / "e500"
    assert main(["eval", "--limit", "500", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 500 and summary["num_patches"] == 64
    for name in [*FIGURES, "points.csv", "report.md", "tables.md"]:
        assert (out / name).stat().st_size > 0, name
    subset = datasets.load(path).spread(500, seed=0)
    for role in ("edge", "server"):
        loaded = build_model(f"zoo:cifar10-{role}", role="edge" if role == "edge" else "server")
        pixels, labels = datasets.to_tensor_batch(subset.samples, loaded.preprocess)
        accuracy = evaluate(loaded.model, pixels, labels, loaded.preprocess, bf16=False)
        assert summary[role]["accuracy"] == pytest.approx(accuracy, abs=2.5e-3), role  # ≤ 1 image of 500
    points = read_points(out / "points.csv", Point)
    assert len(points) > 1000 and all(0.0 <= p.comm_cost <= 1.0 for p in points)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_full_cifar10_run_matches_the_model_cards(tmp_path: Path) -> None:
    """The whole CIFAR-10 test set with the zoo models: both accuracies equal the cards' (a quick
    sweep: the model passes over all 10,000 images are what this checks, not the sweep)."""
    from shared.models import ZOO_DIR

    if not all((ZOO_DIR / f"cifar10-{r}.safetensors").is_file() for r in ("edge", "server")):
        pytest.skip("zoo models not exported yet")
    out = tmp_path / "full"
    assert main(["eval", "--out", str(out), "--sweep", "quick", "--no-rollout", "--no-server-encoder",
                 "--no-plots"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 10_000
    for role in ("edge", "server"):
        card = json.loads((ZOO_DIR / f"cifar10-{role}.json").read_text())
        assert summary[role]["accuracy"] == pytest.approx(card["test_accuracy"], abs=1.5e-4)


def test_codec_round_trip_replaces_only_the_kept_patches() -> None:
    from patchcast.eval.passes import codec_round_trip
    from shared.codecs import get_codec, split_image

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)  # 4×6 patches of 4 px
    masks = rng.random((3, 24)) < 0.5
    masks[2] = False  # an image with nothing kept stays as it is
    raw = get_codec("raw")
    assert np.array_equal(codec_round_trip(pixels, masks, 4, raw, raw.resolve_params({})), pixels)
    jpeg = get_codec("jpeg-mosaic")
    params = jpeg.resolve_params({"q": 30})
    got = codec_round_trip(pixels, masks, 4, jpeg, params)
    assert not np.array_equal(got, pixels)
    for i in range(3):
        idx = np.flatnonzero(masks[i])
        patches, before = split_image(got[i], 4), split_image(pixels[i], 4)
        assert np.array_equal(patches[~masks[i]], before[~masks[i]])  # untouched
        if idx.size:
            decoded = jpeg.decode(jpeg.encode(pixels[i], idx, 4, params), (16, 24), idx, 4, params)
            assert np.array_equal(patches[idx], decoded)  # what a worker decodes, in place


def test_through_codec_sees_the_codec_loss_and_keeps_its_own_cache(setup: dict[str, Path], tmp_path: Path) -> None:
    """``--through-codec``: with a lossless codec every selection's server answers are the exact pixels'
    ones; with a lossy one they are the round trip's, cached apart, and the report says so."""
    out = tmp_path / "out"
    assert main(_args(setup, out, "--no-plots")) == 0
    exact = json.loads((out / "summary.json").read_text())
    assert exact["patch_pixels"] == "exact"
    lossless = tmp_path / "lossless"
    assert main(_args(setup, lossless, "--no-plots", "--through-codec", "--codec", "raw")) == 0
    lossy = tmp_path / "lossy"
    assert main(_args(setup, lossy, "--no-plots", "--through-codec", "--codec-param", "q=5")) == 0
    summary = json.loads((lossy / "summary.json").read_text())
    assert summary["patch_pixels"].startswith("jpeg-mosaic") and "round trip" in summary["patch_pixels"]
    assert "after the codec's round trip" in (lossy / "report.md").read_text()
    preds = {}
    for name, folder in (("exact", out), ("lossless", lossless), ("lossy", lossy)):
        (cache,) = (folder / "cache").iterdir()
        preds[name] = {f.name: np.load(f)["pred"] for f in sorted(cache.glob("sel-*.npz"))}
    assert preds["exact"].keys() == preds["lossless"].keys() == preds["lossy"].keys()
    for key in preds["exact"]:
        assert np.array_equal(preds["exact"][key], preds["lossless"][key]), key
    assert any(not np.array_equal(preds["exact"][k], preds["lossy"][k]) for k in preds["exact"])
    assert summary["server"]["accuracy"] == exact["server"]["accuracy"]  # full images stay exact


def test_through_codec_covers_the_specialists(setup: dict[str, Path], tmp_path: Path) -> None:
    """``--expert`` with ``--through-codec``: through a lossless codec every specialist answers as on the
    exact pixels; through a lossy one some answer differs."""
    pre = Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic", 1.0)
    # the general server's body with the head rows of classes 0 and 2: a specialist whose answers vary
    # (on these 40 images the random-init server splits them 8 / 32 between the two)
    server = build_model(f"file:{setup['server']}").model
    arch = VitArch(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=2, num_classes=2)
    model = arch.build().eval()
    state = server.state_dict()
    state["head.weight"], state["head.bias"] = state["head.weight"][[0, 2]], state["head.bias"][[0, 2]]
    model.load_state_dict(state)
    expert = tmp_path / "expert.safetensors"
    save_checkpoint(expert, LoadedModel(model, "expert", pre, ["c0", "c2"], class_ids=[0, 2]), arch=arch)
    answers = {}
    for name, extra in (("exact", ()), ("lossless", ("--through-codec", "--codec", "raw")),
                        ("lossy", ("--through-codec", "--codec-param", "q=5"))):
        out = tmp_path / name
        assert main(_args(setup, out, "--no-plots", "--no-rollout", "--no-server-encoder", "--expert",
                          f"file:{expert}", *extra)) == 0
        answers[name] = {f.name: np.load(f)["pred"] for f in sorted((out / "cache").rglob("expert-*.npz"))}
    assert answers["exact"] and answers["exact"].keys() == answers["lossless"].keys() == answers["lossy"].keys()
    assert all(np.array_equal(answers["exact"][k], answers["lossless"][k]) for k in answers["exact"])
    assert any(len(set(a.tolist())) == 2 for a in answers["exact"].values())  # both classes answered
    assert any(not np.array_equal(answers["exact"][k], answers["lossy"][k]) for k in answers["exact"])


def test_spread_keeps_the_counts_and_spreads_the_patches(setup: dict[str, Path], tmp_path: Path) -> None:
    """``--spread 2``: every attention selection keeps as many patches as without it, the spread order's
    (recomputed here with shared.selection from the cached scores), in a cache of its own."""
    from shared.selection import SelectionRule, select

    cache = tmp_path / "cache"
    plain, spread = tmp_path / "plain", tmp_path / "spread"
    common = ("--no-plots", "--no-rollout", "--no-server-encoder", "--cache-dir", str(cache))
    assert main(_args(setup, plain, *common)) == 0
    assert main(_args(setup, spread, *common, "--spread", "2")) == 0
    assert json.loads((spread / "summary.json").read_text())["spread"] == 2
    assert "spread over 2×2 cells" in (spread / "report.md").read_text()
    plain_dir, spread_dir = sorted(cache.iterdir(), key=lambda d: d.stat().st_mtime)
    with np.load(plain_dir / "full.npz") as z:
        scores = z["edge_attention"]
    differs = 0
    for name, rule in (("sum_threshold-0.8", SelectionRule("sum_threshold", 0.8, spread=2)),
                       ("topk-16", SelectionRule("topk", 16, spread=2))):
        masks = {}
        for which, folder in (("plain", plain_dir), ("spread", spread_dir)):
            with np.load(folder / f"sel-edge-attention-{name}.npz") as z:
                masks[which] = np.unpackbits(z["mask"], axis=1, count=64).astype(bool)
        np.testing.assert_array_equal(masks["plain"].sum(1), masks["spread"].sum(1))
        for i in range(40):
            np.testing.assert_array_equal(np.flatnonzero(masks["spread"][i]), select(scores[i], rule).indices)
        differs += int((masks["plain"] != masks["spread"]).any(1).sum())
        with np.load(spread_dir / f"sel-edge-random-{name}.npz") as z:  # random twins: the same counts
            np.testing.assert_array_equal(np.unpackbits(z["mask"], axis=1, count=64).sum(1), masks["plain"].sum(1))
    assert differs > 0
