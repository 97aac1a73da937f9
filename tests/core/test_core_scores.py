"""Attention scores and rollout on hand-made attention maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.attention import EdgeOutput
from shared.errors import ConfigError
from shared.scores import cls_attention_scores, rollout_scores, scores_float64, scores_from_output


def test_cls_attention_scores_hand_worked() -> None:
    # Two heads, CLS keeps 0.4 of its attention in both: patch rows (0.2, 0.3, 0.1) and (0.1, 0.1, 0.4).
    # Mean (0.15, 0.2, 0.25) over mass 0.6 → (1/4, 1/3, 5/12).
    att = torch.tensor([[[0.2, 0.3, 0.1], [0.1, 0.1, 0.4]]])
    got = cls_attention_scores(att)
    assert got.shape == (1, 3) and got.dtype == torch.float32
    assert torch.allclose(got, torch.tensor([[1 / 4, 1 / 3, 5 / 12]]), atol=1e-7)
    assert torch.allclose(cls_attention_scores(att.to(torch.bfloat16)), got, atol=1e-2)


def test_zero_mass_gives_uniform_scores() -> None:
    got = cls_attention_scores(torch.zeros(2, 3, 4))
    assert torch.equal(got, torch.full((2, 4), 0.25))


def _identity_rows(first_row: list[float]) -> torch.Tensor:
    """3×3 attention whose CLS row is ``first_row`` and whose patch rows attend to themselves."""
    a = torch.eye(3)
    a[0] = torch.tensor(first_row)
    return a


# Layer 1 CLS row (0.5, 0.25, 0.25), layer 2 CLS row (0.2, 0.6, 0.2), patches attend to themselves.
A1 = _identity_rows([0.5, 0.25, 0.25])
A2 = _identity_rows([0.2, 0.6, 0.2])


def test_rollout_hand_worked_with_residual() -> None:
    # Â1 row 0 = (0.75, 0.125, 0.125); Â2 row 0 = (0.6, 0.3, 0.1); other rows stay one-hot.
    # R = Â2·Â1, row 0 = 0.6·(0.75, 0.125, 0.125) + 0.3·e1 + 0.1·e2 = (0.45, 0.375, 0.175)
    # → patches (0.375, 0.175) / 0.55 = (15/22, 7/22). (The reversed product would give (7/11, 4/11).)
    maps = [A1[None, None], A2[None, None]]  # (B=1, H=1, T=3, T=3)
    got = rollout_scores(maps)
    assert torch.allclose(got, torch.tensor([[15 / 22, 7 / 22]]), atol=1e-6)


def test_rollout_hand_worked_without_residual() -> None:
    # R = A2·A1, row 0 = 0.2·(0.5, 0.25, 0.25) + 0.6·e1 + 0.2·e2 = (0.1, 0.65, 0.25) → (13/18, 5/18).
    got = rollout_scores([A1[None, None], A2[None, None]], residual=False)
    assert torch.allclose(got, torch.tensor([[13 / 18, 5 / 18]]), atol=1e-6)


def test_rollout_head_fusion_order() -> None:
    # Head 0 sees A1 then A2 (as above); head 1 is the identity in both layers.
    eye = torch.eye(3)
    maps = [torch.stack([A1, eye])[None], torch.stack([A2, eye])[None]]  # (1, 2, 3, 3)
    # Heads averaged first: layer means (A1+I)/2, (A2+I)/2 → residual rows 0 (0.875, 0.0625, 0.0625)
    # and (0.8, 0.15, 0.05) → R row 0 = (0.7, 0.2, 0.1) → (2/3, 1/3).
    assert torch.allclose(rollout_scores(maps), torch.tensor([[2 / 3, 1 / 3]]), atol=1e-6)
    # Per head: head 0 gives patch mass (0.375, 0.175), head 1 gives (0, 0) → mean → (15/22, 7/22).
    assert torch.allclose(rollout_scores(maps, per_head=True), torch.tensor([[15 / 22, 7 / 22]]), atol=1e-6)


def test_rollout_of_one_layer_is_cls_attention_with_residual() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 5, 5, generator=g).softmax(dim=-1)
    # One layer, residual: row 0 of 0.5·Ā + 0.5·I over the patch columns is 0.5·Ā[0, 1:] (rows already
    # sum to 1), so after renormalising it equals the plain CLS attention score.
    assert torch.allclose(rollout_scores([a]), cls_attention_scores(a[:, :, 0, 1:]), atol=1e-6)


def test_rollout_validation() -> None:
    with pytest.raises(ValueError):
        rollout_scores([])
    with pytest.raises(ValueError):
        rollout_scores([torch.rand(1, 2, 3, 4)])
    with pytest.raises(ValueError):
        rollout_scores([torch.rand(1, 2, 3, 3), torch.rand(1, 2, 4, 4)])
    with pytest.raises(ValueError):
        cls_attention_scores(torch.rand(2, 3))


def test_scores_from_output() -> None:
    maps = (A1[None, None], A2[None, None])
    out = EdgeOutput(logits=torch.zeros(1, 5), cls_attention=A2[None, None, 0, 1:], attentions=maps)
    assert torch.allclose(scores_from_output(out, "attention"), torch.tensor([[0.75, 0.25]]), atol=1e-7)
    assert torch.allclose(scores_from_output(out, "rollout"), torch.tensor([[15 / 22, 7 / 22]]), atol=1e-6)
    last_only = EdgeOutput(logits=torch.zeros(1, 5), cls_attention=A2[None, None, 0, 1:])
    with pytest.raises(ConfigError):
        scores_from_output(last_only, "rollout")
    with pytest.raises(ConfigError):
        scores_from_output(out, "gradcam")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        EdgeOutput(logits=torch.zeros(2, 5), cls_attention=torch.zeros(1, 1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_float64_is_scores_from_output_exactly(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    cls = torch.rand(64, 3, 49, generator=gen).softmax(dim=-1).to(dtype)
    cls[1] = 0.0  # no mass: uniform scores
    cls[2] = 0.0
    cls[2, :, 5] = 1e-39  # a subnormal mass (< float32 tiny): the clamped division
    for rows in (cls[:1], cls[3:], cls):  # every row with mass (numpy), then the fallback (torch)
        out = EdgeOutput(logits=torch.zeros(rows.shape[0], 10), cls_attention=rows)
        want = scores_from_output(out, "attention").numpy().astype(np.float64)
        got = scores_float64(out, "attention")
        assert got.dtype == np.float64 and np.array_equal(got, want)
    assert np.array_equal(got[1], np.full(49, 1 / 49, dtype=np.float32).astype(np.float64))
    rollout = EdgeOutput(logits=torch.zeros(1, 5), cls_attention=A2[None, None, 0, 1:],
                         attentions=(A1[None, None], A2[None, None]))
    assert np.array_equal(scores_float64(rollout, "rollout"),
                          scores_from_output(rollout, "rollout").numpy().astype(np.float64))
