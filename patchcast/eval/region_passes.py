"""The torch side of ``patchcast eval-region``: every forward its sweep needs, once per image.

* the server on the full image (the server-only reference);
* per downscale ``s``: the glance (probabilities, min-entropy, CLS attention), and per window side
  fraction the hybrid-image forward and the window-only forward (the three fusions come from those two).

Forwards go through the service's code path: patches are normalised and embedded like
``ServerEngine._token_sets`` and run with :func:`shared.packing.forward_packed` in batches planned by
:func:`shared.packing.plan_batches` under the default batching limits; the glance's CLS attention is
the one the worker reads (``forward_packed(..., cls_attention=...)``), fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from patchcast.eval.arrays import FloatArray, IntArray
from patchcast.progress import ProgressFn
from shared.region import (
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

if TYPE_CHECKING:
    from patchcast.eval.region import RegionEvalConfig


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
