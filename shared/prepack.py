"""bf16 Linear weights kept in oneDNN's blocked layout, so no forward re-lays them out.

A bf16 ``F.linear`` on CPU goes to oneDNN, which reorders the (out, in) weight into the blocked
layout its AMX / AVX512-BF16 kernels read, **at every call**: a larger share of a small product
than of a large one (on an AMX Xeon a 148-row 768 → 3072 product ran 1.2–1.7× faster with the
weight reordered once, a 4,736-row one 1.2×; DeiT-Base one image at a time 1.28×, packed batches
1.06×; ``docs/benchmarks.md``). :func:`prepack_linears` does the reorder once, when a worker loads its
model, with the same private oneDNN ops PyTorch's own compiler (inductor, ``freezing``) emits:
``mkldnn._reorder_linear_weight`` and ``mkldnn._linear_pointwise`` (bias fused, so also no bias
copy per call).

Numerics: the same bf16 products as autocast over bf16-stored weights; the worker's results are
compared with the unbatched reference in ``tests/perf/test_packing.py`` (bit-identical there).
The ops are private and need a torch built with oneDNN: :func:`prepack_available` checks them on
a tiny product first, and a worker falls back to plain bf16 weights where they are missing.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

__all__ = ["PrepackedLinear", "prepack_available", "prepack_linears"]


class PrepackedLinear(nn.Module):
    """Inference-only bf16 ``Linear`` over a oneDNN-blocked weight; output bf16, like autocast's.

    The blocked weight is an opaque tensor: kept as a plain attribute, not a parameter or buffer,
    so it is not in ``state_dict`` and cannot be deep-copied (copy the model before prepacking).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().to(torch.bfloat16)
        self.in_features = int(linear.in_features)
        self.out_features = int(linear.out_features)
        self.packed_weight: Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        bias = linear.bias
        self.bias: Tensor | None = None if bias is None else bias.detach().to(torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed_weight, self.bias,
                                                  "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@functools.cache
def prepack_available() -> bool:
    """Whether this torch can prepack: oneDNN present and a small prepacked product matches F.linear."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        lin = nn.Linear(64, 48)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(48, 64, generator=gen))
        x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
        with torch.inference_mode():
            got = PrepackedLinear(lin)(x).float()
            want = nn.functional.linear(x, lin.weight.to(torch.bfloat16), lin.bias.to(torch.bfloat16)).float()
        return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))
    except (RuntimeError, AttributeError, NotImplementedError):  # op missing or unsupported on this CPU
        return False


def prepack_linears(model: nn.Module) -> int:
    """Replace, in place, every ``nn.Linear`` inside ``model.blocks`` with a :class:`PrepackedLinear`.

    Only the transformer blocks (where the products are): the patch embedding and the head stay as
    they are. Returns how many layers were replaced. Call it on a copy meant for bf16 inference
    (under ``torch.autocast("cpu", dtype=torch.bfloat16)``) and only where :func:`prepack_available`.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module):
        raise TypeError(f"{type(model).__name__} has no transformer blocks to prepack")
    targets = [(parent, name, child) for parent in blocks.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name, child in targets:
        setattr(parent, name, PrepackedLinear(child))
    return len(targets)
