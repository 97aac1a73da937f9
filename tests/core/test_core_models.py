"""Exactness against timm on randomly initialised DeiT-Tiny- and DeiT-Base-shaped models.

Tolerances (measured on random-init models, 224², batch 2; logits have std ≈ 0.3 (Tiny), 0.55 (Base)):
* fp32, same maths in another order (fused vs unfused attention, per-patch linear vs conv,
  padded+masked vs one-by-one): max |Δlogit| 6e-7 (Tiny), 2e-6 (Base) → atol = rtol = 1e-5.
* bf16 autocast vs fp32: max |Δlogit| 0.007–0.009 (Tiny), 0.017–0.020 (Base); bf16 padded vs
  one-by-one differs by 1–2 bf16 ulps (≤ 0.016) → atol 5e-2. Argmax is not asserted: random-init
  top-1 margins are often 1e-3, below bf16 resolution, so an argmax check would be flaky, not strict.
* bf16 CLS attention vs fp32: max |Δ| 2.5e-5 (Tiny), 1.3e-4 (Base) on values ≤ 0.013 → atol 1e-3.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from shared.attention import edge_forward
from shared.errors import ModelError
from shared.models import set_fused_attention
from shared.subset import (
    embed_all,
    forward_patch_sets,
    forward_subset,
    forward_tokens,
    gather_tokens,
    pad_token_sets,
    patchify,
)

FP32 = (1e-5, 1e-5)  # (atol, rtol)
BF16_LOGITS = (5e-2, 0.0)
BF16_ATTN = (1e-3, 0.0)


def close(got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float]) -> bool:
    atol, rtol = tol
    return torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol)


def _build(name: str) -> VisionTransformer:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    assert isinstance(model, VisionTransformer)
    return model.eval()


@pytest.fixture(scope="module")
def tiny() -> Iterator[VisionTransformer]:
    with torch.inference_mode():
        yield _build("deit_tiny_patch16_224")


@pytest.fixture(scope="module")
def base() -> Iterator[VisionTransformer]:
    with torch.inference_mode():
        yield _build("deit_base_patch16_224")


def _images(b: int, seed: int) -> torch.Tensor:
    return torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _manual_last_cls_attention(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The last block's CLS attention recomputed from its input, without hooks."""
    blk: Any = model.blocks[-1]
    inputs: list[torch.Tensor] = []
    handle = blk.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    h = blk.norm1(inputs[0])
    b, t, d = h.shape
    attn = blk.attn
    qkv = attn.qkv(h).reshape(b, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return a[:, :, 0, 1:]


# ---------- edge forward ----------


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One image and timm's own fused-attention ``model(x)`` per model, computed once per module."""
    return {}


def _timm_logits(which: str, request: pytest.FixtureRequest) -> tuple[VisionTransformer, torch.Tensor,
                                                                      torch.Tensor]:
    model: VisionTransformer = request.getfixturevalue(which)
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = request.getfixturevalue("reference")
    if which not in cache:
        x = _images(1, 1)
        set_fused_attention(model, True)
        with torch.inference_mode():
            cache[which] = (x, model(x))
    x, logits = cache[which]
    return model, x, logits


@pytest.mark.parametrize("which", ["tiny", "base"])
def test_edge_forward_logits_equal_timm(which: str, request: pytest.FixtureRequest) -> None:
    model, x, fused = _timm_logits(which, request)
    set_fused_attention(model, False)
    with torch.inference_mode():
        out = edge_forward(model, x)
        if which == "tiny":  # the same unfused graph without hooks (one Base forward is enough)
            assert close(out.logits, model(x), FP32)
    assert close(out.logits, fused, FP32)
    last: Any = model.blocks[-1]
    n, heads = model.patch_embed.num_patches, last.attn.num_heads
    assert out.cls_attention.shape == (1, heads, n) and out.attentions is None


def test_edge_attention_is_the_last_blocks_softmax(tiny: VisionTransformer) -> None:
    x = _images(2, 2)
    set_fused_attention(tiny, False)
    with torch.inference_mode():
        out = edge_forward(tiny, x, all_layers=True)
        manual = _manual_last_cls_attention(tiny, x)
    assert torch.allclose(out.cls_attention, manual, atol=1e-6)
    assert out.attentions is not None and len(out.attentions) == len(tiny.blocks)
    for a in out.attentions:
        assert a.shape == (2, 3, 197, 197) and a.dtype == torch.float32
        assert torch.allclose(a.sum(dim=-1), torch.ones(2, 3, 197), atol=1e-5)
    # The stored row is the full row minus the CLS column: raw values, not renormalised.
    last = out.attentions[-1]
    assert torch.equal(out.cls_attention, last[:, :, 0, 1:])
    assert torch.allclose(out.cls_attention.sum(-1) + last[:, :, 0, 0], torch.ones(2, 3), atol=1e-5)
    assert not torch.equal(out.attentions[0], out.attentions[-1])  # one map per block, in order


def test_edge_forward_refuses_fused_attention_and_cleans_up(tiny: VisionTransformer) -> None:
    x = _images(1, 3)
    set_fused_attention(tiny, True)
    with pytest.raises(ModelError, match="fused attention"):
        edge_forward(tiny, x)
    last: Any = tiny.blocks[-1]
    last.attn.fused_attn = False  # last block suffices for the CLS row ...
    with torch.inference_mode():
        out = edge_forward(tiny, x)
    assert out.cls_attention.shape == (1, 3, 196)
    with pytest.raises(ModelError, match="block 0"):  # ... but rollout needs every block
        edge_forward(tiny, x, all_layers=True)
    set_fused_attention(tiny, False)
    with pytest.raises(ValueError):
        edge_forward(tiny, x[0])
    # Hooks are removed even when the forward fails half-way.
    with pytest.raises((AssertionError, RuntimeError)):  # timm asserts the input size
        edge_forward(tiny, torch.randn(1, 3, 200, 200))
    blocks: list[Any] = list(tiny.blocks)
    assert all(len(blk.attn.attn_drop._forward_hooks) == 0 for blk in blocks)


def test_edge_forward_bf16_autocast(tiny: VisionTransformer) -> None:
    x = _images(2, 4)
    set_fused_attention(tiny, False)
    with torch.inference_mode():
        ref = edge_forward(tiny, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = edge_forward(tiny, x)
    assert low.logits.dtype == torch.bfloat16 and low.cls_attention.dtype == torch.float32
    assert close(low.logits.float(), ref.logits, BF16_LOGITS)
    assert close(low.cls_attention, ref.cls_attention, BF16_ATTN)


def test_edge_forward_ignores_other_threads_forwards(tiny: VisionTransformer) -> None:
    """Another thread runs the same model while this thread's edge_forward is between its last
    attention map and returning; the other forward must not replace the captured map."""
    set_fused_attention(tiny, False)
    mine, other = _images(1, 10), _images(1, 11)
    with torch.inference_mode():
        expected = edge_forward(tiny, mine).cls_attention
    me = threading.get_ident()
    inside, other_done = threading.Event(), threading.Event()

    def pause_after_last_block(_m: torch.nn.Module, _i: object, _o: object) -> None:
        if threading.get_ident() == me:
            inside.set()
            assert other_done.wait(60)

    def run_other() -> None:
        assert inside.wait(60)
        with torch.inference_mode():
            tiny(other)
        other_done.set()

    last: Any = tiny.blocks[-1]
    handle = last.register_forward_hook(pause_after_last_block)
    worker = threading.Thread(target=run_other)
    worker.start()
    try:
        with torch.inference_mode():
            got = edge_forward(tiny, mine).cls_attention
    finally:
        handle.remove()
        worker.join()
    assert other_done.is_set()
    assert torch.allclose(got, expected, atol=1e-6)


# ---------- server: subset forward ----------


@pytest.mark.parametrize("which", ["tiny", "base"])
def test_subset_forward_with_all_patches_equals_timm(which: str, request: pytest.FixtureRequest) -> None:
    model, x, ref = _timm_logits(which, request)
    set_fused_attention(model, True)
    with torch.inference_mode():
        got = forward_subset(model, patchify(x, 16), torch.arange(196)[None])
    assert close(got, ref, FP32)


def test_patchify_is_row_major(tiny: VisionTransformer) -> None:
    x = _images(1, 6)
    p = patchify(x, 16)
    # Patch 15 is row 1, column 1 of the 14×14 grid.
    assert torch.equal(p[0, 15], x[0, :, 16:32, 16:32])
    assert torch.equal(p[0, 13], x[0, :, 0:16, 208:224])


@pytest.mark.parametrize("which", ["tiny", "base"])
def test_subset_forward_equals_zero_filled_image_path(which: str, request: pytest.FixtureRequest) -> None:
    model: VisionTransformer = request.getfixturevalue(which)
    x = _images(1, 7)
    keep = torch.sort(torch.randperm(196, generator=torch.Generator().manual_seed(0))[:57]).values
    # Reference: zero every dropped patch in pixel space, run timm's conv patch-embed on the image,
    # add pos-embed, gather the kept tokens.
    mask = torch.zeros(196, dtype=torch.bool)
    mask[keep] = True
    pixel_mask = mask.reshape(14, 14).repeat_interleave(16, 0).repeat_interleave(16, 1)
    zero_filled = x * pixel_mask
    set_fused_attention(model, True)
    with torch.inference_mode():
        ref = forward_tokens(model, gather_tokens(embed_all(model, zero_filled), keep[None]))
        got = forward_subset(model, patchify(x, 16)[:, keep], keep[None])
        full = forward_subset(model, patchify(x, 16), torch.arange(196)[None]) if which == "tiny" else None
    assert close(got, ref, FP32)
    if full is not None:
        assert not torch.allclose(got, full, atol=1e-3)  # dropping patches does change the answer


@pytest.mark.parametrize("fused", [True, False])
def test_padded_batch_equals_one_by_one_tiny(tiny: VisionTransformer, fused: bool) -> None:
    x = _images(3, 8)
    patches = patchify(x, 16)
    g = torch.Generator().manual_seed(1)
    index_sets = [torch.arange(196), torch.sort(torch.randperm(196, generator=g)[:40]).values,
                  torch.tensor([5, 100, 190])]
    patch_sets = [patches[i, idx] for i, idx in enumerate(index_sets)]
    set_fused_attention(tiny, fused)
    with torch.inference_mode():
        batched = forward_patch_sets(tiny, patch_sets, index_sets)
        single = torch.cat([forward_subset(tiny, p[None], i[None]) for p, i in zip(patch_sets, index_sets,
                                                                                      strict=True)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            batched_bf16 = forward_patch_sets(tiny, patch_sets, index_sets)
    assert batched.shape == (3, 1000)
    assert close(batched, single, FP32)
    assert close(batched_bf16.float(), single, BF16_LOGITS)


def test_padded_batch_equals_one_by_one_base(base: VisionTransformer) -> None:
    x = _images(2, 9)
    patches = patchify(x, 16)
    index_sets = [torch.arange(0, 196, 3), torch.arange(150, 196)]  # 66 and 46 patches
    patch_sets = [patches[i, idx] for i, idx in enumerate(index_sets)]
    set_fused_attention(base, True)
    with torch.inference_mode():
        batched = forward_patch_sets(base, patch_sets, index_sets)
        single = torch.cat([forward_subset(base, p[None], i[None]) for p, i in zip(patch_sets, index_sets,
                                                                                      strict=True)])
    assert close(batched, single, FP32)


def test_empty_patch_set_is_cls_only(tiny: VisionTransformer) -> None:
    x = _images(1, 11)
    patches = patchify(x, 16)
    set_fused_attention(tiny, True)
    empty_idx = torch.zeros(0, dtype=torch.long)
    with torch.inference_mode():
        batched = forward_patch_sets(tiny, [patches[0, :0], patches[0, :4]], [empty_idx, torch.arange(4)])
        cls_only = forward_tokens(tiny, torch.zeros(1, 0, tiny.embed_dim))
        four = forward_subset(tiny, patches[:, :4], torch.arange(4)[None])
    assert close(batched[0:1], cls_only, FP32)
    assert close(batched[1:2], four, FP32)


def test_pad_token_sets() -> None:
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]])
    tokens, mask = pad_token_sets([a, torch.zeros(0, 2), b])
    assert tokens.shape == (3, 3, 2) and mask.dtype == torch.bool
    assert mask.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert torch.equal(tokens[0], torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]))
    assert torch.equal(tokens[1], torch.zeros(3, 2)) and torch.equal(tokens[2], b)
    tokens, mask = pad_token_sets([a], pad_to=4)
    assert tokens.shape == (1, 4, 2) and mask.tolist() == [[True, True, False, False]]
    for bad_sets, pad_to in [([], None), ([a], 1), ([a, torch.zeros(2, 3)], None), ([torch.zeros(2)], None)]:
        with pytest.raises(ValueError):
            pad_token_sets(bad_sets, pad_to=pad_to)
    with pytest.raises(ValueError):
        forward_patch_sets(_NoModel(), [torch.zeros(2, 3, 16, 16)], [])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        forward_patch_sets(_NoModel(), [torch.zeros(2, 3, 16, 16)], [torch.arange(3)])  # type: ignore[arg-type]


class _NoModel:
    """Argument checks must fail before the model is touched."""
