"""``patchcast eval-region``: server-driven region retransmission (Glance-and-Focus over the network),
evaluated offline on a labelled dataset.

The exchange (:mod:`shared.region`): a device sends its image box-downsampled by ``s`` (the *glance*);
the server upsamples it, classifies it and reads its last-block CLS attention; when the glance's
min-entropy is at least η it asks for a full-resolution square window where that attention sums
highest, and answers from a second forward (``fusion``: the hybrid image alone, the hybrid averaged
with the glance, or the window's patches alone averaged with the glance).

What the server answers for an image does not depend on η, only *whether* it asks does, so every
forward runs once per image (:mod:`patchcast.eval.region_passes`). The sweep over η (:func:`sweep`)
is then pure numpy on the same core as ``patchcast eval`` (:mod:`patchcast.eval.frontier`). Costs:
*pixels* sent ÷ full-image pixels (1/s² for every image's glance, + the window's share of the patches
for the images asked), and *bytes* measured with the service's codec on a seeded sample of images
(:func:`patchcast.eval.bytes.measure_region_bytes`) ÷ the same images as full-image JPEG q90 payloads,
the reference ``patchcast eval`` uses. Accuracy is computed on the exact pixels (the codec's loss is
not applied), as in ``patchcast eval``, unless ``through_codec`` is set: then the full image, every
glance and every window pass through the codec (encode, then decode, each its own payload as in the
live exchange) before the server sees them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchcast.eval.arrays import BoolArray, FloatArray
from patchcast.eval.bytes import REFERENCE_JPEG_QUALITY, ByteSizes, measure_region_bytes
from patchcast.eval.csvio import write_points
from patchcast.eval.frontier import send_masks
from patchcast.eval.grid import threshold_grid
from patchcast.eval.plots import plot_region
from patchcast.eval.points import cheapest, point_json
from patchcast.eval.region_passes import RegionPasses, compute_passes
from patchcast.eval.region_report import report_markdown
from patchcast.progress import ProgressFn
from shared.region import FUSIONS, global_patch_size

SIDE_FRACTIONS = (0.25, 0.375, 0.5, 0.625)
FIXED_ETAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 2.5, 3.0)


@dataclass(frozen=True)
class RegionEvalConfig:
    data: str = "cifar10/test.tar"
    server: str = "zoo:cifar10-server"
    pretrained: bool = False
    limit: int | None = None
    out: str = "reports/region-eval"
    downscales: tuple[int, ...] = (2,)
    sides: tuple[float, ...] = SIDE_FRACTIONS
    threads: int | None = None
    bytes_sample: int = 256
    codec: str = "jpeg-mosaic"  # the service's default codec (shared.config.CodecConfig)
    quality: int = 90  # codec.quality, as edge_node.engine.codec_params passes it
    # every image, glance and window the server classifies goes through the codec first (encode then
    # decode, as the live exchange does); off: the server sees the lossless pixels
    through_codec: bool = False
    chunk: int = 512  # images decoded and forwarded together
    max_batch: int = 32  # the worker's batching.max_batch / max_tokens defaults
    max_tokens: int = 2048
    eta_quantiles: int = 100  # η at this many evenly spaced quantiles of each glance's min-entropy
    fixed_etas: tuple[float, ...] = FIXED_ETAS  # plus round values (bits), 0 (always ask) and +inf (never)
    budget: float = 0.5  # pixel-cost budget of the report's "accuracy at cost ≤ budget" column
    max_loss: float = 1.0  # accuracy points below server-only an operating point may lose
    seed: int = 0
    plots: bool = True
    command: str = ""  # the command line, recorded in the report

    def __post_init__(self) -> None:
        from shared.errors import ConfigError

        if self.limit is not None and self.limit <= 0:
            raise ConfigError("limit must be positive")
        if not self.downscales or any(s < 2 for s in self.downscales):
            raise ConfigError(f"downscale factors must be ≥ 2, got {list(self.downscales)}")
        if len(set(self.downscales)) != len(self.downscales):
            raise ConfigError(f"downscale factors repeat: {list(self.downscales)}")
        if not self.sides or any(not 0.0 < f <= 1.0 for f in self.sides):
            raise ConfigError(f"window side fractions must be in (0, 1], got {list(self.sides)}")
        if self.bytes_sample < 1 or self.chunk < 1 or self.max_batch < 1 or self.max_tokens < 2:
            raise ConfigError("bytes_sample, chunk and max_batch must be ≥ 1, max_tokens ≥ 2")
        if self.eta_quantiles < 1:
            raise ConfigError("eta_quantiles must be ≥ 1")
        if self.max_loss < 0 or self.budget <= 0:
            raise ConfigError("max_loss must be ≥ 0 points and budget > 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be ≥ 1")
        if not 1 <= self.quality <= 100:
            raise ConfigError("quality must be in 1..100")


@dataclass
class RegionPoint:
    """One row of ``points.csv``. ``kind``: ``server`` (full image), ``glance`` (never ask) or ``region``
    (ask when the glance's min-entropy ≥ η; η = 0 always asks, η = inf never does)."""

    kind: str
    downscale: int | None
    side_fraction: float | None
    window_side: int | None
    fusion: str
    eta: float | None
    asked_frac: float
    pixel_frac: float
    bytes_frac: float
    accuracy: float


def eta_grid(u: FloatArray, quantiles: int, fixed: Sequence[float]) -> list[float]:
    """η values: the shared threshold grid of the glance min-entropy, plus 0 (always ask) and +inf
    (never ask)."""
    return threshold_grid(u, quantiles, (*fixed, 0.0, math.inf))


def ask_masks(u: FloatArray, etas: Sequence[float]) -> BoolArray:
    """(T, B) decisions: ask when the glance's min-entropy ≥ η, exactly as the min-entropy gate of
    ``patchcast eval`` sends (:func:`patchcast.eval.frontier.send_masks`)."""
    return send_masks(u, "min_entropy", etas)


def sweep(cfg: RegionEvalConfig, passes: RegionPasses, sizes: ByteSizes) -> list[RegionPoint]:
    """Every operating point: server only, glance only per factor, and per (factor, side, fusion) each η."""
    labels = passes.labels
    server_acc = float(np.mean(passes.server_probs.argmax(1) == labels))
    points = [RegionPoint("server", None, None, None, "", None, 1.0, 1.0,
                          sizes.fraction(float(np.sum(sizes.server))), server_acc)]
    for s, sc in passes.scales.items():
        glance_cost = 1.0 / s**2
        glance_bytes = float(np.sum(sizes.glance[s]))
        glance_correct = sc.glance_probs.argmax(1) == labels
        points.append(RegionPoint("glance", s, None, None, "", math.inf, 0.0, glance_cost,
                                  sizes.fraction(glance_bytes), float(np.mean(glance_correct))))
        etas = eta_grid(sc.glance_u, cfg.eta_quantiles, cfg.fixed_etas)
        ask = ask_masks(sc.glance_u, etas)  # (T, B)
        asked = ask.mean(axis=1)
        ask_sample = ask[:, sizes.sample].astype(np.float64)
        for f in cfg.sides:
            k = passes.window_sides[f]
            pixel = glance_cost + asked * passes.window_fraction(f)
            byte = (glance_bytes + ask_sample @ sizes.region[s][f].astype(np.float64)) / max(
                1.0, float(np.sum(sizes.reference)))
            for fusion in FUSIONS:
                correct = sc.fused(f, fusion).argmax(1) == labels
                acc = np.where(ask, correct[None, :], glance_correct[None, :]).mean(axis=1)
                points += [RegionPoint("region", s, f, k, fusion, eta, float(asked[t]), float(pixel[t]),
                                       float(byte[t]), float(acc[t])) for t, eta in enumerate(etas)]
    return points


def summarise(cfg: RegionEvalConfig, passes: RegionPasses, points: Sequence[RegionPoint]) -> dict[str, Any]:
    """The report's numbers: baselines, and per (factor, fusion, side) the always-ask point, the best
    accuracy at pixel cost ≤ ``budget`` and the cheapest η within ``max_loss`` points of server-only."""
    server = next(p for p in points if p.kind == "server")
    target = server.accuracy - cfg.max_loss / 100.0
    scales: dict[str, Any] = {}
    within_all: list[RegionPoint] = []
    for s in passes.scales:
        glance = next(p for p in points if p.kind == "glance" and p.downscale == s)
        rows = []
        for fusion in FUSIONS:
            for f in cfg.sides:
                mine = [p for p in points if p.kind == "region" and p.downscale == s and p.fusion == fusion
                        and p.side_fraction == f]
                always = next(p for p in mine if p.eta == 0.0)
                cheap = [p for p in mine if p.pixel_frac <= cfg.budget + 1e-12]
                at_budget = max(cheap, key=lambda p: (p.accuracy, -p.pixel_frac)) if cheap else None
                within = cheapest(mine, target, "pixel_frac")
                if within is not None:
                    within_all.append(within)
                rows.append({"fusion": fusion, "side_fraction": f, "window_side": passes.window_sides[f],
                             "window_fraction": passes.window_fraction(f), "always_ask": point_json(always),
                             "at_budget": point_json(at_budget), "within_loss": point_json(within)})
        sp = passes.scales[s]
        choice = [{"side_fraction": f, "window_side": passes.window_sides[f],
                   "attention": float(np.mean(sp.image_probs[f].argmax(1) == passes.labels)),
                   "centre": float(np.mean(sp.centre_probs[f].argmax(1) == passes.labels))} for f in cfg.sides]
        scales[str(s)] = {"glance": point_json(glance), "u_mean": float(np.mean(sp.glance_u)),
                          "rows": rows, "window_choice": choice}
    best = cheapest(within_all, target, "pixel_frac")
    best_bytes = cheapest(within_all, target, "bytes_frac")
    return {"images": len(passes.labels), "server": point_json(server), "target_accuracy": target,
            "budget": cfg.budget, "max_loss_points": cfg.max_loss, "scales": scales,
            "pixels": f"{cfg.codec} q{cfg.quality} round trip" if cfg.through_codec else "lossless",
            "cheapest_within_loss": point_json(best), "cheapest_within_loss_by_bytes": point_json(best_bytes)}


@dataclass
class RegionEvalResult:
    passes: RegionPasses
    sizes: ByteSizes
    points: list[RegionPoint]
    summary: dict[str, Any]
    files: list[Path]


def run_region_eval(cfg: RegionEvalConfig, progress: ProgressFn | None = None) -> RegionEvalResult:
    """Load the model and data, run every forward, measure bytes, sweep η, write the outputs."""
    import torch

    from patchcast.eval.passes import default_threads
    from shared import datasets
    from shared.codecs import get_codec
    from shared.errors import ConfigError, ModelError
    from shared.models import build_model

    t_start = time.perf_counter()
    report = progress or (lambda *_: None)
    get_codec(cfg.codec)  # an unknown codec fails now, not after the passes
    server = build_model(cfg.server, pretrained=cfg.pretrained, role="server")
    for s in cfg.downscales:
        try:
            global_patch_size(server.patch_size, s)
        except ValueError as exc:
            raise ConfigError(f"downscale {s}: {exc}") from exc
    if server.grid[0] != server.grid[1]:
        raise ModelError(f"{cfg.server}: a square patch grid is needed, got {server.grid}")
    ds = datasets.load(cfg.data).spread(cfg.limit, seed=cfg.seed)
    if len(ds) == 0:
        raise ConfigError(f"{cfg.data}: no images")
    if any(s.label is None for s in ds.samples):
        raise ConfigError(f"{cfg.data}: accuracy needs labels (an ImageFolder tree, a tar of one, or labels.csv)")
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = {"load_s": time.perf_counter() - t_start}

    threads_before = torch.get_num_threads()
    threads = cfg.threads or default_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        passes = compute_passes(cfg, ds, server, report)
        timings["passes_s"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads_before)
    t0 = time.perf_counter()
    sizes = measure_region_bytes(cfg, ds, server, passes, report)
    timings["bytes_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    points = sweep(cfg, passes, sizes)
    summary = summarise(cfg, passes, points)
    timings["sweep_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    summary.update({"config": asdict(cfg), "threads": threads, "bytes_sample": len(sizes.sample),
                    "reference_mean_bytes": float(np.mean(sizes.reference)),
                    "timings_s": {k: round(v, 2) for k, v in timings.items()}})

    files = [out_dir / "points.csv", out_dir / "report.md", out_dir / "summary.json"]
    write_points(files[0], RegionPoint, points, short=("side_fraction", "eta"))
    files[1].write_text(report_markdown(cfg, summary))
    files[2].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if cfg.plots:
        files.append(plot_region(cfg, out_dir, points, "pixel_frac", "region_tradeoff.png",
                          "pixels sent ÷ full-image pixels"))
        files.append(plot_region(cfg, out_dir, points, "bytes_frac", "region_bytes.png",
                          f"bytes ({cfg.codec} q{cfg.quality}) ÷ full-image JPEG q{REFERENCE_JPEG_QUALITY}"))
    return RegionEvalResult(passes=passes, sizes=sizes, points=points, summary=summary, files=files)
