"""Patch importance scores from the edge model's attention.

* ``attention`` (the paper's mean attention score): a_i = (1/H) Σ_h A^h_{0,i} over the last
  block's CLS row, renormalised so that Σ_i a_i = 1 over the N patches.
* ``rollout`` (Abnar & Zuidema 2020): per block, heads averaged, Â_l = 0.5·A_l + 0.5·I (rows
  renormalised), R = Â_L ··· Â_1; scores = R[0, patches] renormalised.

A row whose patch mass is zero gets uniform scores (the official code turns 0/0 into all-zero
scores instead, which no selection rule can use).

All math is float32 whatever the input dtype. Outputs are (B, N) and sum to 1 per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from shared.attention import EdgeOutput
from shared.errors import ConfigError

_TINY32 = np.float32(np.finfo(np.float32).tiny)

ScoreKind = Literal["attention", "rollout"]
SCORE_KINDS: tuple[ScoreKind, ...] = ("attention", "rollout")


def _renormalise(x: torch.Tensor) -> torch.Tensor:
    # A row with zero mass cannot be normalised; give it uniform scores rather than NaN.
    total = x.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(x, 1.0 / x.shape[-1])
    return torch.where(total > 0, x / total.clamp_min(torch.finfo(x.dtype).tiny), uniform)


def cls_attention_scores(cls_attention: torch.Tensor) -> torch.Tensor:
    """(B, H, N) CLS→patch attention per head → (B, N) mean over heads, renormalised to sum 1."""
    if cls_attention.ndim != 3:
        raise ValueError(f"cls_attention must be (B, H, N), got shape {tuple(cls_attention.shape)}")
    return _renormalise(cls_attention.float().mean(dim=1))


def rollout_scores(attentions: Sequence[torch.Tensor], *, residual: bool = True, per_head: bool = False,
                   num_prefix_tokens: int = 1) -> torch.Tensor:
    """Attention rollout over blocks (first block first), each (B, H, T, T) → (B, N), N = T - prefix.

    ``residual=True`` adds the skip connection as 0.5·A + 0.5·I before renormalising rows, as in
    Abnar & Zuidema; ``False`` multiplies the raw maps. Heads are averaged in every block before the
    product (Abnar & Zuidema); ``per_head=True`` instead rolls out each head on its own and averages
    the heads' CLS rows at the end, as the paper's official code does.
    """
    if len(attentions) == 0:
        raise ValueError("rollout needs at least one attention map")
    first = attentions[0]
    if first.ndim != 4 or first.shape[-1] != first.shape[-2]:
        raise ValueError(f"attention maps must be (B, H, T, T), got shape {tuple(first.shape)}")
    t = first.shape[-1]
    eye = torch.eye(t, dtype=torch.float32, device=first.device)
    rollout: torch.Tensor | None = None
    for a in attentions:
        if a.shape != first.shape:
            raise ValueError(f"attention maps disagree on shape: {tuple(a.shape)} vs {tuple(first.shape)}")
        layer = a.float() if per_head else a.float().mean(dim=1)  # (B, H, T, T) or (B, T, T)
        if residual:
            layer = 0.5 * layer + 0.5 * eye
            layer = layer / layer.sum(dim=-1, keepdim=True)
        # Later blocks act on the output of earlier ones: R_l = Â_l · R_{l-1}.
        rollout = layer if rollout is None else layer @ rollout
    assert rollout is not None
    cls_row = rollout[..., 0, num_prefix_tokens:]
    if per_head:
        cls_row = cls_row.mean(dim=1)
    return _renormalise(cls_row)


def scores_float64(out: EdgeOutput, kind: ScoreKind) -> np.ndarray:
    """:func:`scores_from_output` as a float64 array (B, N), as selection takes them.

    For ``attention`` on the CPU the renormalisation runs in numpy when every row has mass (≥ the
    smallest normal float32, where :func:`_renormalise` divides by the total as it is): the same float32
    mean and sum from torch, the same correctly rounded float32 division, without torch's per-op overhead
    on a (B, N) tensor. Any other case is :func:`scores_from_output`'s result converted.
    """
    if kind == "attention" and out.cls_attention.device.type == "cpu":
        mean = out.cls_attention.float().mean(dim=1)
        x, total = mean.numpy(), mean.sum(dim=-1, keepdim=True).numpy()
        if bool((total >= _TINY32).all()):
            return (x / total).astype(np.float64)
    return scores_from_output(out, kind).cpu().numpy().astype(np.float64)


def scores_from_output(out: EdgeOutput, kind: ScoreKind) -> torch.Tensor:
    """Scores (B, N) of kind ``attention`` (last block CLS row) or ``rollout`` (needs all maps)."""
    if kind == "attention":
        return cls_attention_scores(out.cls_attention)
    if kind == "rollout":
        if out.attentions is None:
            raise ConfigError("rollout scores need every block's attention: call "
                              "edge_forward(..., all_layers=True)")
        num_prefix = out.attentions[0].shape[-1] - out.num_patches
        return rollout_scores(out.attentions, num_prefix_tokens=num_prefix)
    raise ConfigError(f"unknown score kind {kind!r}; expected one of {SCORE_KINDS}")
