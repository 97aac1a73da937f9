"""Server forward on a subset of patches (the paper's server side, no image reconstruction).

Each received patch is embedded on its own (the patch-embed conv has stride = kernel = patch
size, so it is a linear map of one patch's pixels), gets *its own* position embedding, and the
CLS token with its position embedding is prepended. With every patch present this is exactly
timm's ``forward``; with a subset it equals "patch-embed the zero-filled image, add pos-embed,
gather the kept tokens".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, N, C, p, p), patches in row-major order."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c, p, p)


def embed_patches(model: VisionTransformer, patches: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Embed patches (B, K, C, p, p) at grid positions ``indices`` (B, K): (B, K, D) with pos-embed added."""
    b, k = indices.shape
    proj = model.patch_embed.proj
    weight = proj.weight.reshape(proj.weight.shape[0], -1)  # (D, C*p*p)
    tokens = F.linear(patches.reshape(b, k, -1).to(weight.dtype), weight, proj.bias)
    tokens = model.patch_embed.norm(tokens)
    pos = model.pos_embed[0, model.num_prefix_tokens:]  # (N, D)
    return tokens + pos[indices]


def embed_all(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """All patch tokens of normalised images (B, 3, H, W) with their pos-embed: (B, N, D)."""
    tokens = model.patch_embed(images)
    return tokens + model.pos_embed[:, model.num_prefix_tokens:]


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Keep tokens (B, N, D) at ``indices`` (B, K) → (B, K, D)."""
    return torch.gather(tokens, 1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def prepend_cls(model: VisionTransformer, patch_tokens: torch.Tensor) -> torch.Tensor:
    cls = (model.cls_token + model.pos_embed[:, :1]).to(patch_tokens.dtype)
    return torch.cat([cls.expand(patch_tokens.shape[0], -1, -1), patch_tokens], dim=1)


def forward_tokens(model: VisionTransformer, patch_tokens: torch.Tensor,
                   key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CLS + patch tokens (B, K, D, pos-embed already added) through blocks, norm and head → logits.

    ``key_padding_mask`` (B, K) is True for real tokens; padded tokens are never attended to, so
    they change nothing in the real tokens' outputs (CLS is always real).
    """
    x = prepend_cls(model, patch_tokens)
    x = model.norm_pre(x)
    if key_padding_mask is None:
        x = model.blocks(x)
    else:
        keep = torch.cat([torch.ones_like(key_padding_mask[:, :1]), key_padding_mask], dim=1)
        attn_mask = keep[:, None, None, :]  # (B, 1, 1, T): broadcast over heads and queries
        for blk in model.blocks:
            x = blk(x, attn_mask=attn_mask)
    x = model.norm(x)
    return model.forward_head(x)


def forward_subset(model: VisionTransformer, patches: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Server logits from only the kept patches' pixels (B, K, C, p, p) and their indices (B, K)."""
    return forward_tokens(model, embed_patches(model, patches, indices))
