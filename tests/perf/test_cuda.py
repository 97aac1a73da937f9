"""The worker on a CUDA GPU (``worker.device = "cuda"``): the same answers as on the CPU.

These tests run only where torch sees a GPU (CI has none: they skip there, and were run on an
H100 for docs/benchmarks.md). Tolerances, against the fp32 one-at-a-time forward on the CPU:

* fp32 on the GPU: |Δlogit| ≤ 1e-5 + 1e-4·|ref| (the same math; CUDA's kernels sum in another order);
* bf16 on the GPU: max |Δlogit| ≤ 3 % of the largest |reference logit| (as tests/perf/test_packing.py),
  and the one flash-attention call per block (``varlen``) against one SDPA call per set in the same
  bf16 arithmetic: ≤ 1 % of it (only attention's kernel differs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference_worker.engine import PatchSet, ServerEngine
from shared.config import BatchingConfig
from shared.models import LoadedModel, Preprocess, VitArch
from shared.packing import forward_packed, forward_sequential, varlen_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

BF16_REL = 0.03
VARLEN_REL = 0.01


def _loaded(heads: int = 4) -> LoadedModel:
    torch.manual_seed(0)
    model = VitArch(32, 4, 128, 3, heads).build().eval()
    with torch.no_grad():
        head = model.head
        assert isinstance(head, torch.nn.Linear)
        head.weight.mul_(20.0)  # spread the logits so that labels are not near-ties
    pre = Preprocess(input_size=32, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), crop_pct=1.0)
    return LoadedModel(model=model, name="server", preprocess=pre, class_names=[f"c{i}" for i in range(10)])


def _patch_sets(count: int, seed: int) -> list[PatchSet]:
    rng = np.random.default_rng(seed)
    sets = [PatchSet(np.zeros((0, 4, 4, 3), np.uint8), np.zeros(0, np.int64))]  # CLS alone
    for _ in range(count - 1):
        k = int(rng.integers(1, 65))
        idx = np.sort(rng.choice(64, size=k, replace=False)).astype(np.int64)
        sets.append(PatchSet(rng.integers(0, 256, size=(k, 4, 4, 3), dtype=np.uint8), idx))
    return sets


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return _loaded()


@pytest.fixture(scope="module")
def reference(loaded: LoadedModel) -> torch.Tensor:
    """fp32, one request at a time, on the CPU."""
    return ServerEngine(loaded, BatchingConfig(policy="sequential"), "fp32").logits(_patch_sets(40, seed=1))


def _within(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    err = (got - want).abs().max().item()
    assert err <= rel * want.abs().max().item(), f"max |Δlogit| {err:.4g}, scale {want.abs().max().item():.4g}"


@pytest.mark.parametrize("policy", ["packed", "padded", "sequential"])
def test_fp32_on_the_gpu_equals_the_cpu(loaded: LoadedModel, reference: torch.Tensor, policy: str) -> None:
    engine = ServerEngine(loaded, BatchingConfig(policy=policy), "fp32", device="cuda")  # type: ignore[arg-type]
    assert engine.attention == "padded" and not engine.prepacked  # flash attention needs bf16
    assert next(engine.model.parameters()).is_cuda and not next(loaded.model.parameters()).is_cuda
    got = engine.logits(_patch_sets(40, seed=1))
    assert got.device.type == "cpu" and got.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not varlen_available(), reason="this torch has no torch.nn.attention.varlen")
@pytest.mark.parametrize(("cls_only_last", "shape_buckets"), [(True, True), (False, True), (True, False)])
def test_bf16_varlen_matches_per_set_attention_and_the_cpu(loaded: LoadedModel, reference: torch.Tensor,
                                                           cls_only_last: bool, shape_buckets: bool) -> None:
    batching = BatchingConfig(cls_only_last=cls_only_last, shape_buckets=shape_buckets)
    flash = ServerEngine(loaded, batching, "bf16", device="cuda")
    assert flash.attention == "varlen"  # what attention = "auto" means on CUDA
    per_set = ServerEngine(loaded, BatchingConfig(attention="sdpa", cls_only_last=cls_only_last,
                                                  shape_buckets=shape_buckets), "bf16", device="cuda")
    sets = _patch_sets(40, seed=1)
    got = flash.logits(sets)
    _within(got, per_set.logits(sets), VARLEN_REL)
    _within(got, reference, BF16_REL)
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * BF16_REL * reference.abs().max()
    assert clear.sum() >= 10 and torch.equal(got.argmax(-1)[clear], reference.argmax(-1)[clear])


@pytest.mark.skipif(not varlen_available(), reason="this torch has no torch.nn.attention.varlen")
def test_varlen_on_deit_base_shapes() -> None:
    """Head dim 64, 12 heads, up to 197 tokens: DeiT-Base's attention, on packed random tokens."""
    torch.manual_seed(0)
    model = VitArch(224, 16, 768, 2, 12).build().eval().cuda()
    g = torch.Generator().manual_seed(2)
    sets = [0.5 * torch.randn(k, 768, generator=g).cuda() for k in (0, 1, 196, 150, 37, 90)]
    with torch.inference_mode():
        want = forward_sequential(model, sets)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = forward_packed(model, sets, attention="varlen", shape_buckets=True)
    _within(got.float(), want, BF16_REL)


def test_engine_refuses_a_gpu_index_that_does_not_exist(loaded: LoadedModel) -> None:
    from shared.errors import ModelError

    with pytest.raises(ModelError, match="only"):
        ServerEngine(loaded, BatchingConfig(), "bf16", device=f"cuda:{torch.cuda.device_count()}")


def test_the_engine_process_on_cuda_equals_the_engine_in_this_process(loaded: LoadedModel) -> None:
    """worker.engine_process (on by default for CUDA): the same bf16 logits as the engine in this process
    on the same GPU, within 1 % of the largest logit (GPU kernels may sum in another order per run)."""
    from inference_worker.engine_process import EngineProcess

    batching = BatchingConfig(max_batch=64, max_tokens=4096)
    sets = _patch_sets(40, seed=3)
    here = ServerEngine(loaded, batching, "bf16", device="cuda").logits_checked(sets)
    remote = EngineProcess(loaded, batching, "auto", device="cuda", threads=1)
    try:
        assert (remote.precision, remote.device.type) == ("bf16", "cuda")
        _within(remote.logits_checked(sets), here, VARLEN_REL)
    finally:
        remote.close()
