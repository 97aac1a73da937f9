"""Batched worker results equal one-by-one results.

Tolerance: fp32, |Δlogit| ≤ 1e-4 (batching only reorders float additions) and identical labels;
bf16 autocast (where the CPU has native bf16): |Δlogit| ≤ 0.1 on these O(10) logits and the same
label wherever the fp32 top-2 gap exceeds that bound.
"""

from __future__ import annotations

import pytest
import torch
from service_helpers import SERVER_ARCH, patch_sets, random_model

from inference_worker.engine import ServerEngine
from shared.config import BatchingConfig
from shared.packing import Policy
from shared.precision import cpu_has_native_bf16, resolve
from shared.prepack import PrepackedLinear, prepack_available
from shared.subset import forward_patch_sets

FP32_ATOL = 1e-4
BF16_ATOL = 0.1


@pytest.fixture(scope="module")
def server():
    return random_model(SERVER_ARCH, 2, "server")


@pytest.mark.parametrize(("policy", "attention", "cls_only_last", "shape_buckets"),
                         [("packed", "sdpa", True, True), ("packed", "padded", False, True),
                          ("packed", "padded", True, True), ("packed", "sdpa", False, True),
                          ("packed", "sdpa", True, False), ("padded", "sdpa", True, True)])
def test_batched_equals_one_by_one_fp32(server, policy: str, attention: str,
                                        cls_only_last: bool, shape_buckets: bool) -> None:
    sets = patch_sets(24)
    batching = BatchingConfig(max_batch=32, max_tokens=4096, policy=policy, attention=attention,  # type: ignore[arg-type]
                              cls_only_last=cls_only_last, shape_buckets=shape_buckets)
    batched = ServerEngine(server, batching, "fp32")
    single = ServerEngine(server, BatchingConfig(policy="sequential"), "fp32")
    together = batched.logits(sets)
    alone = torch.cat([single.logits([s]) for s in sets])
    assert together.shape == (24, 10)
    torch.testing.assert_close(together, alone, atol=FP32_ATOL, rtol=0)
    assert torch.equal(together.argmax(-1), alone.argmax(-1))


def test_padded_groups_respect_the_token_budget_and_keep_order(server) -> None:
    sets = patch_sets(12, seed=3)
    small_budget = ServerEngine(server, BatchingConfig(max_batch=4, max_tokens=200, policy="padded"), "fp32")
    reference = ServerEngine(server, BatchingConfig(policy="sequential"), "fp32")
    torch.testing.assert_close(small_budget.logits(sets), reference.logits(sets), atol=FP32_ATOL, rtol=0)


def test_engine_matches_the_reference_subset_forward(server) -> None:
    sets = patch_sets(8, seed=5)
    engine = ServerEngine(server, BatchingConfig(policy="packed"), "fp32")
    from shared.datasets import normalize

    patches = [normalize(torch.from_numpy(s.patches), server.preprocess) for s in sets]
    with torch.inference_mode():
        ref = forward_patch_sets(server.model, patches, [torch.from_numpy(s.indices) for s in sets])
    torch.testing.assert_close(engine.logits(sets), ref, atol=FP32_ATOL, rtol=0)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="bf16 is emulated on this CPU")
def test_batched_bf16_stays_close_to_fp32(server) -> None:
    sets = patch_sets(16, seed=7)
    fp32 = ServerEngine(server, BatchingConfig(policy="sequential"), "fp32").logits(sets)
    bf16 = ServerEngine(server, BatchingConfig(policy="packed"), "bf16").logits(sets)
    assert (bf16 - fp32).abs().max().item() <= BF16_ATOL
    top2 = fp32.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * BF16_ATOL
    assert torch.equal(bf16.argmax(-1)[clear], fp32.argmax(-1)[clear])


def test_bf16_engine_equals_autocast_over_the_fp32_model(server) -> None:
    """The engine stores matrix weights in bf16 once; that must be exactly what autocast computes
    from the fp32 weights (same rounding, done once instead of per call), and leave the model alone."""
    sets = patch_sets(10, seed=11)
    engine = ServerEngine(server, BatchingConfig(policy="packed"), "bf16")
    assert not engine.prepacked  # prepacking is asked for explicitly (the worker's config does)
    assert engine.model is not server.model and server.model.head.weight.dtype == torch.float32
    assert engine.model.head.weight.dtype == torch.bfloat16 and engine.model.norm.weight.dtype == torch.float32
    fp32_weights = ServerEngine(server, BatchingConfig(policy="packed"), "fp32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = fp32_weights.logits(sets)  # autocast over the fp32 model, casting weights per call
    assert torch.equal(engine.logits(sets), reference)


@pytest.mark.skipif(not prepack_available(), reason="this torch cannot prepack oneDNN Linear weights")
@pytest.mark.parametrize("policy", ["packed", "padded", "sequential"])
def test_prepacked_bf16_engine_matches_the_bf16_engine(server, policy: Policy) -> None:
    """``worker.prepack_weights``: the same bf16 products in oneDNN's blocked layout (tolerance as
    tests/perf/test_packing.py: 0.5 % of the largest logit), fp32 and the loaded model untouched."""
    sets = patch_sets(12, seed=5)
    plain = ServerEngine(server, BatchingConfig(policy=policy), "bf16")
    packed = ServerEngine(server, BatchingConfig(policy=policy), "bf16", prepack=True)
    assert packed.prepacked and any(isinstance(m, PrepackedLinear) for m in packed.model.modules())
    assert not any(isinstance(m, PrepackedLinear) for m in server.model.modules())
    assert not ServerEngine(server, BatchingConfig(policy=policy), "fp32", prepack=True).prepacked
    want, got = plain.logits(sets), packed.logits(sets)
    bound = 0.005 * want.abs().max().item()
    assert (got - want).abs().max().item() <= bound
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * bound
    assert clear.any() and torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_prepack_falls_back_where_torch_lacks_onednn(server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without oneDNN (another torch build or CPU) the bf16 engine keeps plain bf16 weights and still serves."""
    prepack_available.cache_clear()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    try:
        assert not prepack_available()
        engine = ServerEngine(server, BatchingConfig(policy="packed"), "bf16", prepack=True)
        assert not engine.prepacked
        assert not any(isinstance(m, PrepackedLinear) for m in engine.model.modules())
        sets = patch_sets(4, seed=9)
        assert engine.logits(sets).shape == (4, 10)
    finally:
        prepack_available.cache_clear()  # later tests see the real answer again


def test_device_and_attention_resolve_per_device() -> None:
    """``worker.device`` / ``batching.attention = auto``: the CPU keeps per-set SDPA and its probe;
    CUDA means bf16 and one flash-attention call per block where torch has it."""
    from inference_worker.engine import resolve_attention, resolve_device
    from shared.errors import ModelError
    from shared.packing import varlen_available

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_device("cpu") == cpu
    assert resolve_attention("auto", cpu, "bf16") == "sdpa"
    assert resolve_attention("padded", cpu, "fp32") == "padded"
    assert resolve_attention("auto", cuda, "fp32") == "padded"  # flash attention has no fp32 kernel
    assert resolve_attention("auto", cuda, "bf16") == ("varlen" if varlen_available() else "sdpa")
    assert resolve("auto", "cuda:0") == "bf16" and resolve("fp32", "cuda") == "fp32"
    with pytest.raises(ModelError, match="needs a CUDA device"):
        resolve_attention("varlen", cpu, "bf16")
    with pytest.raises(ModelError, match="cpu or cuda"):
        resolve_device("mps")
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_a_cuda_worker_without_a_gpu_is_refused_at_start_up(server) -> None:
    from shared.errors import ModelError

    with pytest.raises(ModelError, match="sees no CUDA GPU"):
        ServerEngine(server, BatchingConfig(), "bf16", device="cuda")


def test_worker_device_is_validated_in_config() -> None:
    from shared.config import WorkerConfig
    from shared.errors import ConfigError

    assert WorkerConfig(device="cuda:1").device == "cuda:1"
    for bad in ("gpu", "cuda:", "cuda:x", "CPU"):
        with pytest.raises(ConfigError, match=r"worker\.device"):
            WorkerConfig(device=bad)
