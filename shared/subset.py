"""Server forward on a subset of patches (the paper's server side, no image reconstruction).

Each received patch is embedded on its own (the patch-embed conv has stride = kernel = patch
size, so it is a linear map of one patch's pixels), gets *its own* position embedding, and the
CLS token with its position embedding is prepended. With every patch present this is exactly
timm's ``forward``; with a subset it equals "patch-embed the zero-filled image, add pos-embed,
gather the kept tokens".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from shared.errors import ModelError


def _pos_embed(model: VisionTransformer) -> torch.Tensor:
    if model.pos_embed is None or model.cls_token is None:
        raise ModelError("subset forward needs a CLS token and an absolute position embedding")
    return model.pos_embed


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
    tokens = F.linear(patches.reshape(b, k, weight.shape[1]).to(weight.dtype), weight, proj.bias)
    tokens = model.patch_embed.norm(tokens)
    pos = _pos_embed(model)[0, model.num_prefix_tokens:]  # (N, D)
    return tokens + pos[indices]


def embed_all(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """All patch tokens of normalised images (B, 3, H, W) with their pos-embed: (B, N, D)."""
    tokens = model.patch_embed(images)
    return tokens + _pos_embed(model)[:, model.num_prefix_tokens:]


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Keep tokens (B, N, D) at ``indices`` (B, K) → (B, K, D)."""
    return torch.gather(tokens, 1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def prepend_cls(model: VisionTransformer, patch_tokens: torch.Tensor) -> torch.Tensor:
    pos = _pos_embed(model)
    assert model.cls_token is not None  # checked by _pos_embed
    cls = (model.cls_token + pos[:, :1]).to(patch_tokens.dtype)
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


def pad_token_sets(sets: Sequence[torch.Tensor],
                   pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length token sets (K_i, D) into zero-padded (B, K, D) and a (B, K) mask, True = real.

    K is ``pad_to`` when given (must be ≥ every K_i), else max K_i. Sets may be empty (the image is
    then classified from the CLS token alone).
    """
    if len(sets) == 0:
        raise ValueError("pad_token_sets needs at least one set")
    dims = {s.shape[-1] for s in sets}
    if any(s.ndim != 2 for s in sets) or len(dims) != 1:
        raise ValueError(f"token sets must all be (K_i, D) with one D, got {[tuple(s.shape) for s in sets]}")
    lengths = [int(s.shape[0]) for s in sets]
    longest = max(lengths)
    width = longest if pad_to is None else pad_to
    if width < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest set ({longest})")
    first = sets[0]
    tokens = first.new_zeros((len(sets), width, first.shape[-1]))
    mask = torch.zeros((len(sets), width), dtype=torch.bool, device=first.device)
    for i, (s, k) in enumerate(zip(sets, lengths, strict=True)):
        tokens[i, :k] = s
        mask[i, :k] = True
    return tokens, mask


def forward_patch_sets(model: VisionTransformer, patch_sets: Sequence[torch.Tensor],
                       index_sets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Server logits (B, C) for B images, each given as its kept patches (K_i, C, p, p) and their
    grid indices (K_i,): embed every patch in one matrix product, pad to the longest set, mask."""
    if len(patch_sets) != len(index_sets) or len(patch_sets) == 0:
        raise ValueError(f"need as many index sets as patch sets (≥ 1), got {len(patch_sets)} "
                         f"and {len(index_sets)}")
    lengths = [int(p.shape[0]) for p in patch_sets]
    for p, idx in zip(patch_sets, index_sets, strict=True):
        if p.ndim != 4 or idx.ndim != 1 or idx.shape[0] != p.shape[0]:
            raise ValueError(f"patch set {tuple(p.shape)} and index set {tuple(idx.shape)} do not match")
    patches = torch.cat(list(patch_sets), dim=0).unsqueeze(0)  # (1, ΣK, C, p, p)
    indices = torch.cat([idx.to(torch.long) for idx in index_sets], dim=0).unsqueeze(0)
    embedded = embed_patches(model, patches, indices)[0]  # (ΣK, D)
    tokens, mask = pad_token_sets(list(torch.split(embedded, lengths, dim=0)))
    return forward_tokens(model, tokens, key_padding_mask=mask)
