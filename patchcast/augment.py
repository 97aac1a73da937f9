"""What a training batch looks like: the decoded split, batched augmentations (crop, random-resized
crop, mixup/cutmix), region-exchange glances as a worker sees them, and token subsets for token dropout.

Every random draw comes from the caller's CPU generator, so a run's batches do not depend on the
device and resume stays exact (:mod:`patchcast.train`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from shared import datasets
from shared.models import Preprocess
from shared.region import from_patches, to_patches, window_side
from shared.selection import spread_order


def decode_all(ds: datasets.Dataset, pre: Preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole split as uint8 (N, H, W, 3) + labels: decoded once, then augmented in torch."""
    pixels, labels = datasets.to_tensor_batch(ds.samples, pre)
    return pixels, labels


def augment(pixels: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with reflect padding + horizontal flip, batched. uint8 (B,H,W,3) → float (B,3,H,W)."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    b, _, h, w = x.shape
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (B, H)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (B, W)
    x = x[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None],
          rows[:, None, :, None], cols[:, None, None, :]]
    flip = torch.rand(b, generator=gen) < 0.5
    x[flip] = x[flip].flip(-1)
    return x


def resized_crop(pixels: torch.Tensor, size: int, gen: torch.Generator, scale_min: float) -> torch.Tensor:
    """Random-resized crop + horizontal flip, batched (one ``grid_sample``): uint8 (B,h,w,3) → float
    (B,3,size,size) in [0, 1]. Each crop covers an area fraction in [scale_min, 1] of the image with
    aspect ratio in [3/4, 4/3], anywhere inside it."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    b = x.shape[0]
    area = scale_min + (1.0 - scale_min) * torch.rand(b, generator=gen)
    log_ratio = (torch.rand(b, generator=gen) * 2 - 1) * math.log(4 / 3)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def mix_batch(unit: torch.Tensor, y: torch.Tensor, num_classes: int, mixup: float, cutmix: float,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix with the batch reversed: images (B,3,H,W) and soft targets (B, classes).

    ``lam`` ~ Beta(alpha, alpha) drawn from a NumPy generator seeded from ``gen`` (resume stays exact);
    cutmix's lam is the area actually kept after clipping the box to the image."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    other = unit.flip(0)
    if use_cutmix:
        _, _, h, w = unit.shape
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1, x0, x1 = max(0, cy - ch // 2), min(h, cy + ch // 2), max(0, cx - cw // 2), min(w, cx + cw // 2)
        unit = unit.clone()
        unit[:, :, y0:y1, x0:x1] = other[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        unit = unit * lam + other * (1.0 - lam)
    onehot = F.one_hot(y, num_classes).float()
    return unit, onehot * lam + onehot.flip(0) * (1.0 - lam)


def normalise(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class CodecRoundTrip:
    """A codec's encode + decode applied to training pixels: what a worker decodes from a device."""

    name: str
    quality: int = 90

    def __call__(self, pixels: torch.Tensor, patch_size: int, kept: list[np.ndarray] | None = None) -> torch.Tensor:
        """uint8 (B, H, W, 3) → the same, with each image's patches at ``kept[i]`` (every patch when
        ``kept`` is None) replaced by their decoded copies."""
        from shared.codecs import get_codec, quality_params

        codec = get_codec(self.name)
        params = quality_params(codec, self.quality)
        images = pixels.cpu().numpy()
        b, h, w, _ = images.shape
        grid = (h // patch_size, w // patch_size)
        out = np.empty_like(images)
        for i in range(b):
            idx = np.arange(grid[0] * grid[1]) if kept is None else np.asarray(kept[i])
            patches = to_patches(images[i], patch_size)
            patches[idx] = codec.decode(codec.encode(images[i], idx, patch_size, params), (h, w), idx, patch_size,
                                        params)
            out[i] = from_patches(patches, grid)
        return torch.from_numpy(out).to(pixels.device)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → uint8 (B, H, W, 3)."""
    return images.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.permute(0, 3, 1, 2).float().div_(255.0)


def glances(unit: torch.Tensor, factor: int, patch_size: int, window: float, gen: torch.Generator,
            hybrid: bool, wire: CodecRoundTrip | None = None) -> torch.Tensor:
    """A batch (B, 3, H, W) in [0, 1] as a worker sees region-exchange images: box-downsampled by
    ``factor`` and bilinearly upsampled back (the glance), or with ``hybrid`` the glance with one
    random full-resolution window per image (``window`` of the side, on the patch grid) in place.
    With ``wire``, the downsampled image (in p/s patches) and the window (its own payload) pass
    through that codec first, as they travel."""
    b, _, h, w = unit.shape
    if wire is None:
        small = F.avg_pool2d(unit, factor)
    else:  # the device's uint8 box mean (shared.region.downsample), then the codec
        means = F.avg_pool2d(_to_uint8(unit).permute(0, 3, 1, 2).float(), factor).round_()
        small = _to_unit(wire(means.to(torch.uint8).permute(0, 2, 3, 1), patch_size // factor))
    glance = F.interpolate(small, scale_factor=factor, mode="bilinear", align_corners=False)
    if not hybrid:
        return glance
    rows, cols = h // patch_size, w // patch_size
    side = window_side(min(rows, cols), window)
    top = torch.randint(0, rows - side + 1, (b,), generator=gen) * patch_size
    left = torch.randint(0, cols - side + 1, (b,), generator=gen) * patch_size
    y, x = torch.arange(h), torch.arange(w)
    inside = (((y[None, :] >= top[:, None]) & (y[None, :] < top[:, None] + side * patch_size))[:, :, None]
              & ((x[None, :] >= left[:, None]) & (x[None, :] < left[:, None] + side * patch_size))[:, None, :])
    if wire is not None:
        span = np.arange(side)
        kept = [((int(t) // patch_size + span)[:, None] * cols + (int(lft) // patch_size + span)[None, :]).ravel()
                for t, lft in zip(top, left, strict=True)]
        unit = _to_unit(wire(_to_uint8(unit), patch_size, kept))
    return torch.where(inside[:, None].to(unit.device), unit, glance)


TokenPick = Literal["attention", "random"]


def pick_tokens(kind: TokenPick, keep: int, scores: torch.Tensor | None, batch: int, num_patches: int,
                gen: torch.Generator, spread: int = 0) -> torch.Tensor:
    """(B, keep) patch indices: the selector's top-``keep`` by attention score (``spread`` ≥ 2: the first
    ``keep`` of its spread order, ``selection.spread``), or uniformly random.

    The random draw happens either way, so the generator's stream (and so resume) does not depend
    on which kind was picked.
    """
    random_order = torch.rand(batch, num_patches, generator=gen).argsort(1)[:, :keep]
    if kind == "random":
        return random_order
    if scores is None:
        raise ValueError("attention token picks need selector scores")
    if spread >= 2:
        return torch.from_numpy(spread_order(scores.detach().double().cpu().numpy(), spread)[:, :keep].copy())
    return scores.float().topk(keep, dim=1).indices.cpu()
