"""The server's CLS attention, as the region exchange reads it: ``forward_packed(..., cls_attention=maps)``
(last block, CLS query, head mean, CLS column dropped, renormalised over the set's patches), through
:class:`ServerEngine` under every batching policy and through an :class:`EngineProcess` child.

References are independent of the packing code: timm's own unfused Attention, read with a hook on
``attn_drop`` (the softmax matrix), either through ``shared.attention.edge_forward`` (whole images) or
through ``shared.subset.forward_tokens`` on one set at a time (patch subsets, no padding).

Tolerances:

* fp32 maps against the references: |Δ| ≤ 1e-5 per entry (one softmax row over ≤ 17 tokens; only the
  order of the q·k reductions differs); sums 1 within 1e-5;
* asking for maps changes no logit: bitwise equal;
* bf16 (autocast over bf16-stored weights, and the same prepacked) against fp32 maps: |Δ| ≤ 0.02
  absolute per entry (entries are ~1/K, K ≤ 16; bf16 q and k carry 8 significant bits, so a score is off
  by ~1 % of its size; observed ≤ 0.0034 on these models, fp32 ones ≤ 2e-7);
* ServerEngine maps under the padded and sequential policies against the packed policy: |Δ| ≤ 1e-6 (the
  same packed computation), logits against the policy's own forward without maps ≤ 1e-4 (fp32);
* EngineProcess (child process) against ServerEngine: maps ≤ 1e-6, logits ≤ 1e-5 (same code and weights).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from inference_worker.engine import PatchSet, ServerEngine
from inference_worker.engine_process import EngineProcess
from shared.attention import edge_forward
from shared.config import BatchingConfig
from shared.models import LoadedModel, Preprocess, VitArch, set_fused_attention
from shared.packing import UnsupportedModelError, autocast_ready_copy, forward_packed
from shared.prepack import prepack_available, prepack_linears
from shared.subset import embed_all, forward_tokens

FP32_MAP_ATOL = 1e-5
BF16_MAP_ATOL = 0.02
IMG, PATCH = 32, 8
N = (IMG // PATCH) ** 2  # 16 patches


def _plain() -> VisionTransformer:
    return VitArch(img_size=IMG, patch_size=PATCH, embed_dim=48, depth=2, num_heads=3, num_classes=7).build()


def _layerscale_qknorm() -> VisionTransformer:
    # q/k norms and no qkv bias: the optional pieces _cls_attention reproduces.
    return VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=48, depth=2, num_heads=4, num_classes=7,
                             init_values=0.5, qk_norm=True, qkv_bias=False)


MODELS: dict[str, Callable[[], VisionTransformer]] = {"plain": _plain, "layerscale_qknorm": _layerscale_qknorm}


def _sharpened(name: str) -> VisionTransformer:
    """A random-init model in eval mode, fused attention off (for the references; forward_packed does
    not read the flag), with sharper attention than timm's init gives (near-uniform maps would make
    every check weak)."""
    torch.manual_seed(0)
    built = MODELS[name]().eval()
    dim = int(built.embed_dim)
    with torch.no_grad():
        for blk in built.blocks:
            attn: Any = blk.attn
            attn.qkv.weight[:2 * dim].mul_(8.0)  # queries and keys
            if isinstance(attn.q_norm, torch.nn.LayerNorm):  # normalised: sharpen after the norm
                attn.q_norm.weight.mul_(4.0)
    set_fused_attention(built, False)
    return built


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest) -> VisionTransformer:
    return _sharpened(request.param)


def _images(b: int, seed: int) -> torch.Tensor:
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _subsets(model: VisionTransformer, seed: int) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Token sets of random images: CLS only, one patch, every patch, and ragged subsets (sorted indices)."""
    rng = np.random.default_rng(seed)
    with torch.inference_mode():
        tokens = embed_all(model, _images(6, seed))
    sizes = [0, 1, N, 5, 11, 3]
    sets, kept = [], []
    for i, k in enumerate(sizes):
        idx = np.sort(rng.choice(N, size=k, replace=False)).astype(np.int64)
        sets.append(tokens[i, torch.from_numpy(idx)].clone())
        kept.append(idx)
    return sets, kept


def _reference_map(model: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """One set alone (no padding, no packing) through timm's unfused blocks: the last block's softmax
    matrix from its attn_drop hook, CLS row, head mean, CLS column dropped, renormalised."""
    captured: list[torch.Tensor] = []
    last: Any = model.blocks[-1]
    hook = last.attn.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        with torch.inference_mode():
            forward_tokens(model, tokens.unsqueeze(0))
    finally:
        hook.remove()
    (matrix,) = captured  # (1, H, T, T)
    row = matrix[0, :, 0, 1:].float().mean(0)
    return row / row.sum()


# ---- forward_packed ----------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "padded"])
def test_full_sets_equal_the_edge_forward_head_mean(model: VisionTransformer, attention: str) -> None:
    images = _images(3, seed=1)
    with torch.inference_mode():
        edge = edge_forward(model, images)  # (B, H, N) raw softmax values
        maps: list[torch.Tensor] = []
        logits = forward_packed(model, list(embed_all(model, images)), attention=attention,  # type: ignore[arg-type]
                                cls_attention=maps)
    want = edge.cls_attention.mean(1)
    want = want / want.sum(-1, keepdim=True)
    assert len(maps) == 3
    for got, ref in zip(maps, want, strict=True):
        assert got.dtype == torch.float32 and got.shape == (N,)
        torch.testing.assert_close(got, ref, rtol=0, atol=FP32_MAP_ATOL)
    torch.testing.assert_close(logits, edge.logits, rtol=1e-4, atol=1e-5)
    # The maps are far from uniform (else any window would do and the check would be weak).
    assert bool((want.max(-1).values > 1.5 / N).all()) and bool((want.min(-1).values < 0.5 / N).all())


@pytest.mark.parametrize("attention", ["sdpa", "padded"])
@pytest.mark.parametrize("cls_only_last", [True, False])
@pytest.mark.parametrize("shape_buckets", [False, True])
def test_subset_maps_equal_one_set_at_a_time(model: VisionTransformer, attention: str, cls_only_last: bool,
                                             shape_buckets: bool) -> None:
    sets, _ = _subsets(model, seed=2)
    kw: dict[str, Any] = {"attention": attention, "cls_only_last": cls_only_last, "shape_buckets": shape_buckets}
    with torch.inference_mode():
        plain = forward_packed(model, sets, **kw)
        maps: list[torch.Tensor] = []
        with_maps = forward_packed(model, sets, cls_attention=maps, **kw)
    assert torch.equal(with_maps, plain)  # asking for maps changes no logit, bit for bit
    assert [int(m.shape[0]) for m in maps] == [int(s.shape[0]) for s in sets]
    for tokens, got in zip(sets, maps, strict=True):
        assert got.dtype == torch.float32
        if tokens.shape[0] == 0:
            continue  # CLS alone: no patch to attend to, an empty map
        assert abs(float(got.sum()) - 1.0) <= 1e-5
        assert bool((got >= 0).all())
        torch.testing.assert_close(got, _reference_map(model, tokens), rtol=0, atol=FP32_MAP_ATOL)
    assert maps[1].tolist() == [1.0]  # one patch takes all of it


def test_maps_are_appended_in_set_order(model: VisionTransformer) -> None:
    sets, _ = _subsets(model, seed=3)
    maps: list[torch.Tensor] = [torch.zeros(2)]  # what the caller had is kept
    with torch.inference_mode():
        forward_packed(model, sets, cls_attention=maps)
        reversed_maps: list[torch.Tensor] = []
        forward_packed(model, sets[::-1], cls_attention=reversed_maps)
    assert len(maps) == 1 + len(sets) and maps[0].tolist() == [0.0, 0.0]
    for a, b in zip(maps[1:], reversed_maps[::-1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=FP32_MAP_ATOL)


def test_no_sets_no_maps(model: VisionTransformer) -> None:
    maps: list[torch.Tensor] = []
    with torch.inference_mode():
        assert forward_packed(model, [], cls_attention=maps).shape == (0, 7)
    assert maps == []


@pytest.mark.parametrize("variant", ["autocast", "prepacked"])
def test_bf16_shape_bucketed_maps_match_fp32(model: VisionTransformer, variant: str) -> None:
    if variant == "prepacked" and not prepack_available():
        pytest.skip("this torch cannot prepack oneDNN Linear weights")
    sets, _ = _subsets(model, seed=4)
    with torch.inference_mode():
        fp32_maps: list[torch.Tensor] = []
        forward_packed(model, sets, cls_attention=fp32_maps)
    bf16 = autocast_ready_copy(model)
    if variant == "prepacked":
        assert prepack_linears(bf16) > 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = forward_packed(bf16, sets, shape_buckets=True)
        maps: list[torch.Tensor] = []
        with_maps = forward_packed(bf16, sets, shape_buckets=True, cls_attention=maps)
    assert torch.equal(with_maps, plain)
    assert len(maps) == len(sets)
    for got, ref in zip(maps, fp32_maps, strict=True):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        if ref.numel():
            assert abs(float(got.sum()) - 1.0) <= 1e-5  # renormalised in float32
            err = float((got - ref).abs().max())
            assert err <= BF16_MAP_ATOL, f"bf16 map error {err:.4g}"


# ---- ServerEngine and EngineProcess ------------------------------------------------------------------

PREPROCESS = Preprocess(input_size=IMG, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), crop_pct=1.0)


def _loaded(model: VisionTransformer) -> LoadedModel:
    return LoadedModel(model=copy.deepcopy(model), name="server", preprocess=PREPROCESS,
                       class_names=[f"c{i}" for i in range(7)])


def _patch_sets(seed: int) -> list[PatchSet]:
    rng = np.random.default_rng(seed)
    out = [PatchSet(np.zeros((0, PATCH, PATCH, 3), np.uint8), np.zeros(0, np.int64))]  # CLS alone
    for k in (N, 1, 7, 12, 4):
        idx = np.sort(rng.choice(N, size=k, replace=False)).astype(np.int64)
        out.append(PatchSet(rng.integers(0, 256, size=(k, PATCH, PATCH, 3), dtype=np.uint8), idx))
    return out


def _check_maps(maps: list[np.ndarray], sets: list[PatchSet]) -> None:
    assert [m.shape for m in maps] == [(s.patches.shape[0],) for s in sets]
    for m in maps:
        assert m.dtype == np.float32
        if m.size:
            assert abs(float(m.sum()) - 1.0) <= 1e-5


@pytest.fixture(scope="module")
def packed_engine(model: VisionTransformer) -> ServerEngine:
    return ServerEngine(_loaded(model), BatchingConfig(max_batch=32, max_tokens=1024, policy="packed"), "fp32")


def test_engine_maps_equal_the_unbatched_reference(model: VisionTransformer, packed_engine: ServerEngine) -> None:
    sets = _patch_sets(seed=5)
    maps: list[np.ndarray] = []
    logits = packed_engine.logits(sets, maps)
    _check_maps(maps, sets)
    torch.testing.assert_close(logits, packed_engine.logits(sets), rtol=0, atol=0)
    # The engine embeds pixels itself: compare with the same tokens, one set at a time.
    for s, m in zip(sets, maps, strict=True):
        if not s.patches.shape[0]:
            continue
        tokens = packed_engine._token_sets([s])[0]
        want = _reference_map(packed_engine.model, tokens)
        np.testing.assert_allclose(m, want.numpy(), rtol=0, atol=FP32_MAP_ATOL)


@pytest.mark.parametrize("policy", ["padded", "sequential"])
def test_other_policies_still_return_the_packed_maps(model: VisionTransformer, packed_engine: ServerEngine,
                                                    policy: str) -> None:
    engine = ServerEngine(_loaded(model), BatchingConfig(max_batch=4, max_tokens=64, policy=policy),  # type: ignore[arg-type]
                          "fp32")
    sets = _patch_sets(seed=6)
    want: list[np.ndarray] = []
    packed_engine.logits(sets, want)
    got: list[np.ndarray] = []
    logits = engine.logits(sets, got)
    _check_maps(got, sets)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # Same logits as the policy's own forward without maps (and as checked, finite).
    torch.testing.assert_close(logits, engine.logits(sets), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(engine.logits_checked(sets, []), logits, rtol=0, atol=0)


@pytest.mark.parametrize("prepack", [False, True])
def test_a_bf16_engine_returns_maps_close_to_fp32(model: VisionTransformer, packed_engine: ServerEngine,
                                                  prepack: bool) -> None:
    if prepack and not prepack_available():
        pytest.skip("this torch cannot prepack oneDNN Linear weights")
    engine = ServerEngine(_loaded(model), BatchingConfig(max_batch=32, max_tokens=1024, policy="packed"), "bf16",
                          prepack=prepack)
    assert engine.prepacked == prepack and engine.batching.shape_buckets
    sets = _patch_sets(seed=9)
    want: list[np.ndarray] = []
    packed_engine.logits(sets, want)
    got: list[np.ndarray] = []
    engine.logits_checked(sets, got)
    _check_maps(got, sets)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=BF16_MAP_ATOL)


def test_engine_process_returns_the_same_maps() -> None:
    # One model only: a child process costs ~10 s to start on a shared 2-core machine.
    model = _sharpened("plain")
    packed_engine = ServerEngine(_loaded(model), BatchingConfig(max_batch=32, max_tokens=1024, policy="packed"),
                                 "fp32")
    remote = EngineProcess(_loaded(model), BatchingConfig(max_batch=32, max_tokens=1024, policy="packed"), "fp32",
                           threads=1)
    try:
        for seed in (7, 8):  # two batches with maps through the same shared block
            sets = _patch_sets(seed)
            local_maps: list[np.ndarray] = []
            local = packed_engine.logits_checked(sets, local_maps)
            maps: list[np.ndarray] = []
            logits = remote.logits_checked(sets, maps)
            _check_maps(maps, sets)
            torch.testing.assert_close(logits, local, rtol=0, atol=1e-5)
            for a, b in zip(maps, local_maps, strict=True):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        # A batch without maps after one with them: same logits, nothing else returned.
        plain = remote.logits_checked(sets)
        torch.testing.assert_close(plain, local, rtol=0, atol=1e-5)
        # And maps again after one without (the child's per-batch flag, not a sticky state).
        again: list[np.ndarray] = []
        torch.testing.assert_close(remote.logits(sets, again), local, rtol=0, atol=1e-5)
        for a, b in zip(again, local_maps, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        assert remote.logits_checked([], []).shape == (0, 7)
        # A batch of CLS-only sets: zero patches in all, one empty map each.
        alone: list[np.ndarray] = []
        remote.logits_checked(sets[:1] * 2, alone)
        assert [m.shape for m in alone] == [(0,), (0,)]
    finally:
        remote.close()


def test_an_engine_whose_model_cannot_pack_has_no_maps_and_says_so() -> None:
    # Register tokens: the packed forward refuses the model, so a padded-policy engine serves requests
    # but offers no attention maps (its worker then answers every glance alone instead of failing it).
    torch.manual_seed(0)
    registers = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2,
                                  num_classes=7, reg_tokens=2).eval()
    engine = ServerEngine(_loaded(registers), BatchingConfig(max_batch=4, max_tokens=64, policy="padded"), "fp32")
    assert engine.maps_available is False
    assert engine.logits(_patch_sets(seed=3)).shape[0] == len(_patch_sets(seed=3))
    with pytest.raises(UnsupportedModelError):
        ServerEngine(_loaded(registers), BatchingConfig(max_batch=4, max_tokens=64, policy="packed"), "fp32")
    plain = ServerEngine(_loaded(_sharpened("plain")), BatchingConfig(max_batch=4, max_tokens=64, policy="padded"),
                         "fp32")
    assert plain.maps_available is True
