"""Region retransmission, the pure parts (shared.region): box downsampling, upsampling, patch tiling in
the wire's and the models' row-major order, the attention window, the hybrid image, fusion and the
worker's decoding of a global request.

Tolerances: everything here is exact (uint8 pixels, index arrays), except where stated: the summed-area
window against brute force compares sums within 1e-9 (float64 over ≤ 300 scores in [0, 1)), and the
model-numbering check compares tokens within 1e-5 (fp32 conv vs the same weights as one matrix product).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from shared.bitmask import pack_mask, unpack_mask
from shared.errors import BadFieldError, ProtocolError
from shared.models import VitArch
from shared.protocol import PatchRequest, build_request, decode_request, encode
from shared.region import (
    FUSIONS,
    choose_window,
    decode_global,
    downsample,
    from_patches,
    fuse,
    global_patch_size,
    hybrid_patches,
    to_patches,
    upsample,
    window_side,
)
from shared.subset import embed_all, embed_patches, patchify


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ---- downsample / upsample ---------------------------------------------------------------------


def test_downsample_is_the_box_mean_on_a_hand_made_example() -> None:
    # One channel spelled out (the other two are offsets of it): 4×6 → 2×3 by 2.
    plane = np.array([[0, 2, 10, 10, 100, 200],
                      [4, 6, 10, 10, 50, 250],
                      [1, 1, 255, 255, 7, 9],
                      [1, 1, 255, 255, 11, 13]], dtype=np.uint8)
    pixels = np.stack([plane, plane // 2, 255 - plane], axis=-1)
    want_plane = np.array([[3, 10, 150],  # (0+2+4+6)/4, 10, (100+200+50+250)/4
                           [1, 255, 10]], dtype=np.uint8)  # 1, 255, (7+9+11+13)/4
    small = downsample(pixels, 2)
    assert small.shape == (2, 3, 3) and small.dtype == np.uint8
    np.testing.assert_array_equal(small[..., 0], want_plane)
    # plane // 2 = [[0,1,5,5,50,100],[2,3,5,5,25,125],[0,0,127,127,3,4],[0,0,127,127,5,6]]
    np.testing.assert_array_equal(small[..., 1], [[2, 5, 75], [0, 127, 4]])  # 1.5 → 2 and 4.5 → 4 (rint)
    np.testing.assert_array_equal(small[..., 2], 255 - want_plane)


def test_downsample_matches_the_block_mean_on_random_images() -> None:
    pixels = _image(24, 36, seed=3)
    for s in (2, 3, 4, 6, 12):
        small = downsample(pixels, s)
        assert small.shape == (24 // s, 36 // s, 3)
        blocks = pixels.astype(np.float64).reshape(24 // s, s, 36 // s, s, 3).mean(axis=(1, 3))
        assert np.abs(small.astype(np.float64) - blocks).max() <= 0.5  # rounded to the nearest integer
        assert small[1, 2, 0] == np.rint(pixels[s:2 * s, 2 * s:3 * s, 0].astype(np.float64).mean())
    np.testing.assert_array_equal(downsample(pixels, 1), pixels)


@pytest.mark.parametrize(("shape", "factor"), [((5, 4), 2), ((4, 6), 4), ((8, 8), 3), ((8, 8), 0), ((8, 8), -2)])
def test_downsample_refuses_non_multiples(shape: tuple[int, int], factor: int) -> None:
    with pytest.raises(ValueError, match="cannot be downsampled"):
        downsample(_image(*shape), factor)


def test_upsample_shape_and_constant_images() -> None:
    small = _image(5, 7, seed=1)
    for s in (2, 3, 4):
        big = upsample(small, s)
        assert big.shape == (5 * s, 7 * s, 3) and big.dtype == np.uint8
    np.testing.assert_array_equal(upsample(small, 1), small)
    constant = np.empty((6, 4, 3), dtype=np.uint8)
    constant[...] = (17, 200, 99)
    for s in (2, 4, 8):
        big = upsample(constant, s)
        assert big.shape == (6 * s, 4 * s, 3)
        assert (big == np.array([17, 200, 99], dtype=np.uint8)).all()


def test_upsample_of_a_downsample_stays_close_on_a_smooth_image() -> None:
    # A linear ramp: bilinear upsampling of its box means is near the ramp (edges extrapolate flat).
    ramp = np.broadcast_to(np.arange(0, 64, dtype=np.uint8)[None, :, None] * 3, (16, 64, 3)).copy()
    back = upsample(downsample(ramp, 4), 4).astype(int)
    assert np.abs(back[:, 4:-4] - ramp[:, 4:-4].astype(int)).max() <= 2


# ---- patch tiling and numbering --------------------------------------------------------------------


def test_to_patches_round_trips_and_numbers_row_major() -> None:
    p, rows, cols = 4, 3, 5
    pixels = _image(rows * p, cols * p, seed=2)
    patches = to_patches(pixels, p)
    assert patches.shape == (rows * cols, p, p, 3) and patches.dtype == np.uint8
    assert patches.flags["C_CONTIGUOUS"]
    for i in range(rows * cols):
        r, c = i // cols, i % cols
        np.testing.assert_array_equal(patches[i], pixels[r * p:(r + 1) * p, c * p:(c + 1) * p])
    back = from_patches(patches, (rows, cols))
    assert back.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(back, pixels)
    # from_patches ∘ to_patches on a permuted set is not the identity: order matters.
    assert not np.array_equal(from_patches(patches[::-1].copy(), (rows, cols)), pixels)


def test_patch_numbering_agrees_with_the_wire_mask() -> None:
    # Bit i of the mask is patch i: a mask of the patches in row 1, cols 2..3 of a 3×5 grid.
    rows, cols = 3, 5
    window = [1 * cols + 2, 1 * cols + 3]
    mask = pack_mask(window, rows * cols)
    assert unpack_mask(mask, rows * cols).tolist() == [7, 8]
    pixels = _image(rows * 4, cols * 4, seed=4)
    kept = to_patches(pixels, 4)[unpack_mask(mask, rows * cols)]
    np.testing.assert_array_equal(kept[0], pixels[4:8, 8:12])
    np.testing.assert_array_equal(kept[1], pixels[4:8, 12:16])


def test_patch_numbering_agrees_with_the_model() -> None:
    # shared.subset.patchify and the model's own patch embedding number patches as to_patches does.
    torch.manual_seed(0)
    model = VitArch(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=2).build().eval()
    pixels = _image(16, 16, seed=5)
    image = torch.from_numpy(pixels).permute(2, 0, 1).float().unsqueeze(0) / 255.0  # (1, 3, H, W)
    ours = torch.from_numpy(to_patches(pixels, 4)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, p, p)
    torch.testing.assert_close(patchify(image, 4)[0], ours, rtol=0, atol=0)
    with torch.inference_mode():
        reference = embed_all(model, image)[0]  # timm's conv patch-embed, flattened by timm
        tokens = embed_patches(model, ours.unsqueeze(0), torch.arange(16).unsqueeze(0))[0]
    torch.testing.assert_close(tokens, reference, rtol=0, atol=1e-5)


# ---- geometry helpers ------------------------------------------------------------------------------


def test_global_patch_size() -> None:
    assert global_patch_size(16, 2) == 8
    assert global_patch_size(16, 4) == 4
    assert global_patch_size(14, 7) == 2
    assert global_patch_size(16, 1) == 16
    for patch, factor in ((16, 3), (14, 4), (16, 0), (16, -2)):
        with pytest.raises(ValueError, match="must divide"):
            global_patch_size(patch, factor)


def test_window_side() -> None:
    assert window_side(14, 0.5) == 7
    assert window_side(8, 0.25) == 2
    assert window_side(8, 1.0) == 8
    assert window_side(8, 0.01) == 1  # at least one patch
    assert window_side(8, 0.0) == 1
    assert window_side(8, 3.0) == 8  # never more than the grid
    assert window_side(1, 0.5) == 1


# ---- choose_window -----------------------------------------------------------------------------


def _brute_force(scores: np.ndarray, grid: tuple[int, int], side: int) -> tuple[float, np.ndarray]:
    rows, cols = grid
    board = scores.astype(np.float64).reshape(rows, cols)
    best, where = -np.inf, (0, 0)
    for top, left in itertools.product(range(rows - side + 1), range(cols - side + 1)):
        total = board[top:top + side, left:left + side].sum()
        if total > best:  # strictly greater: the first window in row-major order wins ties
            best, where = total, (top, left)
    r, c = np.meshgrid(np.arange(where[0], where[0] + side), np.arange(where[1], where[1] + side), indexing="ij")
    return best, np.sort((r * cols + c).reshape(-1))


@pytest.mark.parametrize(("grid", "side"), [((6, 7), 3), ((4, 4), 1), ((5, 5), 5), ((3, 8), 2)])
def test_a_single_hot_score_picks_the_first_window_containing_it(grid: tuple[int, int], side: int) -> None:
    rows, cols = grid
    for hot in range(rows * cols):
        scores = np.zeros(rows * cols, dtype=np.float32)
        scores[hot] = 1.0
        window = choose_window(scores, grid, side)
        assert window.dtype == np.int64 and window.shape == (side * side,)
        assert hot in window
        # Every window holding the hot patch ties: the first in row-major order is the one that ends there.
        r, c = divmod(hot, cols)
        top, left = max(0, r - side + 1), max(0, c - side + 1)
        assert window[0] == top * cols + left
        assert window.tolist() == sorted(window.tolist())


@pytest.mark.parametrize("seed", range(6))
def test_the_summed_area_window_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows, cols = int(rng.integers(1, 16)), int(rng.integers(1, 16))
    side = int(rng.integers(1, min(rows, cols) + 1))
    scores = rng.random(rows * cols).astype(np.float32)
    best, want = _brute_force(scores, (rows, cols), side)
    got = choose_window(scores, (rows, cols), side)
    np.testing.assert_array_equal(got, want)
    assert abs(float(scores.astype(np.float64)[got].sum()) - best) <= 1e-9


def test_window_ties_go_to_the_first_in_row_major_order() -> None:
    assert choose_window(np.zeros(16), (4, 4), 2).tolist() == [0, 1, 4, 5]
    assert choose_window(np.full(12, 0.25), (3, 4), 3).tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    # Two separate hot spots of equal weight: the upper one wins, then the left one.
    scores = np.zeros(36)
    scores[[4 * 6 + 4, 1 * 6 + 4]] = 1.0  # (4, 4) and (1, 4)
    assert choose_window(scores, (6, 6), 2).tolist() == [3, 4, 9, 10]  # top-left (0, 3) holds (1, 4)
    scores = np.zeros(36)
    scores[[3 * 6 + 5, 3 * 6 + 1]] = 1.0  # (3, 5) and (3, 1)
    assert choose_window(scores, (6, 6), 2).tolist() == [12, 13, 18, 19]  # (2, 0) holds (3, 1)


@pytest.mark.parametrize(("scores", "grid", "side"), [
    (np.zeros(15), (4, 4), 2),  # too few scores
    (np.zeros(17), (4, 4), 2),  # too many
    (np.zeros((4, 4)), (4, 4), 2),  # 2-D
    (np.zeros(16), (4, 4), 0),  # side 0
    (np.zeros(16), (4, 4), 5),  # side past the grid
    (np.zeros(12), (3, 4), 4),  # side past the shorter side
    (np.zeros(16), (4, 4), -1),
])
def test_choose_window_refuses_bad_shapes(scores: np.ndarray, grid: tuple[int, int], side: int) -> None:
    with pytest.raises(ValueError):
        choose_window(scores, grid, side)


def test_choose_window_refuses_a_scalar_score_with_value_error() -> None:
    with pytest.raises(ValueError):
        choose_window(np.array(1.0), (1, 1), 1)


# ---- hybrid image and fusion -------------------------------------------------------------------


def test_hybrid_patches_replaces_only_the_window() -> None:
    rng = np.random.default_rng(7)
    global_patches = rng.integers(0, 256, size=(16, 4, 4, 3), dtype=np.uint8)
    region = rng.integers(0, 256, size=(4, 4, 4, 3), dtype=np.uint8)
    window = np.array([5, 6, 9, 10])
    before_global, before_region = global_patches.copy(), region.copy()
    out = hybrid_patches(global_patches, region, window)
    assert out.shape == global_patches.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[window], region)
    outside = np.setdiff1d(np.arange(16), window)
    np.testing.assert_array_equal(out[outside], global_patches[outside])
    np.testing.assert_array_equal(global_patches, before_global)  # inputs untouched
    np.testing.assert_array_equal(region, before_region)
    assert not np.shares_memory(out, global_patches)


def test_fuse_for_each_kind() -> None:
    glance = np.array([0.7, 0.2, 0.1], dtype=np.float32)
    region = np.array([0.1, 0.3, 0.6], dtype=np.float32)
    np.testing.assert_array_equal(fuse(glance, region, "image"), region)
    np.testing.assert_allclose(fuse(glance, region, "probs"), [0.4, 0.25, 0.35], rtol=0, atol=1e-7)
    np.testing.assert_allclose(fuse(glance, region, "image+probs"), [0.4, 0.25, 0.35], rtol=0, atol=1e-7)
    for kind in FUSIONS:
        assert abs(float(fuse(glance, region, kind).sum()) - 1.0) <= 1e-6  # still a distribution
    assert FUSIONS == ("image", "probs", "image+probs")
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse(glance, region, "max")  # type: ignore[arg-type]


# ---- decode_global -----------------------------------------------------------------------------


def _global_request(pixels: np.ndarray, factor: int, model_patch: int) -> tuple[np.ndarray, PatchRequest]:
    small = downsample(pixels, factor)
    p = global_patch_size(model_patch, factor)
    n = (small.shape[0] // p) * (small.shape[1] // p)
    request = build_request(device_id="cam-01", request_id="g-1", pixels=small, indices=np.arange(n),
                            patch_size=p, codec="raw", topk_ids=[3], topk_probs=[0.5], sent_at=1.0,
                            downscale=factor)
    return small, request


@pytest.mark.parametrize(("size", "model_patch", "factor"), [(32, 8, 2), (48, 16, 4), (32, 4, 2), (24, 6, 3)])
def test_decode_global_is_the_upsampled_image_in_model_patches(size: int, model_patch: int, factor: int) -> None:
    pixels = _image(size, size, seed=size + factor)
    small, request = _global_request(pixels, factor, model_patch)
    assert request.stage == "global" and request.downscale == factor
    want = to_patches(upsample(small, factor), model_patch)
    grid = size // model_patch
    assert want.shape == (grid * grid, model_patch, model_patch, 3)
    for seen in (request, decode_request(encode(request))):  # as built, and as the worker receives it
        got = decode_global(seen, model_patch)
        assert got.dtype == np.uint8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_decode_global_refuses_a_request_without_downscale() -> None:
    pixels = _image(32, 32)
    request = build_request(device_id="cam-01", request_id="p-1", pixels=pixels, indices=np.arange(16),
                            patch_size=8, codec="raw", sent_at=1.0)
    assert request.stage == "patches"
    with pytest.raises(BadFieldError, match="not a global request"):
        decode_global(request, 8)


def test_decode_global_raises_only_protocol_errors() -> None:
    _, request = _global_request(_image(32, 32), 2, 8)  # 16×16 in 4-px patches, upsampled to 32×32
    with pytest.raises(ProtocolError):
        decode_global(request, 5)  # 32 is not a multiple of 5
