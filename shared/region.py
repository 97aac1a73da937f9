"""Server-driven region retransmission: the pure parts (no MQTT, no asyncio).

The exchange, end to end (``docs/protocol.md``, *Region retransmission*)::

    device: full image (H, W) ─▶ box-downsample by s ─▶ PatchRequest with ``downscale = s`` (global)
    worker: upsample back to (H, W) ─▶ server forward on every patch ─▶ logits + CLS attention
            min-entropy < η  ─▶ Reply (final)
            else             ─▶ window of the server's attention ─▶ RegionRequest to the device
    device: the window's patches at full resolution ─▶ PatchRequest with ``exchange`` (region)
    worker: forward on the fused input ─▶ fused probabilities ─▶ Reply (final)

The idea is Glance-and-Focus (Wang et al., NeurIPS 2020) served over the network: the cheap global
glance answers the easy images, and only the hard ones pay for full-resolution pixels, where the
server's own attention says the object is.

Everything here is shared by the worker, the device and the offline evaluation, so that what is
measured offline is what the service computes.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from PIL import Image

from shared.errors import BadFieldError, BadGeometryError
from shared.protocol import PatchRequest, decode_patches

Fusion = Literal["image", "probs", "image+probs"]
FUSIONS: tuple[Fusion, ...] = ("image", "probs", "image+probs")


def downsample(pixels: np.ndarray, factor: int) -> np.ndarray:
    """(H, W, 3) uint8 → (H/s, W/s, 3) uint8 by the mean of each s×s block (a box filter: exact,
    no aliasing beyond the block). H and W must be multiples of ``factor``."""
    h, w = pixels.shape[:2]
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"image {h}×{w} cannot be downsampled by {factor}")
    if factor == 1:
        return pixels
    blocks = pixels.reshape(h // factor, factor, w // factor, factor, 3).astype(np.float32)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def upsample(pixels: np.ndarray, factor: int) -> np.ndarray:
    """(h, w, 3) uint8 → (h·s, w·s, 3) uint8, bilinear (Pillow): the server's view of a global image."""
    if factor < 1:
        raise ValueError(f"cannot upsample by {factor}")
    if factor == 1:
        return pixels
    h, w = pixels.shape[:2]
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    return np.asarray(image.resize((w * factor, h * factor), Image.Resampling.BILINEAR))


def to_patches(pixels: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W, 3) → (N, p, p, 3), row-major patch order (as the wire's masks and the models number them)."""
    h, w = pixels.shape[:2]
    p = patch_size
    grid = pixels.reshape(h // p, p, w // p, p, 3).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(grid.reshape(-1, p, p, 3))


def from_patches(patches: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(N, p, p, 3) in row-major order → (rows·p, cols·p, 3)."""
    rows, cols = grid
    p = patches.shape[1]
    return np.ascontiguousarray(patches.reshape(rows, cols, p, p, 3).transpose(0, 2, 1, 3, 4)
                                .reshape(rows * p, cols * p, 3))


def global_patch_size(patch_size: int, factor: int) -> int:
    """The patch size a global request is tiled in: the model's patch divided by the factor, so that
    the downsampled grid is the model's grid (each low-resolution patch becomes one model patch)."""
    if factor < 1 or patch_size % factor:
        raise ValueError(f"region.downscale {factor} must divide the model's patch size {patch_size}")
    return patch_size // factor


def window_side(grid_side: int, fraction: float) -> int:
    """Patches per side of the region window: ``fraction`` of the grid side, at least 1."""
    return max(1, min(grid_side, math.floor(grid_side * fraction + 0.5)))  # halves up, not to even


def choose_window(scores: np.ndarray, grid: tuple[int, int], side: int) -> np.ndarray:
    """Sorted patch indices of the ``side``×``side`` window with the largest total score (the first
    such window in row-major order on ties). ``scores`` is (rows·cols,), e.g. CLS attention."""
    rows, cols = grid
    if scores.shape != (rows * cols,):
        raise ValueError(f"scores of shape {scores.shape} for a {rows}×{cols} grid")
    if not 1 <= side <= min(rows, cols):
        raise ValueError(f"window side {side} does not fit a {rows}×{cols} grid")
    table = np.zeros((rows + 1, cols + 1), dtype=np.float64)  # summed-area table
    table[1:, 1:] = scores.astype(np.float64).reshape(rows, cols).cumsum(0).cumsum(1)
    sums = table[side:, side:] - table[:-side, side:] - table[side:, :-side] + table[:-side, :-side]
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    r, c = np.meshgrid(np.arange(top, top + side), np.arange(left, left + side), indexing="ij")
    return np.sort((r * cols + c).reshape(-1)).astype(np.int64)


def centre_window(grid: tuple[int, int], side: int) -> np.ndarray:
    """Sorted indices of the ``side``×``side`` window in the middle of the grid (rounded up-left): the
    fixed placement, and the baseline the attention's choice is measured against."""
    rows, cols = grid
    if not 1 <= side <= min(rows, cols):
        raise ValueError(f"window side {side} does not fit a {rows}×{cols} grid")
    top, left = (rows - side) // 2, (cols - side) // 2
    r, c = np.meshgrid(np.arange(top, top + side), np.arange(left, left + side), indexing="ij")
    return np.sort((r * cols + c).reshape(-1)).astype(np.int64)


def hybrid_patches(global_patches: np.ndarray, region_patches: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The upsampled global image's patches with the window's full-resolution patches in place."""
    out = global_patches.copy()
    out[indices] = region_patches
    return out


def fuse(global_probs: np.ndarray, region_probs: np.ndarray, fusion: Fusion) -> np.ndarray:
    """Final class probabilities of an exchange. ``region_probs`` is the second forward's: on the hybrid
    image (``image``, used alone; ``image+probs``, averaged with the glance) or on the window's patches
    only (``probs``, averaged with the glance)."""
    if fusion == "image":
        return region_probs
    if fusion in ("probs", "image+probs"):
        return (global_probs + region_probs) / 2.0
    raise ValueError(f"unknown fusion {fusion!r}; expected one of {', '.join(FUSIONS)}")


def decode_global(request: PatchRequest, patch_size: int) -> np.ndarray:
    """A global request's image as the server sees it: decoded, upsampled by its ``downscale`` and cut
    into the model's ``patch_size`` patches, (N, p, p, 3) uint8 in row-major order. Runs on the worker's
    decoder (a thread or a child process: a module-level function). Raises ProtocolError only."""
    factor = request.downscale
    if factor is None:
        raise BadFieldError("not a global request (no downscale)")
    small = from_patches(decode_patches(request), request.grid)
    if (request.height * factor) % patch_size or (request.width * factor) % patch_size:
        raise BadGeometryError(f"a {request.height}×{request.width} image upsampled by {factor} does not tile "
                               f"into {patch_size}-pixel patches")
    return to_patches(upsample(small, factor), patch_size)
