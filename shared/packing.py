"""Batched server forward for variable-length token sets (CLS + each request's received patches).

Why packing: every request carries a different number of patch tokens. Padding a batch to its
longest set (or to 197) spends matrix-multiply time on tokens that do not exist, and on this CPU
the matrix multiplies are almost all of the work (QKV, projection and MLP: ≈ 97 % of DeiT-Base's
MACs at ~150 tokens). Everything in a ViT block except attention is *token-wise* (LayerNorm,
Linear, GELU, LayerScale), so we concatenate all real tokens of the batch into one (T, D) matrix
and run those layers once with no padding at all; only attention needs the set boundaries, and
we run it per set on views of the packed QKV.

Two more exact savings:

* the last block only has to produce the CLS rows (the head reads nothing else), so its query,
  output projection and MLP run on B rows instead of T (keys and values still use every token);
* ``plan_batches`` groups requests of similar length so that the ``padded`` fallback wastes little
  and the token budget bounds a batch's latency.

The result equals the padded-and-masked forward (:func:`shared.subset.forward_tokens` with a
key-padding mask) and the one-request-at-a-time forward up to floating-point reassociation:
``tests/perf`` checks ≤ 1e-4 (fp32) and a bf16 bound stated there.

Only blocks whose math we reproduce exactly are accepted (timm ``Block`` + ``Attention`` with
token-wise norms/MLP, CLS pooling); anything else raises :class:`UnsupportedModelError` instead of
silently computing something different.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Sequence
from typing import Literal, NoReturn, cast

import torch
import torch.nn.functional as F
from timm.layers import Attention, GluMlp, LayerScale, Mlp, RmsNorm, SwiGLU
from timm.layers.drop import DropPath
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from shared.errors import ModelError
from shared.prepack import PrepackedLinear
from shared.subset import forward_tokens

Policy = Literal["packed", "padded", "sequential"]
AttentionImpl = Literal["sdpa", "padded", "varlen"]

POLICIES: tuple[Policy, ...] = ("packed", "padded", "sequential")

# Modules that act on each token (last dimension) independently: safe to run on the packed (T, D)
# matrix. A norm or MLP outside this list could mix tokens (e.g. a conv MLP) and is refused.
_TOKENWISE_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm, RmsNorm, nn.Identity)
_TOKENWISE_MLPS: tuple[type[nn.Module], ...] = (Mlp, GluMlp, SwiGLU)
_SCALES: tuple[type[nn.Module], ...] = (LayerScale, nn.Identity)
_LINEARS: tuple[type[nn.Module], ...] = (nn.Linear, PrepackedLinear)  # see shared.prepack


class UnsupportedModelError(ModelError):
    """The model has a layer whose math the packed forward does not reproduce."""


def check_packable(model: VisionTransformer) -> None:
    """Raise :class:`UnsupportedModelError` unless :func:`forward_packed` reproduces ``model`` exactly."""
    _packable_blocks(model)


def _packable_blocks(model: VisionTransformer) -> list[Block]:
    """The model's blocks, after checking every layer the packed forward has to reproduce."""

    def fail(what: str) -> NoReturn:
        raise UnsupportedModelError(f"packed forward cannot reproduce this model: {what}")

    if not isinstance(model, VisionTransformer):
        fail(f"expected a timm VisionTransformer, got {type(model).__name__}")
    if model.training:
        # Dropout / drop-path / patch-dropout are random in training mode; packing is for inference.
        fail("model is in training mode (call .eval())")
    if model.cls_token is None or model.reg_token is not None or model.no_embed_class:
        fail("needs a CLS token with its own pos-embed and no register tokens")
    if model.attn_pool is not None or model.global_pool != "token":
        fail(f"needs CLS-token pooling, got global_pool={model.global_pool!r}"
             f"{' with attention pooling' if model.attn_pool is not None else ''}")
    if not isinstance(model.norm_pre, _TOKENWISE_NORMS) or not isinstance(model.norm, _TOKENWISE_NORMS):
        fail("norm_pre / norm must be token-wise (LayerNorm, RMSNorm or Identity)")
    blocks: list[Block] = []
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            fail(f"block {i} is {type(blk).__name__}, only timm's pre-norm Block is supported")
        attn = blk.attn
        if type(attn) is not Attention:
            fail(f"block {i} attention is {type(attn).__name__}, only timm's Attention is supported")
        if type(attn.qkv) not in _LINEARS or type(attn.proj) not in _LINEARS:
            fail(f"block {i}: qkv/proj must be nn.Linear (or prepacked)")
        for name in ("norm1", "norm2"):
            if not isinstance(getattr(blk, name), _TOKENWISE_NORMS):
                fail(f"block {i}.{name} is {type(getattr(blk, name)).__name__}, not a token-wise norm")
        for name in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(attn, name), _TOKENWISE_NORMS):
                fail(f"block {i}.attn.{name} is not a token-wise norm")
        for name in ("ls1", "ls2"):
            if not isinstance(getattr(blk, name), _SCALES):
                fail(f"block {i}.{name} is {type(getattr(blk, name)).__name__}")
        for name in ("drop_path1", "drop_path2"):
            if not isinstance(getattr(blk, name), DropPath | nn.Identity):
                fail(f"block {i}.{name} is {type(getattr(blk, name)).__name__}")
        if not isinstance(blk.mlp, _TOKENWISE_MLPS) or any(isinstance(m, nn.Conv2d) for m in blk.mlp.modules()):
            fail(f"block {i} MLP {type(blk.mlp).__name__} is not a token-wise Linear MLP")
        blocks.append(blk)
    return blocks


def _cls_token(model: VisionTransformer) -> Tensor:
    if model.cls_token is None or model.pos_embed is None:
        raise UnsupportedModelError("needs a CLS token and an absolute position embedding")
    return model.cls_token


def _model_dtype(model: VisionTransformer) -> torch.dtype:
    return _cls_token(model).dtype


def autocast_ready_copy(model: VisionTransformer) -> VisionTransformer:
    """A copy whose Linear and Conv2d weights and biases are stored in bf16, everything else fp32.

    Under CPU bf16 autocast it computes exactly what ``model`` computes (autocast would round the
    same fp32 weights to bf16 at every call; here that happens once), while norms, softmax and the
    embeddings stay float32. Autocast caches no casts under ``inference_mode``, so without this every
    forward re-casts all matrix weights: ~0.5 GB of memory traffic per DeiT-Base forward.
    """
    ready = copy.deepcopy(model)
    for module in ready.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.to(torch.bfloat16)
    return ready


def _empty_logits(model: VisionTransformer) -> Tensor:
    width = int(model.num_classes) or int(model.embed_dim)  # num_classes 0: the head is Identity
    return _cls_token(model).new_zeros(0, width)


def _pack(model: VisionTransformer, token_sets: Sequence[Tensor]) -> tuple[Tensor, list[int]]:
    """[CLS, set 0, CLS, set 1, …] as one (T, D) tensor, and each segment's length (CLS included)."""
    dtype = _model_dtype(model)
    d = int(model.embed_dim)
    pos = model.pos_embed
    assert pos is not None  # checked by _cls_token
    cls = (_cls_token(model) + pos[:, :1]).reshape(1, d).to(dtype)
    parts: list[Tensor] = []
    lengths: list[int] = []
    for i, t in enumerate(token_sets):
        if t.dim() != 2 or t.shape[1] != d:
            raise ValueError(f"token set {i} has shape {tuple(t.shape)}, expected (K, {d})")
        parts.append(cls)
        parts.append(t.to(dtype))
        lengths.append(int(t.shape[0]) + 1)
    return torch.cat(parts, dim=0), lengths


def _attend_sdpa(q: Tensor, k: Tensor, v: Tensor, q_lengths: list[int], kv_lengths: list[int],
                 scale: float, spare: int = 0) -> Tensor:
    """Attention per set with SDPA. q (H, Tq, hd), k/v (H, Tkv, hd) → (Tq + spare, H*hd).

    Each set's q/k/v are strided views of the packed projection (no copy). SDPA's CPU kernel
    returns (H, L, hd) as a transposed view of an (L, H, hd) buffer, so the per-set transpose
    back to token-major is free and one ``cat`` assembles the packed output (with ``spare`` zero
    rows for the bucket's dummy rows, which attend to nothing).
    """
    h, _, hd = q.shape
    outs = [
        F.scaled_dot_product_attention(qi, ki, vi, scale=scale).transpose(0, 1).reshape(-1, h * hd)
        for qi, ki, vi in zip(q.split(q_lengths, dim=1), k.split(kv_lengths, dim=1),
                              v.split(kv_lengths, dim=1), strict=True)
    ]
    if spare:
        outs.append(q.new_zeros(spare, h * hd))
    return torch.cat(outs, dim=0)


def varlen_available() -> bool:
    """Whether this torch has ``torch.nn.attention.varlen.varlen_attn`` (flash attention over
    packed variable-length sequences; it runs on CUDA only, in bf16/fp16)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _index_tensor(values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small index tensor on ``device``. To a GPU it goes from page-locked memory without
    blocking: a plain copy would make the host wait until the GPU has run everything queued, and
    the host could not queue the next kernels meanwhile."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


@functools.lru_cache(maxsize=8)
def _offsets_cached(lengths: tuple[int, ...], device: torch.device) -> Tensor:
    return _index_tensor(list(itertools.accumulate(lengths, initial=0)), torch.int32, device)


def _offsets(lengths: list[int], device: torch.device) -> Tensor:
    """Cumulative start offsets [0, l0, l0+l1, …] as int32: flash attention's ``cu_seqlens``.

    Cached because every block of a batch needs the same ones, and each host → GPU copy of a
    fresh tensor waits for the GPU to finish what is queued before it.
    """
    return _offsets_cached(tuple(lengths), device)


def _attend_varlen(q: Tensor, k: Tensor, v: Tensor, q_lengths: list[int], kv_lengths: list[int],
                   scale: float, spare: int = 0) -> Tensor:
    """Attention for every set in one flash-attention call over the packed rows (CUDA, bf16/fp16).

    q (H, Tq, hd), k/v (H, Tkv, hd) → (Tq + spare, H*hd), as :func:`_attend_sdpa` returns. The
    kernel takes token-major (T, H, hd) rows and each set's start offset, so no set is padded and
    a batch costs one launch per block instead of one per set (what a GPU needs).
    """
    from torch.nn.attention.varlen import varlen_attn

    h, _, hd = q.shape
    o = varlen_attn(q.transpose(0, 1).contiguous(), k.transpose(0, 1).contiguous(),
                    v.transpose(0, 1).contiguous(), _offsets(q_lengths, q.device), _offsets(kv_lengths, q.device),
                    max(q_lengths), max(kv_lengths), scale=scale)
    o = cast(Tensor, o).reshape(-1, h * hd)
    return torch.cat([o, o.new_zeros(spare, h * hd)]) if spare else o


def _attend_padded(q: Tensor, k: Tensor, v: Tensor, lengths: list[int], scale: float) -> Tensor:
    """Attention in one masked SDPA call over sets scattered into a padded (B, H, Lmax, hd) batch."""
    h, t, hd = q.shape
    b, lmax = len(lengths), max(lengths)
    lens = torch.tensor(lengths, device=q.device)
    valid = torch.arange(lmax, device=q.device)[None, :] < lens[:, None]  # (B, Lmax)

    def pad(x: Tensor) -> Tensor:
        out = x.new_zeros(b, lmax, h, hd)
        out[valid] = x.transpose(0, 1)
        return out.transpose(1, 2)

    o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :], scale=scale)
    return o.transpose(1, 2)[valid].reshape(t, h * hd)


def _attention(attn: Attention, x: Tensor, lengths: list[int], impl: AttentionImpl,
               query_rows: Tensor | None = None, spare: int = 0) -> Tensor:
    """timm ``Attention.forward`` on packed tokens x (T, D).

    With ``query_rows`` only those rows are queries (keys/values still come from every token) and
    the result has one row per query: used for the CLS rows of the last block. The last ``spare``
    rows of x are a shape bucket's dummy rows: projected with the rest, in no set, zero output.
    """
    h, hd = attn.num_heads, attn.head_dim
    a = attn.attn_dim
    if query_rows is None or isinstance(attn.qkv, PrepackedLinear):
        qkv = attn.qkv(x).view(-1, 3, h, hd)
        q, k, v = qkv.permute(1, 2, 0, 3).unbind(0)  # each (H, T, hd), strided views
        xq = x
        q_lengths = lengths
        if query_rows is not None:
            # A prepacked weight cannot be sliced: project Q for every token (1/144 of the model's
            # products) and keep the query rows.
            q, xq, q_lengths = q.index_select(1, query_rows), x.index_select(0, query_rows), [1] * len(lengths)
    else:
        w, bias = attn.qkv.weight, attn.qkv.bias
        xq = x.index_select(0, query_rows)
        # Same weights as attn.qkv, split: Q for the query rows only, K and V for every token.
        q = F.linear(xq, w[:a], None if bias is None else bias[:a]).view(-1, h, hd).transpose(0, 1)
        kv = F.linear(x, w[a:], None if bias is None else bias[a:]).view(-1, 2, h, hd)
        k, v = kv.permute(1, 2, 0, 3).unbind(0)
        q_lengths = [1] * len(lengths)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if spare:
        real = x.shape[0] - spare
        k, v = k[:, :real], v[:, :real]
        if query_rows is None:
            q = q[:, :real]
    if impl == "padded" and query_rows is None:
        o = _attend_padded(q, k, v, lengths, attn.scale)
        if spare:
            o = torch.cat([o, o.new_zeros(spare, o.shape[1])])
    elif impl == "varlen":
        o = _attend_varlen(q, k, v, q_lengths, lengths, attn.scale, spare if query_rows is None else 0)
    else:
        o = _attend_sdpa(q, k, v, q_lengths, lengths, attn.scale, spare if query_rows is None else 0)
    # o is (Tq, H*hd), the layout timm's transpose(1, 2).reshape gives.
    o = attn.norm(o)
    if attn.gate is not None:
        o = o * attn.gate(xq).sigmoid()
    return attn.proj_drop(attn.proj(o))


def _cls_attention(attn: Attention, xn: Tensor, starts: Tensor, lengths: list[int]) -> list[Tensor]:
    """Each set's CLS-query attention over its patches in block ``attn`` (xn: the block's normalised
    input, packed (T, D), maybe with dummy rows after the real ones): the softmax row of the CLS query
    over the set's tokens, CLS column dropped, averaged over heads and renormalised over the patches;
    float32 (K_i,) per set. Vectorised over the batch: one product per token with its own set's query
    and a softmax per set through scatter/index_add, so a batch of many sets costs no Python loop."""
    h, hd = attn.num_heads, attn.head_dim
    real = sum(lengths)
    if isinstance(attn.qkv, PrepackedLinear):
        qkv = attn.qkv(xn[:real]).view(real, 3, h, hd)
        q, k = qkv[:, 0].index_select(0, starts), qkv[:, 1]
    else:
        w, bias = attn.qkv.weight, attn.qkv.bias
        a = attn.attn_dim
        q = F.linear(xn.index_select(0, starts), w[:a], None if bias is None else bias[:a]).view(-1, h, hd)
        k = F.linear(xn[:real], w[a:2 * a], None if bias is None else bias[a:2 * a]).view(real, h, hd)
    q, k = attn.q_norm(q).float(), attn.k_norm(k).float()
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=xn.device),
                                    torch.as_tensor(lengths, device=xn.device))  # set of each token
    scores = (k * q.index_select(0, owner)).sum(-1) * attn.scale  # (T, H): each token vs its set's CLS
    peak = scores.new_full((len(lengths), h), -torch.inf).scatter_reduce(
        0, owner[:, None].expand(-1, h), scores, "amax")
    weights = (scores - peak.index_select(0, owner)).exp()
    totals = weights.new_zeros(len(lengths), h).index_add_(0, owner, weights)
    weights = (weights / totals.index_select(0, owner)).mean(-1)  # (T,): softmax per head, head mean
    out = []
    for set_weights in torch.split(weights, lengths):
        patches = set_weights[1:]  # the CLS column dropped, then renormalised over the patches
        out.append(patches / patches.sum().clamp_min(torch.finfo(torch.float32).tiny))
    return out


def bucket_rows(rows: int) -> int:
    """``rows`` rounded up to one of a few sizes: a multiple of 1/16 of its power of two (at least 8).

    oneDNN builds (JIT-compiles) a kernel for every new matrix shape, and on an AMX Xeon building
    one for a ~2,000-row product took 3–7× as long as running it (``docs/benchmarks.md``). A worker
    whose batches each hold a different number of tokens would pay that at every batch; with
    buckets there are 16 sizes per doubling (about 100 up to 4,096), built once and then reused,
    for at most 1/16 (on average ~3 %) more rows.
    """
    if rows <= 0:
        raise ValueError(f"rows must be positive, got {rows}")
    step = max(8, (1 << (rows.bit_length() - 1)) // 16)
    return -(-rows // step) * step


def forward_packed(model: VisionTransformer, token_sets: Sequence[Tensor], *,
                   attention: AttentionImpl = "sdpa", cls_only_last: bool = True,
                   shape_buckets: bool = False, cls_attention: list[Tensor] | None = None) -> Tensor:
    """Logits (B, num_classes) for B token sets, each (K_i, D) patch tokens with pos-embed added.

    CLS (+ its pos-embed) is prepended to each set; all real tokens are processed as one packed
    (T, D) matrix; attention never crosses sets. Inputs are cast to the model's parameter dtype
    (bf16: run under ``torch.autocast("cpu", dtype=torch.bfloat16)`` or cast the model).
    ``attention``: ``sdpa`` (one SDPA call per set on views, the default: fastest measured on CPU),
    ``padded`` (one masked SDPA over a padded copy of Q/K/V) or ``varlen`` (one flash-attention
    call over the packed rows: CUDA and bf16/fp16 only, see :func:`varlen_available`). ``cls_only_last``:
    compute the last block for the CLS rows only (exact; the head reads nothing else).
    ``shape_buckets``: append zero rows up to :func:`bucket_rows` (in no set: they change no
    result) so that the matrix products see few distinct shapes. ``cls_attention``: when a list is
    given, each set's last-block CLS attention over its patches is appended to it (see
    :func:`_cls_attention`; the region exchange chooses its window by it).
    """
    blocks = _packable_blocks(model)
    if len(token_sets) == 0:
        return _empty_logits(model)
    x, lengths = _pack(model, token_sets)
    spare = bucket_rows(x.shape[0]) - x.shape[0] if shape_buckets else 0
    if spare:
        x = torch.cat([x, x.new_zeros(spare, x.shape[1])])
    starts = _index_tensor(list(itertools.accumulate(lengths[:-1], initial=0)), torch.int64, x.device)  # CLS rows
    x = model.norm_pre(x)
    last = len(blocks) - 1
    for i, blk in enumerate(blocks):
        attn = cast(Attention, blk.attn)  # checked by _packable_blocks
        if cls_only_last and i == last:
            xn = blk.norm1(x)  # once: the CLS rows' attention and the maps both read it
            if cls_attention is not None:
                cls_attention.extend(_cls_attention(attn, xn, starts, lengths))
            xc = x.index_select(0, starts)
            xc = xc + blk.drop_path1(blk.ls1(_attention(attn, xn, lengths, attention, starts, spare)))
            x = xc + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(xc))))
        else:
            if i == last and cls_attention is not None:
                cls_attention.extend(_cls_attention(attn, blk.norm1(x), starts, lengths))
            # In-place residual adds: x is our own packed buffer, and this saves a (T, D) copy each.
            x.add_(blk.drop_path1(blk.ls1(_attention(attn, blk.norm1(x), lengths, attention, spare=spare))))
            x.add_(blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))))
    cls_rows = x if cls_only_last else x.index_select(0, starts)
    # (B, 1, D) so that forward_head's CLS pooling (x[:, 0]), fc_norm and head apply unchanged.
    return model.forward_head(model.norm(cls_rows).unsqueeze(1))


def pad_sets(token_sets: Sequence[Tensor], length: int | None = None) -> tuple[Tensor, Tensor]:
    """Pad (K_i, D) sets to (B, L, D) (L = ``length`` or the longest set) + key mask (B, L), True = real."""
    if not token_sets:
        raise ValueError("pad_sets needs at least one token set")
    lmax = max(int(t.shape[0]) for t in token_sets)
    length = lmax if length is None else length
    if length < lmax:
        raise ValueError(f"pad length {length} is shorter than the longest set ({lmax})")
    first = token_sets[0]
    out = first.new_zeros(len(token_sets), length, first.shape[-1])
    mask = torch.zeros(len(token_sets), length, dtype=torch.bool, device=first.device)
    for i, t in enumerate(token_sets):
        out[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return out, mask


def forward_padded(model: VisionTransformer, token_sets: Sequence[Tensor], length: int | None = None) -> Tensor:
    """Reference batched forward: pad to ``length`` (default: the batch max) with a key-padding mask."""
    dtype = _model_dtype(model)
    padded, mask = pad_sets([t.to(dtype) for t in token_sets], length)
    return forward_tokens(model, padded, mask if not bool(mask.all()) else None)


def forward_sequential(model: VisionTransformer, token_sets: Sequence[Tensor]) -> Tensor:
    """One request at a time, no padding (how the official implementation serves requests)."""
    dtype = _model_dtype(model)
    return torch.cat([forward_tokens(model, t.to(dtype).unsqueeze(0)) for t in token_sets], dim=0)


def forward_token_sets(model: VisionTransformer, token_sets: Sequence[Tensor],
                       policy: Policy = "packed", *, attention: AttentionImpl = "sdpa",
                       cls_only_last: bool = True, shape_buckets: bool = False) -> Tensor:
    """The worker's single entry point: logits (B, num_classes) for B token sets under ``policy``
    (``attention``, ``cls_only_last`` and ``shape_buckets`` tune the packed policy; see
    :func:`forward_packed`)."""
    if policy == "packed":
        return forward_packed(model, token_sets, attention=attention, cls_only_last=cls_only_last,
                              shape_buckets=shape_buckets)
    if not token_sets:
        return _empty_logits(model)
    if policy == "padded":
        return forward_padded(model, token_sets)
    if policy == "sequential":
        return forward_sequential(model, token_sets)
    raise ValueError(f"unknown batching policy {policy!r}; expected one of {', '.join(POLICIES)}")


def plan_batches(lengths: Sequence[int], max_batch: int, max_tokens: int, *,
                 pad_to_max: bool = False) -> list[list[int]]:
    """Group request indices into batches: sorted by length, each batch ≤ ``max_batch`` requests and
    ≤ ``max_tokens`` tokens.

    ``lengths`` are patch-token counts; the budget counts each set's CLS token too (K_i + 1).
    With ``pad_to_max`` a batch costs (its longest set + 1) × its size, as the padded policy pays.
    Sorting keeps similar lengths together (less padding, and batches of similar latency); a set
    that alone exceeds the budget still gets a batch of its own. Every index appears exactly once;
    batches come out shortest first and each is a contiguous run of the (stable) sorted order.
    """
    if max_batch < 1 or max_tokens < 1:
        raise ValueError(f"max_batch and max_tokens must be ≥ 1, got {max_batch}, {max_tokens}")
    if any(n < 0 for n in lengths):
        raise ValueError("lengths must be ≥ 0")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        cost = lengths[i] + 1
        # Ascending order: the newest item is the batch's longest, so the padded cost is simple.
        new_used = (cost * (len(current) + 1)) if pad_to_max else used + cost
        if current and (len(current) >= max_batch or new_used > max_tokens):
            batches.append(current)
            current, new_used = [], cost
        current.append(i)
        used = new_used
    if current:
        batches.append(current)
    return batches
