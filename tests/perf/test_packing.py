"""Packed forward == padded-and-masked forward == one-by-one forward, and plan_batches' contract.

Tolerances (stated here, quoted in docs/benchmarks.md):

* fp32: |Δlogit| ≤ 1e-5 + 1e-4·|ref| (observed ≤ 1e-6: only GEMM blocking order differs);
* bf16 (autocast, as the worker runs, or a model cast to bf16): max |Δlogit| ≤ 3 % of the largest
  |reference logit|, against the fp32 one-by-one forward and against the bf16 padded forward
  (observed ≤ 1.3 % on these random-init models);
* bf16 with prepacked (oneDNN-blocked) Linear weights, against the same forward over the bf16-stored
  weights it was packed from: max |Δlogit| ≤ 0.5 % of the largest |logit| (the same bf16 products
  in another kernel; observed identical on an AMX Xeon and on DeiT-Base in the benchmark).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

from shared.models import VitArch
from shared.packing import (
    AttentionImpl,
    UnsupportedModelError,
    autocast_ready_copy,
    bucket_rows,
    check_packable,
    forward_packed,
    forward_padded,
    forward_sequential,
    forward_token_sets,
    plan_batches,
)
from shared.prepack import PrepackedLinear, prepack_available, prepack_linears
from shared.subset import embed_all, forward_tokens, gather_tokens

BF16_REL = 0.03
PREPACK_REL = 0.005


def _tiny_arch() -> VisionTransformer:
    return VitArch(32, 4, 64, 2, 2).build().eval()


def _deit_tiny() -> VisionTransformer:
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    assert isinstance(model, VisionTransformer)
    return model


def _layerscale_qknorm() -> VisionTransformer:
    # Exercises the optional pieces of timm's Block/Attention: LayerScale, q/k norm, no qkv bias.
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=7,
                             init_values=0.5, qk_norm=True, qkv_bias=False).eval()


MODELS: dict[str, Callable[[], VisionTransformer]] = {
    "vitarch": _tiny_arch, "deit_tiny": _deit_tiny, "layerscale_qknorm": _layerscale_qknorm}


def _token_sets(model: VisionTransformer, seed: int) -> list[torch.Tensor]:
    """Random patch-token sets with every edge case: CLS only, one patch, all patches, ragged rest."""
    g = torch.Generator().manual_seed(seed)
    n = int(model.patch_embed.num_patches)
    lengths = [0, 1, n, *torch.randint(1, n + 1, (3,), generator=g).tolist()]
    return [0.5 * torch.randn(k, int(model.embed_dim), generator=g) for k in lengths]


@dataclass
class Case:
    model: VisionTransformer
    sets: list[torch.Tensor]
    one_by_one: torch.Tensor  # fp32 reference: each set alone, no padding


@pytest.fixture(scope="module", params=list(MODELS))
def case(request: pytest.FixtureRequest) -> Case:
    torch.manual_seed(0)
    model = MODELS[request.param]()
    sets = _token_sets(model, seed=1)
    with torch.inference_mode():
        return Case(model, sets, forward_sequential(model, sets))


def _close_fp32(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _close_bf16(a: torch.Tensor, ref: torch.Tensor) -> None:
    err = (a.float() - ref.float()).abs().max().item()
    assert err <= BF16_REL * ref.abs().max().item(), f"bf16 error {err:.4g} vs scale {ref.abs().max().item():.4g}"


@pytest.mark.parametrize("attention", ["sdpa", "padded"])
@pytest.mark.parametrize("cls_only_last", [True, False])
def test_fp32_packed_equals_one_by_one(case: Case, attention: AttentionImpl, cls_only_last: bool) -> None:
    with torch.inference_mode():
        packed = forward_packed(case.model, case.sets, attention=attention,
                                cls_only_last=cls_only_last)
    assert packed.shape == (len(case.sets), case.model.num_classes)
    _close_fp32(packed, case.one_by_one)


@pytest.mark.parametrize("attention", ["sdpa", "padded"])
@pytest.mark.parametrize("cls_only_last", [True, False])
def test_shape_buckets_change_no_result(case: Case, attention: AttentionImpl, cls_only_last: bool) -> None:
    """Dummy rows up to the bucket size are in no set: same logits as without them (fp32 bound),
    for the whole batch and for single sets (CLS only; all patches)."""
    total = sum(int(t.shape[0]) + 1 for t in case.sets)
    assert bucket_rows(total) > total  # the case exercises dummy rows
    with torch.inference_mode():
        for sets in (case.sets, case.sets[:1], case.sets[2:3]):
            plain = forward_packed(case.model, sets, attention=attention, cls_only_last=cls_only_last)
            _close_fp32(forward_packed(case.model, sets, attention=attention, cls_only_last=cls_only_last,
                                       shape_buckets=True), plain)
        _close_fp32(forward_token_sets(case.model, case.sets, "packed", attention=attention,
                                       cls_only_last=cls_only_last, shape_buckets=True), case.one_by_one)


@given(rows=st.integers(1, 70_000))
def test_bucket_rows_bounds(rows: int) -> None:
    b = bucket_rows(rows)
    assert rows <= b <= rows + max(7, rows // 16)  # at most 1/16 (or 7 rows) more
    assert b % 8 == 0 and bucket_rows(b) == b  # a bucket size is its own bucket
    assert bucket_rows(rows + 1) >= b  # monotone


def test_bucket_rows_are_few() -> None:
    sizes = {bucket_rows(t) for t in range(1, 4097)}
    assert len(sizes) <= 110, len(sizes)  # what oneDNN has to build kernels for, per product shape
    with pytest.raises(ValueError, match="positive"):
        bucket_rows(0)


def test_fp32_padded_reference_equals_one_by_one(case: Case) -> None:
    with torch.inference_mode():
        _close_fp32(forward_padded(case.model, case.sets), case.one_by_one)
        # Padding to a fixed length (the pad-to-197 baseline) changes nothing either.
        _close_fp32(forward_padded(case.model, case.sets, length=int(case.model.patch_embed.num_patches) + 3),
                    case.one_by_one)


def test_fp32_full_image_equals_timm_forward(case: Case) -> None:
    model = case.model
    size = int(model.patch_embed.img_size[0])
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        tokens = embed_all(model, images)
        keep = torch.tensor([[0, 3, 5], [1, 2, 7], [4, 6, 8]])
        subset = gather_tokens(tokens, keep)
        _close_fp32(forward_packed(model, list(tokens)), model(images))
        _close_fp32(forward_packed(model, list(subset)), forward_tokens(model, subset))


def test_bf16_autocast_packed_matches_references(case: Case) -> None:
    """The worker's bf16 mode: fp32 weights under CPU autocast."""
    model, sets, ref = case.model, case.sets, case.one_by_one
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = forward_packed(model, sets)
        padded = forward_padded(model, sets)
        one_by_one = forward_sequential(model, sets)
    for out in (packed, padded, one_by_one):
        _close_bf16(out, ref)
    _close_bf16(packed, padded)
    _close_bf16(packed, one_by_one)


@pytest.mark.skipif(not prepack_available(), reason="this torch cannot prepack oneDNN Linear weights")
@pytest.mark.parametrize("attention", ["sdpa", "padded"])
@pytest.mark.parametrize("cls_only_last", [True, False])
def test_prepacked_weights_match_bf16_stored_weights(case: Case, attention: AttentionImpl, cls_only_last: bool) -> None:
    """The worker's bf16 mode with ``worker.prepack_weights``: every forward path on the prepacked
    copy against the same path on the bf16-stored weights it was packed from, and the fp32 reference."""
    ready = autocast_ready_copy(case.model)
    prepacked = autocast_ready_copy(case.model)
    replaced = prepack_linears(prepacked)
    linears = sum(isinstance(m, torch.nn.Linear) for m in case.model.blocks.modules())
    assert replaced == linears > 0
    assert sum(isinstance(m, PrepackedLinear) for m in prepacked.modules()) == linears
    check_packable(prepacked)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for run in (lambda m: forward_packed(m, case.sets, attention=attention, cls_only_last=cls_only_last),
                    lambda m: forward_padded(m, case.sets), lambda m: forward_sequential(m, case.sets)):
            want, got = run(ready).float(), run(prepacked).float()
            assert got.dtype == want.dtype and got.shape == want.shape
            err = (got - want).abs().max().item()
            assert err <= PREPACK_REL * want.abs().max().item(), f"prepacked error {err:.4g}"
            _close_bf16(got, case.one_by_one)


def test_prepack_refuses_a_model_without_blocks() -> None:
    with pytest.raises(TypeError, match="no transformer blocks"):
        prepack_linears(torch.nn.Linear(4, 4))


def test_bf16_cast_model_packed_matches_references(case: Case) -> None:
    sets, ref = case.sets, case.one_by_one
    bf16 = copy.deepcopy(case.model).to(torch.bfloat16)
    with torch.inference_mode():
        packed = forward_packed(bf16, sets)  # fp32 inputs are cast to the model's dtype
        padded = forward_padded(bf16, sets)
    assert packed.dtype == torch.bfloat16
    _close_bf16(packed, ref)
    _close_bf16(packed, padded)


@pytest.mark.parametrize("policy", ["packed", "padded", "sequential"])
def test_forward_token_sets_dispatches_every_policy(policy: str) -> None:
    model = _tiny_arch()
    sets = _token_sets(model, seed=5)
    with torch.inference_mode():
        out = forward_token_sets(model, sets, policy)  # type: ignore[arg-type]
        _close_fp32(out, forward_sequential(model, sets))
        assert forward_token_sets(model, [], policy).shape == (0, model.num_classes)  # type: ignore[arg-type]


def test_bad_inputs_are_refused() -> None:
    model = _tiny_arch()
    with pytest.raises(ValueError, match="unknown batching policy"):
        forward_token_sets(model, _token_sets(model, 0), "nested")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected"):
        forward_packed(model, [torch.zeros(3, 65)])


@pytest.mark.parametrize(("name", "build"), [
    ("training mode", lambda: _tiny_arch().train()),
    ("avg pooling", lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                              global_pool="avg").eval()),
    ("attention pooling", lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1,
                                                    num_heads=2, global_pool="map").eval()),
    ("register tokens", lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                                  reg_tokens=2).eval()),
    ("post-norm block", lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                                  block_fn=ResPostBlock).eval()),
])
def test_models_it_cannot_reproduce_raise(name: str, build: Callable[[], VisionTransformer]) -> None:
    model = build()
    with pytest.raises(UnsupportedModelError):
        check_packable(model)
    with pytest.raises(UnsupportedModelError):
        forward_packed(model, [torch.zeros(2, int(model.embed_dim))])


# ---- plan_batches ---------------------------------------------------------------------------------

lengths_st = st.lists(st.integers(min_value=0, max_value=400), max_size=80)


def _cost(batch: list[int], lengths: list[int], pad_to_max: bool) -> int:
    if pad_to_max:
        return (max(lengths[i] for i in batch) + 1) * len(batch)
    return sum(lengths[i] + 1 for i in batch)


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, max_batch=st.integers(1, 40), max_tokens=st.integers(1, 3000),
       pad_to_max=st.booleans())
def test_plan_batches_properties(lengths: list[int], max_batch: int, max_tokens: int, pad_to_max: bool) -> None:
    batches = plan_batches(lengths, max_batch, max_tokens, pad_to_max=pad_to_max)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every item exactly once
    assert all(batches)  # no empty batch
    for b in batches:
        assert len(b) <= max_batch
        # The budget holds, except for a lone item that is over budget by itself.
        assert _cost(b, lengths, pad_to_max) <= max_tokens or len(b) == 1
        assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)
    for prev, nxt in itertools.pairwise(batches):
        # Groups are runs of the sorted order, shortest first…
        assert max(lengths[i] for i in prev) <= min(lengths[i] for i in nxt)
        # …and a batch is only closed when the next item would break a cap (greedy, no needless split).
        assert len(prev) == max_batch or _cost([*prev, nxt[0]], lengths, pad_to_max) > max_tokens


def test_plan_batches_examples() -> None:
    assert plan_batches([], 4, 100) == []
    assert plan_batches([5, 1, 3], 2, 1000) == [[1, 2], [0]]
    # Token budget counts CLS: 3 + 1 + 3 + 1 = 8 fits, a third does not.
    assert plan_batches([3, 3, 3], 10, 8) == [[0, 1], [2]]
    # An over-budget item still gets a batch of its own.
    assert plan_batches([500, 2], 10, 100) == [[1], [0]]
    # Padded cost: (longest + 1) × size.
    assert plan_batches([1, 1, 9], 10, 20, pad_to_max=True) == [[0, 1], [2]]
    assert plan_batches([1, 1, 9], 10, 20) == [[0, 1, 2]]


@pytest.mark.parametrize(("args", "match"), [
    (([1, 2], 0, 10), "max_batch"), (([1, 2], 1, 0), "max_batch"), (([-1], 1, 10), "lengths")])
def test_plan_batches_rejects_bad_arguments(args: tuple[list[int], int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_batches(*args)
