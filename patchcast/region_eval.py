"""``patchcast eval-region``: server-driven region retransmission (Glance-and-Focus over the network),
evaluated offline on a labelled dataset.

The exchange (:mod:`shared.region`): a device sends its image box-downsampled by ``s`` (the *glance*);
the server upsamples it, classifies it and reads its last-block CLS attention; when the glance's
min-entropy is at least η it asks for a full-resolution square window where that attention sums
highest, and answers from a second forward (``fusion``: the hybrid image alone, the hybrid averaged
with the glance, or the window's patches alone averaged with the glance).

What the server answers for an image does not depend on η, only *whether* it asks does, so every
forward runs once per image (:func:`compute_passes`):

* the server on the full image (the server-only reference);
* per downscale ``s``: the glance (probabilities, min-entropy, CLS attention), and per window side
  fraction the hybrid-image forward and the window-only forward (the three fusions come from those two).

The sweep over η (:func:`sweep`) is then pure numpy. Costs: *pixels* sent ÷ full-image pixels (1/s²
for every image's glance, + the window's share of the patches for the images asked), and *bytes*
measured with the service's codec on a seeded sample of images (:func:`measure_bytes`) ÷ the same
images as full-image JPEG q90 payloads (:func:`shared.codecs.full_image_payload_bytes`, the reference
``patchcast eval`` uses). Accuracy is computed on the exact pixels (the codec's loss is not applied),
as in ``patchcast eval``, unless ``through_codec`` is set: then the full image, every glance and every
window pass through the codec (encode, then decode, each its own payload as in the live exchange)
before the server sees them.

Forwards go through the service's code path: patches are normalised and embedded like
``ServerEngine._token_sets`` and run with :func:`shared.packing.forward_packed` in batches planned by
:func:`shared.packing.plan_batches` under the default batching limits; the glance's CLS attention is
the one the worker reads (``forward_packed(..., cls_attention=...)``), fp32.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.region import (
    FUSIONS,
    Fusion,
    centre_window,
    choose_window,
    downsample,
    from_patches,
    fuse,
    global_patch_size,
    hybrid_patches,
    to_patches,
    upsample,
    window_side,
)

FloatArray = npt.NDArray[np.floating[Any]]
IntArray = npt.NDArray[np.integer[Any]]
BoolArray = npt.NDArray[np.bool_]

ProgressFn = Callable[[str, int, int, str], None]
"""``(phase, done, total, info)``; phases: ``passes`` (images), ``bytes`` (sampled images)."""

SIDE_FRACTIONS = (0.25, 0.375, 0.5, 0.625)
FIXED_ETAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 2.5, 3.0)
REFERENCE_JPEG_QUALITY = 90


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Model passes
# --------------------------------------------------------------------------------------------------

@dataclass
class ScalePasses:
    """What the server computes for every image at one downscale factor (B images, N patches, C classes)."""

    factor: int
    glance_probs: FloatArray  # (B, C) float32
    glance_u: FloatArray  # (B,) float32 min-entropy in bits, as shared.gates computes it
    attention: FloatArray  # (B, N) float32, the glance's last-block CLS attention
    windows: dict[float, IntArray] = field(default_factory=dict)  # side fraction → (B, k²) sorted indices
    image_probs: dict[float, FloatArray] = field(default_factory=dict)  # hybrid-image forward (B, C)
    window_probs: dict[float, FloatArray] = field(default_factory=dict)  # window-only forward (B, C)
    # the hybrid image with a fixed centre window instead (the baseline for choosing by attention)
    centre_probs: dict[float, FloatArray] = field(default_factory=dict)

    def fused(self, side: float, fusion: Fusion) -> FloatArray:
        """(B, C) final probabilities of an exchange that asked for the ``side`` window (shared.region.fuse)."""
        region = self.window_probs[side] if fusion == "probs" else self.image_probs[side]
        return fuse(self.glance_probs, region, fusion)


@dataclass
class RegionPasses:
    labels: IntArray  # (B,)
    server_probs: FloatArray  # (B, C) the server on the full image
    grid: tuple[int, int]
    patch_size: int
    window_sides: dict[float, int]  # side fraction → patches per window side
    scales: dict[int, ScalePasses]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def window_fraction(self, side: float) -> float:
        return self.window_sides[side] ** 2 / self.num_patches


def _forward(model: Any, pre: Any, patch_sets: Sequence[np.ndarray], index_sets: Sequence[np.ndarray],
             max_batch: int, max_tokens: int,
             cls_attention: list[np.ndarray] | None = None) -> tuple[FloatArray, FloatArray]:
    """Probabilities (B, C) and min-entropies (B,) of B patch sets ((K_i, p, p, 3) uint8 at grid
    positions ``index_sets[i]``), the way the worker computes them: one normalisation and embedding of
    every patch (``ServerEngine._token_sets``), then :func:`shared.packing.forward_packed` per batch of
    :func:`shared.packing.plan_batches`. With ``cls_attention``, each set's last-block CLS attention
    (float32 (K_i,)) is appended to it in input order."""
    import torch

    from shared.datasets import normalize
    from shared.gates import uncertainty
    from shared.packing import forward_packed, plan_batches
    from shared.subset import embed_patches

    lengths = [len(ix) for ix in index_sets]
    pixels = torch.from_numpy(np.ascontiguousarray(np.concatenate(list(patch_sets))))  # (ΣK, p, p, 3)
    indices = torch.from_numpy(np.concatenate(list(index_sets)).astype(np.int64))
    embedded = embed_patches(model, normalize(pixels, pre).unsqueeze(0), indices.unsqueeze(0))[0]
    tokens = list(torch.split(embedded, lengths, dim=0))
    logits = torch.empty(len(tokens), int(model.num_classes))
    maps: list[np.ndarray | None] = [None] * len(tokens)
    for batch in plan_batches(lengths, max_batch, max_tokens):
        got: list[torch.Tensor] | None = [] if cls_attention is not None else None
        logits[batch] = forward_packed(model, [tokens[i] for i in batch], cls_attention=got).float()
        if got is not None:
            for i, m in zip(batch, got, strict=True):
                maps[i] = m.float().numpy()
    if cls_attention is not None:
        cls_attention.extend(m for m in maps if m is not None)
    return torch.softmax(logits, dim=-1).numpy(), uncertainty(logits, "min_entropy").numpy()


class _Wire:
    """The pixels the worker would decode: lossless unless the evaluation runs through the codec."""

    def __init__(self, cfg: RegionEvalConfig) -> None:
        from shared.codecs import get_codec, quality_params

        self.codec = get_codec(cfg.codec) if cfg.through_codec else None
        if self.codec is not None:
            self.params = quality_params(self.codec, cfg.quality)

    def patches(self, pixels: np.ndarray, indices: np.ndarray, patch_size: int) -> np.ndarray:
        """(K, p, p, 3): the patches at ``indices`` of ``pixels`` (H, W, 3), after the codec's round trip."""
        if self.codec is None:
            return to_patches(pixels, patch_size)[indices]
        geometry = (int(pixels.shape[0]), int(pixels.shape[1]))
        payload = self.codec.encode(pixels, indices, patch_size, self.params)
        return self.codec.decode(payload, geometry, indices, patch_size, self.params)

    def glance(self, pixels: np.ndarray, factor: int, patch_size: int) -> np.ndarray:
        """(N, p, p, 3): the image box-downsampled, sent in p/s patches, then upsampled (decode_global)."""
        small = downsample(pixels, factor)
        gp = global_patch_size(patch_size, factor)
        grid = (small.shape[0] // gp, small.shape[1] // gp)
        sent = self.patches(small, np.arange(grid[0] * grid[1]), gp)
        return to_patches(upsample(from_patches(sent, grid), factor), patch_size)


def _chunk_passes(server: Any, cfg: RegionEvalConfig, pixels: np.ndarray, window_sides: dict[float, int]
                  ) -> tuple[FloatArray, dict[int, dict[str, Any]]]:
    """Every forward for one chunk of images (B, H, W, 3) uint8."""
    model, pre, p = server.model, server.preprocess, server.patch_size
    grid = server.grid
    n = grid[0] * grid[1]
    all_idx = np.arange(n, dtype=np.int64)
    wire = _Wire(cfg)
    full = np.stack([wire.patches(px, all_idx, p) for px in pixels])  # (B, N, p, p, 3)
    b = len(full)
    mb, mt = cfg.max_batch, cfg.max_tokens
    server_probs, _ = _forward(model, pre, list(full), [all_idx] * b, mb, mt)
    out: dict[int, dict[str, Any]] = {}
    for s in cfg.downscales:
        glance = np.stack([wire.glance(px, s, p) for px in pixels])
        maps: list[np.ndarray] = []
        g_probs, g_u = _forward(model, pre, list(glance), [all_idx] * b, mb, mt, cls_attention=maps)
        attention = np.stack(maps).astype(np.float32)
        windows = {f: np.stack([choose_window(attention[i], grid, k) for i in range(b)])
                   for f, k in window_sides.items()}
        sides = list(window_sides)
        # The hybrid images of every side in one call, then the windows alone (short sets, batched by length).
        # the window's patches as sent on their own (through the codec, a window is its own payload)
        sent = {f: [wire.patches(pixels[i], windows[f][i], p) for i in range(b)] for f in sides}
        hybrid = [hybrid_patches(glance[i], sent[f][i], windows[f][i]) for f in sides for i in range(b)]
        h_probs, _ = _forward(model, pre, hybrid, [all_idx] * len(hybrid), mb, mt)
        w_sets = [sent[f][i] for f in sides for i in range(b)]
        w_probs, _ = _forward(model, pre, w_sets, [windows[f][i] for f in sides for i in range(b)], mb, mt)
        centres = {f: centre_window(grid, window_sides[f]) for f in sides}
        centred = [hybrid_patches(glance[i], wire.patches(pixels[i], centres[f], p), centres[f])
                   for f in sides for i in range(b)]
        c_probs, _ = _forward(model, pre, centred, [all_idx] * len(centred), mb, mt)
        out[s] = {"glance_probs": g_probs, "glance_u": g_u, "attention": attention, "windows": windows,
                  "image_probs": {f: h_probs[j * b:(j + 1) * b] for j, f in enumerate(sides)},
                  "window_probs": {f: w_probs[j * b:(j + 1) * b] for j, f in enumerate(sides)},
                  "centre_probs": {f: c_probs[j * b:(j + 1) * b] for j, f in enumerate(sides)}}
    return server_probs, out


def compute_passes(cfg: RegionEvalConfig, ds: Any, server: Any, report: ProgressFn) -> RegionPasses:
    """Every forward the sweep needs, in chunks of ``cfg.chunk`` images (fp32, inference mode)."""
    import torch

    from shared import datasets

    grid = server.grid
    window_sides = {f: window_side(min(grid), f) for f in cfg.sides}
    labels: list[np.ndarray] = []
    server_parts: list[np.ndarray] = []
    parts: dict[int, list[dict[str, Any]]] = {s: [] for s in cfg.downscales}
    total = len(ds)
    with torch.inference_mode():
        for start in range(0, total, cfg.chunk):
            end = min(total, start + cfg.chunk)
            pixels, lab = datasets.to_tensor_batch(ds.samples[start:end], server.preprocess)
            sp, per_scale = _chunk_passes(server, cfg, pixels.numpy(), window_sides)
            labels.append(lab.numpy())
            server_parts.append(sp)
            for s, got in per_scale.items():
                parts[s].append(got)
            report("passes", end, total, "downscale " + ", ".join(map(str, cfg.downscales)))

    def cat(s: int, key: str) -> Any:
        return np.concatenate([c[key] for c in parts[s]])

    def cat_sides(s: int, key: str) -> dict[float, Any]:
        return {f: np.concatenate([c[key][f] for c in parts[s]]) for f in cfg.sides}

    scales = {s: ScalePasses(factor=s, glance_probs=cat(s, "glance_probs"), glance_u=cat(s, "glance_u"),
                             attention=cat(s, "attention"), windows=cat_sides(s, "windows"),
                             image_probs=cat_sides(s, "image_probs"), window_probs=cat_sides(s, "window_probs"),
                             centre_probs=cat_sides(s, "centre_probs"))
              for s in cfg.downscales}
    return RegionPasses(labels=np.concatenate(labels).astype(np.int64), server_probs=np.concatenate(server_parts),
                        grid=grid, patch_size=server.patch_size, window_sides=window_sides, scales=scales)


# --------------------------------------------------------------------------------------------------
# Bytes on the wire
# --------------------------------------------------------------------------------------------------

@dataclass
class ByteSizes:
    """Payload sizes of a seeded sample of S images (indices into the evaluated images)."""

    sample: IntArray  # (S,)
    reference: IntArray  # (S,) full image, jpeg q90, every patch (shared.codecs.full_image_payload_bytes)
    server: IntArray  # (S,) full image through the service's codec, every patch (server-only)
    glance: dict[int, IntArray]  # downscale → (S,) the downsampled image, every patch of size p/s
    region: dict[int, dict[float, IntArray]]  # downscale → side fraction → (S,) the window's full-res patches

    def fraction(self, total: float) -> float:
        return total / max(1.0, float(np.sum(self.reference)))


def byte_sample(n: int, size: int, seed: int) -> IntArray:
    """The images whose payloads are encoded: a seeded subsample, as ``patchcast eval`` draws it."""
    return np.sort(np.random.default_rng([seed, 7]).permutation(n)[:min(size, n)])


def measure_bytes(cfg: RegionEvalConfig, ds: Any, server: Any, passes: RegionPasses, report: ProgressFn) -> ByteSizes:
    """Encode, for each sampled image, the glance and every window it would send (its own windows,
    chosen by the server's attention on its glance) with the service's codec."""
    from shared import datasets
    from shared.codecs import full_image_payload_bytes, get_codec, quality_params

    codec = get_codec(cfg.codec)
    params = quality_params(codec, cfg.quality)
    p = passes.patch_size
    n = passes.num_patches
    all_idx = np.arange(n)
    sample = byte_sample(len(passes.labels), cfg.bytes_sample, cfg.seed)
    ref, srv = [], []
    glance: dict[int, list[int]] = {s: [] for s in cfg.downscales}
    region: dict[int, dict[float, list[int]]] = {s: {f: [] for f in cfg.sides} for s in cfg.downscales}
    for j, i in enumerate(sample):
        px = datasets.crop_uint8(datasets.decode_rgb(ds.samples[int(i)].data), server.preprocess)
        ref.append(full_image_payload_bytes(px, p, REFERENCE_JPEG_QUALITY))
        srv.append(len(codec.encode(px, all_idx, p, params)))
        for s in cfg.downscales:
            glance[s].append(len(codec.encode(downsample(px, s), all_idx, global_patch_size(p, s), params)))
            for f in cfg.sides:
                region[s][f].append(len(codec.encode(px, passes.scales[s].windows[f][int(i)], p, params)))
        if (j + 1) % 16 == 0 or j + 1 == len(sample):
            report("bytes", j + 1, len(sample), f"{cfg.codec} q{cfg.quality}")

    def arr(x: list[int]) -> IntArray:
        return np.asarray(x, dtype=np.int64)

    return ByteSizes(sample=sample, reference=arr(ref), server=arr(srv),
                     glance={s: arr(v) for s, v in glance.items()},
                     region={s: {f: arr(v) for f, v in d.items()} for s, d in region.items()})


# --------------------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------------------

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


CSV_FIELDS = list(RegionPoint.__dataclass_fields__)


def eta_grid(u: FloatArray, quantiles: int, fixed: Sequence[float]) -> list[float]:
    """η values: evenly spaced quantiles of the observed glance min-entropy (so the asked fraction
    covers 0…1 evenly), round values, 0 (always ask) and +inf (never ask)."""
    qs = np.quantile(np.asarray(u, dtype=np.float64), np.linspace(0.0, 1.0, quantiles + 1))
    values = {round(float(q), 4) for q in qs} | {float(v) for v in fixed} | {0.0, math.inf}
    return sorted(max(0.0, v) for v in values)


def ask_masks(u: FloatArray, etas: Sequence[float]) -> BoolArray:
    """(T, B) decisions: ask when the glance's min-entropy ≥ η (compared in float32 like
    :func:`shared.gates.should_send`)."""
    from patchcast.eval import send_masks

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


def _point_json(p: RegionPoint | None) -> dict[str, Any] | None:
    if p is None:
        return None
    d = asdict(p)
    if d["eta"] is not None and math.isinf(d["eta"]):
        d["eta"] = "inf"
    return d


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
                ok = [p for p in mine if p.accuracy >= target - 1e-12]
                within = min(ok, key=lambda p: (p.pixel_frac, -p.accuracy)) if ok else None
                if within is not None:
                    within_all.append(within)
                rows.append({"fusion": fusion, "side_fraction": f, "window_side": passes.window_sides[f],
                             "window_fraction": passes.window_fraction(f), "always_ask": _point_json(always),
                             "at_budget": _point_json(at_budget), "within_loss": _point_json(within)})
        sp = passes.scales[s]
        choice = [{"side_fraction": f, "window_side": passes.window_sides[f],
                   "attention": float(np.mean(sp.image_probs[f].argmax(1) == passes.labels)),
                   "centre": float(np.mean(sp.centre_probs[f].argmax(1) == passes.labels))} for f in cfg.sides]
        scales[str(s)] = {"glance": _point_json(glance), "u_mean": float(np.mean(sp.glance_u)),
                          "rows": rows, "window_choice": choice}
    best = min(within_all, key=lambda p: (p.pixel_frac, -p.accuracy)) if within_all else None
    best_bytes = min(within_all, key=lambda p: (p.bytes_frac, -p.accuracy)) if within_all else None
    return {"images": len(passes.labels), "server": _point_json(server), "target_accuracy": target,
            "budget": cfg.budget, "max_loss_points": cfg.max_loss, "scales": scales,
            "pixels": f"{cfg.codec} q{cfg.quality} round trip" if cfg.through_codec else "lossless",
            "cheapest_within_loss": _point_json(best), "cheapest_within_loss_by_bytes": _point_json(best_bytes)}


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------

def write_csv(path: Path, points: Sequence[RegionPoint]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for p in points:
            row: dict[str, Any] = asdict(p)
            for k, v in row.items():
                if v is None:
                    row[k] = ""
                elif isinstance(v, float):
                    row[k] = f"{v:.6g}" if k in ("side_fraction", "eta") else f"{v:.6f}"
            w.writerow(row)


def read_csv(path: Path) -> list[RegionPoint]:
    """``points.csv`` back as points (η ``inf`` included)."""
    out = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            def opt(key: str, cast: Callable[[str], Any], row: dict[str, str] = r) -> Any:
                return cast(row[key]) if row[key] else None
            out.append(RegionPoint(r["kind"], opt("downscale", int), opt("side_fraction", float),
                                   opt("window_side", int), r["fusion"], opt("eta", float),
                                   *(float(r[k]) for k in CSV_FIELDS[6:])))
    return out


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def _eta(x: Any) -> str:
    return "∞" if x == "inf" or (isinstance(x, float) and math.isinf(x)) else f"{x:g}"


def report_markdown(cfg: RegionEvalConfig, summary: dict[str, Any]) -> str:
    srv = summary["server"]
    lines = ["# Region retransmission: offline evaluation", "",
             f"{summary['images']:,} images of `{cfg.data}`, server `{cfg.server}`; bytes measured on "
             f"{summary['bytes_sample']} images with `{cfg.codec}` q{cfg.quality} ÷ the same images as full-image "
             f"JPEG q{REFERENCE_JPEG_QUALITY} payloads. Pixel cost: pixels sent ÷ full-image pixels (glance 1/s² "
             "for every image, + the window's share for the images asked). The server classified "
             + (f"every image, glance and window after a `{cfg.codec}` q{cfg.quality} round trip, as live."
                if cfg.through_codec else "the exact pixels (the codec's loss not applied)."), ""]
    if cfg.command:
        lines += [f"Command: `{cfg.command}` ({summary['timings_s']['total_s']:.0f} s, "
                  f"{summary['threads']} torch threads).", ""]
    lines += [f"- Server only (full image): **{_pct(srv['accuracy'])}** (bytes {srv['bytes_frac']:.3f} through "
              f"`{cfg.codec}`)"]
    for s, sc in summary["scales"].items():
        g = sc["glance"]
        lines.append(f"- Glance only, s = {s}: **{_pct(g['accuracy'])}** at pixel cost {g['pixel_frac']:.4f}, "
                     f"bytes {g['bytes_frac']:.3f} (mean glance min-entropy {sc['u_mean']:.2f} bits)")
    best = summary["cheapest_within_loss"]
    if best:
        lines.append(f"- Cheapest point within {cfg.max_loss:g} pt of server-only: s = {best['downscale']}, "
                     f"side {best['side_fraction']:g}, fusion `{best['fusion']}`, η = {_eta(best['eta'])}: "
                     f"{_pct(best['accuracy'])}, {100 * best['asked_frac']:.1f} % asked, pixel cost "
                     f"{best['pixel_frac']:.3f}, bytes {best['bytes_frac']:.3f}")
    else:
        lines.append(f"- No operating point within {cfg.max_loss:g} pt of server-only.")
    for s, sc in summary["scales"].items():
        lines += ["", f"## Downscale s = {s}", "",
                  f"| fusion | side | window | always ask: accuracy (pixels, bytes) | best at pixel cost ≤ "
                  f"{cfg.budget:g}: accuracy (η, asked) | cheapest within {cfg.max_loss:g} pt of server-only: "
                  "η, accuracy, asked, pixels, bytes |",
                  "|---|---|---|---|---|---|"]
        for r in sc["rows"]:
            a, b, w = r["always_ask"], r["at_budget"], r["within_loss"]
            at = (f"{_pct(b['accuracy'])} (η {_eta(b['eta'])}, {100 * b['asked_frac']:.1f} %)" if b else "–")
            wl = (f"η {_eta(w['eta'])}: {_pct(w['accuracy'])}, {100 * w['asked_frac']:.1f} %, "
                  f"{w['pixel_frac']:.3f}, {w['bytes_frac']:.3f}" if w else "none")
            lines.append(f"| {r['fusion']} | {r['side_fraction']:g} | {r['window_side']}×{r['window_side']} "
                         f"({100 * r['window_fraction']:.1f} %) | {_pct(a['accuracy'])} ({a['pixel_frac']:.3f}, "
                         f"{a['bytes_frac']:.3f}) | {at} | {wl} |")
        lines += ["", "Where the window goes (`image` fusion, every image asked): the server's attention against a "
                  "fixed window in the middle of the image.", "",
                  "| side | window | attention | centre |", "|---|---|---|---|"]
        for c in sc["window_choice"]:
            lines.append(f"| {c['side_fraction']:g} | {c['window_side']}×{c['window_side']} | "
                         f"{_pct(c['attention'])} | {_pct(c['centre'])} |")
    return "\n".join(lines) + "\n"


def plot(cfg: RegionEvalConfig, out_dir: Path, points: Sequence[RegionPoint], x: str, name: str,
         xlabel: str) -> Path:
    """Accuracy vs cost (``x``: ``pixel_frac`` or ``bytes_frac``), one panel per downscale factor, one
    curve per (side, fusion), the baselines as markers and a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    factors = sorted({p.downscale for p in points if p.kind == "glance" and p.downscale is not None})
    fig, axes = plt.subplots(1, len(factors), figsize=(6.4 * len(factors), 4.8), squeeze=False, sharey=True)
    server = next(p for p in points if p.kind == "server")
    colors = dict(zip(cfg.sides, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                                  "tab:pink", "tab:olive"), strict=False))
    styles = {"image": "-", "image+probs": "--", "probs": ":"}
    for ax, s in zip(axes[0], factors, strict=True):
        for fusion in FUSIONS:
            for f in cfg.sides:
                mine = sorted((p for p in points if p.kind == "region" and p.downscale == s and p.fusion == fusion
                               and p.side_fraction == f), key=lambda p: (getattr(p, x), p.asked_frac))
                ax.plot([getattr(p, x) for p in mine], [100 * p.accuracy for p in mine], styles[fusion],
                        color=colors.get(f, "gray"), lw=1.3)
        glance = next(p for p in points if p.kind == "glance" and p.downscale == s)
        ax.axhline(100 * server.accuracy, color="black", ls="-.", lw=0.8)
        ax.plot([getattr(server, x)], [100 * server.accuracy], "ks", ms=7)
        ax.plot([getattr(glance, x)], [100 * glance.accuracy], "k*", ms=11)
        if x == "pixel_frac":
            ax.axvline(cfg.budget, color="gray", ls=":", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_title(f"downscale s = {s}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    handles = [Line2D([], [], color=colors.get(f, "gray"), lw=2, label=f"side {f:g}") for f in cfg.sides]
    handles += [Line2D([], [], color="black", ls=styles[fu], label=f"fusion {fu}") for fu in FUSIONS]
    handles += [Line2D([], [], color="black", marker="s", ls="-.", label="server, full image"),
                Line2D([], [], color="black", marker="*", ls="", ms=10, label="glance only")]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="lower right")
    fig.suptitle("Region retransmission: accuracy vs cost (η swept along each curve)", fontsize=11)
    fig.tight_layout()
    path = out_dir / name
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

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

    from patchcast.eval import default_threads
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
    sizes = measure_bytes(cfg, ds, server, passes, report)
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
    write_csv(files[0], points)
    files[1].write_text(report_markdown(cfg, summary))
    files[2].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if cfg.plots:
        files.append(plot(cfg, out_dir, points, "pixel_frac", "region_tradeoff.png",
                          "pixels sent ÷ full-image pixels"))
        files.append(plot(cfg, out_dir, points, "bytes_frac", "region_bytes.png",
                          f"bytes ({cfg.codec} q{cfg.quality}) ÷ full-image JPEG q{REFERENCE_JPEG_QUALITY}"))
    return RegionEvalResult(passes=passes, sizes=sizes, points=points, summary=summary, files=files)
