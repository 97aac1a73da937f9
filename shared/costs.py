"""The paper's cost metrics: ViT compute and communication cost.

Compute. Per transformer block on N tokens of width D with MLP ratio r, counting multiply-accumulates
(MACs) of the matrix products only:

* QKV projection N·D·3D, output projection N·D·D, MLP N·D·rD + N·rD·D → (4 + 2r)·N·D²
* attention scores Q·Kᵀ N·N·D, weighted sum A·V N·N·D → 2·N²·D

so a depth-L encoder costs L·((4 + 2r)·N·D² + 2·N²·D). For DeiT-Base (L = 12, r = 4) this is the
paper's 144·N·D² + 24·N²·D exactly: the paper's "FLOPs" are MACs (multiply by 2 for floating-point
operations) and leave out patch embedding, LayerNorm, softmax, GELU and the head (all O(N·D) or
independent of N). N is the sequence length *including* the CLS token (197 for a full 224² image).
"""

from __future__ import annotations

from typing import Any


def vit_flops(num_tokens: int, embed_dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Encoder MACs on ``num_tokens`` tokens (the paper's FLOPs convention; see module docstring)."""
    if num_tokens < 0 or embed_dim <= 0 or depth <= 0 or mlp_ratio <= 0:
        raise ValueError("num_tokens must be ≥ 0 and embed_dim, depth, mlp_ratio positive")
    n, d = float(num_tokens), float(embed_dim)
    return depth * ((4.0 + 2.0 * mlp_ratio) * n * d * d + 2.0 * n * n * d)


def model_flops(loaded_model: Any, num_tokens: int) -> float:
    """:func:`vit_flops` for a ``LoadedModel`` or a timm ``VisionTransformer`` (shape read off the model)."""
    model = getattr(loaded_model, "model", loaded_model)
    blocks = model.blocks
    embed_dim = int(model.embed_dim)
    mlp_ratio = float(blocks[0].mlp.fc1.out_features) / embed_dim
    return vit_flops(num_tokens, embed_dim, len(blocks), mlp_ratio)


def communication_cost(images_sent: int, images_total: int, patches_sent: int, patches_total: int) -> float:
    """The paper's communication cost: (images sent ÷ all images) × (patches sent ÷ patches_total).

    ``patches_total`` counts the patches of the *sent* images only (images_sent × N for a fixed
    grid), so the second factor is the mean kept fraction per offloaded image and the product is
    the fraction of all patches of all images that crossed the link (1.0 = every full image sent).
    No image sent costs 0.
    """
    if images_total <= 0:
        raise ValueError(f"images_total must be positive, got {images_total}")
    if not 0 <= images_sent <= images_total:
        raise ValueError(f"images_sent must be in [0, {images_total}], got {images_sent}")
    if not 0 <= patches_sent <= patches_total:
        raise ValueError(f"patches_sent must be in [0, patches_total={patches_total}], got {patches_sent}")
    if images_sent == 0:
        if patches_sent:
            raise ValueError("patches_sent must be 0 when no image was sent")
        return 0.0
    if patches_total == 0:
        raise ValueError("patches_total must be positive when images were sent")
    return (images_sent / images_total) * (patches_sent / patches_total)
