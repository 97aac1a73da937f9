"""Edge forward that returns logits together with the attention maps the selection needs.

Attention is read with forward hooks on ``blk.attn.attn_drop``: in timm's unfused attention path
its input (and, in eval mode, its output) is the softmax attention matrix (B, H, T, T). Fused SDPA
never materialises that matrix, so every block we read must have ``attn.fused_attn`` off — build
the edge model with ``shared.models.build_model(..., role="edge")`` or call
``shared.models.set_fused_attention(model, False)``.

Policy when a needed block still has fused attention on: :func:`edge_forward` raises
:class:`~shared.errors.ModelError` instead of switching it off for the call. Flipping a flag on a
model that another thread may be running is a hidden, racy side effect; a loud error at the first
request is cheaper to debug.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from shared.errors import ModelError


@dataclass(frozen=True)
class EdgeOutput:
    """What the edge model produces for one batch.

    * ``logits`` (B, C): exactly what ``model(images)`` returns (same dtype).
    * ``cls_attention`` (B, H, N): last block's CLS-query attention row per head over the N patch
      columns (raw softmax values, CLS column dropped, so a row sums to ``1 - A[0, 0]``), float32.
    * ``attentions``: when asked for, every block's full attention (B, H, T, T), T = N + 1, float32,
      first block first; otherwise ``None``.
    """

    logits: torch.Tensor
    cls_attention: torch.Tensor
    attentions: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self) -> None:
        if self.logits.ndim != 2 or self.cls_attention.ndim != 3:
            raise ValueError(f"EdgeOutput shapes: logits {tuple(self.logits.shape)} must be (B, C), "
                             f"cls_attention {tuple(self.cls_attention.shape)} must be (B, H, N)")
        if self.logits.shape[0] != self.cls_attention.shape[0]:
            raise ValueError("logits and cls_attention disagree on the batch size")

    @property
    def num_patches(self) -> int:
        return int(self.cls_attention.shape[-1])

    def rows(self, index: Sequence[int]) -> EdgeOutput:
        """The same output for the images at batch positions ``index`` (in that order); ``self`` when
        that is every image in order. Every tensor keeps its dtype and device."""
        if list(index) == list(range(self.logits.shape[0])):
            return self
        at = torch.as_tensor(list(index), dtype=torch.long, device=self.logits.device)
        return EdgeOutput(self.logits.index_select(0, at), self.cls_attention.index_select(0, at),
                          None if self.attentions is None else tuple(a.index_select(0, at) for a in self.attentions))


def _check_blocks(model: VisionTransformer, indices: list[int]) -> None:
    blocks: list[Any] = list(model.blocks)
    for i in indices:
        attn = blocks[i].attn
        if not hasattr(attn, "attn_drop") or not hasattr(attn, "fused_attn"):
            raise ModelError(f"block {i}: attention module {type(attn).__name__} is not timm's Attention; "
                             "its attention maps cannot be read")
        if attn.fused_attn:
            raise ModelError(
                f"block {i} uses fused attention, which never materialises the attention map; build the "
                "edge model with build_model(..., role='edge') or call set_fused_attention(model, False)")


def edge_forward(model: VisionTransformer, images: torch.Tensor, *, all_layers: bool = False) -> EdgeOutput:
    """Run ``model`` on normalised ``images`` (B, 3, H, W) and capture attention.

    With ``all_layers=False`` only the last block needs fused attention off; with ``True`` every
    block does. Works under ``torch.inference_mode`` and bf16 autocast (maps are returned as
    float32). Safe to call concurrently on one model from several threads: each call's hooks only
    record forwards run by the calling thread.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    depth = len(model.blocks)
    wanted = list(range(depth)) if all_layers else [depth - 1]
    _check_blocks(model, wanted)

    caller = threading.get_ident()
    captured: dict[int, torch.Tensor] = {}

    def make_hook(i: int) -> Any:
        def hook(_module: torch.nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if threading.get_ident() == caller:  # another thread's forward on the same model
                captured[i] = output.detach().float()
        return hook

    blocks: list[Any] = list(model.blocks)
    handles = [blocks[i].attn.attn_drop.register_forward_hook(make_hook(i)) for i in wanted]
    try:
        logits = model(images)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in wanted if i not in captured]
    if missing:
        raise ModelError(f"no attention map captured for blocks {missing}: the model does not run "
                         "blk.attn.attn_drop on the attention matrix")
    last = captured[depth - 1]
    cls_attention = last[:, :, 0, model.num_prefix_tokens:]
    attentions = tuple(captured[i] for i in wanted) if all_layers else None
    return EdgeOutput(logits=logits, cls_attention=cls_attention, attentions=attentions)
