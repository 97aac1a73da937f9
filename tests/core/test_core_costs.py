"""Compute and communication cost."""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from shared.costs import communication_cost, model_flops, vit_flops


def test_vit_flops_matches_the_papers_deit_base_formula() -> None:
    for n in (1, 33, 65, 197):
        assert vit_flops(n, 768, 12) == 144 * n * 768**2 + 24 * n**2 * 768
    # One block, D = 2, N = 3, r = 1: (4 + 2)·3·4 + 2·9·2 = 72 + 36 = 108.
    assert vit_flops(3, 2, 1, mlp_ratio=1.0) == 108
    assert vit_flops(0, 768, 12) == 0
    with pytest.raises(ValueError):
        vit_flops(-1, 768, 12)


def test_model_flops_agrees_with_torch_flop_counter() -> None:
    """Count the encoder's matmuls independently (torch counts 2 FLOPs per multiply-add)."""
    model: Any = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=10).eval()
    for blk in model.blocks:
        blk.attn.fused_attn = False  # count the explicit Q·Kᵀ and A·V products
    for n in (197, 50):
        x = torch.randn(1, n, model.embed_dim)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model.blocks(x)
        assert counter.get_total_flops() == 2 * model_flops(model, n)
    # LoadedModel-like wrappers are read through ``.model``.
    wrapper = type("Loaded", (), {"model": model})()
    assert model_flops(wrapper, 197) == vit_flops(197, 192, 2, 4.0)


def test_communication_cost_hand_worked() -> None:
    # 40 of 100 images offloaded, each sending half of its 196 patches: 0.4 × 0.5.
    assert communication_cost(40, 100, 40 * 98, 40 * 196) == pytest.approx(0.2)
    assert communication_cost(100, 100, 100 * 196, 100 * 196) == 1.0
    assert communication_cost(0, 100, 0, 0) == 0.0
    for args in [(1, 0, 1, 1), (5, 4, 1, 1), (-1, 4, 0, 0), (1, 4, 5, 4), (1, 4, 0, 0), (0, 4, 3, 9)]:
        with pytest.raises(ValueError):
            communication_cost(*args)
