"""The torch side of ``patchcast eval``: every model pass the sweep needs, cached.

1. **Full-image passes, once per dataset.** The edge model yields logits, last-layer CLS attention
   scores and rollout scores; the server model yields its full-image logits (the server-only
   baseline) and its own attention scores (the "server as semantic encoder" upper bound, Fig. 14).
2. **Selected-patch passes, once per selection** (encoder, score, rule, value): the server classifies
   *every* image from the selected patches only. The server's answer on a selection does not depend
   on the gate, so gates are applied afterwards as masks (:mod:`patchcast.eval.sweep`).
3. **Specialists** (expert routing) on every image's kept patches, per selection.

Everything after these passes is numpy over the arrays they return (:class:`Arrays`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from patchcast.eval.arrays import BoolArray, FloatArray, IntArray
from patchcast.eval.cache import Cache, digest, weights_fingerprint
from patchcast.eval.frontier import random_matched_selection
from patchcast.eval.grid import SCORE_SOURCES, SelectionSpec
from patchcast.progress import ProgressFn

if TYPE_CHECKING:
    from patchcast.eval.config import EvalConfig

MAX_CACHED_CLASSES = 100
"""Per-selection server logits are cached (float16) up to this many classes; beyond, only the
predictions: 1000-class logits for 50k images × 60 selections would be ~6 GB."""


@dataclass
class Arrays:
    """Everything the sweep needs, per image (B = images, N = patches)."""

    num_patches: int
    labels: IntArray
    edge_logits: FloatArray
    server_logits: FloatArray
    scores: dict[tuple[str, str], FloatArray]  # (encoder, score) → (B, N) float32
    counts: dict[str, IntArray] = field(default_factory=dict)  # spec id → (B,)
    packed_masks: dict[str, np.ndarray] = field(default_factory=dict)  # spec id → (B, ceil(N/8)) bits
    server_pred: dict[str, IntArray] = field(default_factory=dict)  # spec id → (B,)
    compute_seconds: float = 0.0  # model passes, whenever they ran (cached products included)

    def masks(self, spec_id: str, rows: IntArray) -> BoolArray:
        """Kept-patch masks of some images (unpacked on demand: all of them would be B × N × specs)."""
        return np.unpackbits(self.packed_masks[spec_id][rows], axis=1, count=self.num_patches).astype(bool)


def default_threads() -> int:
    """Torch's thread count on an idle machine, fewer on a busy one. OpenMP workers meet at a barrier
    after every op; when other processes hold the cores, each op waits for a descheduled thread
    (measured here: 25× slower for small batches at 2 threads on 2 busy cores than at 1)."""
    import torch

    cores = os.cpu_count() or 1
    free = cores - os.getloadavg()[0]
    return max(1, min(torch.get_num_threads(), int(free + 0.5)))


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def autocast(bf16: bool) -> Any:
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def _select_masks(scores: FloatArray, spec: SelectionSpec, num_patches: int, spread: int = 0) -> BoolArray:
    """(B, N) kept-patch masks for a non-random spec, through :mod:`shared.selection` (``spread``: its
    order, ``SelectionRule.spread``)."""
    from shared.selection import SelectionRule, select_batch

    rule = SelectionRule(spec.rule, int(spec.value) if spec.rule == "topk" else spec.value, spread=spread)
    masks = np.zeros((scores.shape[0], num_patches), dtype=bool)
    for i, sel in enumerate(select_batch(scores, rule)):
        masks[i, sel.indices] = True
    return masks


def padded_groups(counts: IntArray, max_tokens: int) -> list[IntArray]:
    """Split images into forwards: sorted by patch count, consecutive runs whose padded size
    (images × (largest count + CLS)) fits ``max_tokens``. Sorting keeps padding small; small
    forwards are the fast ones on CPU (activations stay in cache)."""
    order = np.argsort(np.asarray(counts), kind="stable")
    sorted_counts = np.asarray(counts)[order]
    groups: list[IntArray] = []
    s = 0
    while s < len(order):
        e = s + 1
        while e < len(order) and (e + 1 - s) * (int(sorted_counts[e]) + 1) <= max_tokens:
            e += 1
        groups.append(order[s:e])
        s = e
    return groups


def server_on_masks(server: Any, tokens: Any, masks: BoolArray, max_tokens: int, bf16: bool) -> FloatArray:
    """Server logits (B, C) float32 from the kept tokens only, in padded groups with a key-padding
    mask (padding is never attended to, so each image's result is its own; see shared.subset)."""
    import torch

    from shared.subset import forward_tokens, gather_tokens

    counts = masks.sum(axis=1)
    out = np.zeros((len(counts), int(server.num_classes)), dtype=np.float32)
    for rows in padded_groups(counts, max_tokens):
        k = int(counts[rows].max())
        # Kept indices first, ascending (row-major, the order a device packs them in), then padding.
        idx = np.argsort(~masks[rows], axis=1, kind="stable")[:, :max(k, 1)]
        valid = np.arange(idx.shape[1])[None, :] < counts[rows][:, None]
        kpm = None if valid.all() else torch.from_numpy(valid)
        with autocast(bf16):
            kept = gather_tokens(tokens[torch.from_numpy(rows)], torch.from_numpy(idx))
            logits = forward_tokens(server, kept, key_padding_mask=kpm)
        out[rows] = logits.float().numpy()
    return out


def codec_round_trip(pixels: np.ndarray, masks: BoolArray, patch_size: int, codec: Any,
                     params: dict[str, int]) -> np.ndarray:
    """A copy of ``pixels`` (B, H, W, 3) uint8 whose kept patches (``masks`` (B, N)) are replaced by what
    a worker decodes from the codec's payload of them (the others are left as they are: they are never
    gathered)."""
    out = pixels.copy()
    b, h, w, _ = pixels.shape
    p, cols = patch_size, w // patch_size
    for i in range(b):
        idx = np.flatnonzero(masks[i])
        if idx.size == 0:
            continue
        decoded = codec.decode(codec.encode(pixels[i], idx, p, params), (h, w), idx, p, params)
        out[i].reshape(h // p, p, cols, p, 3)[idx // cols, :, idx % cols] = decoded
    return out


Wire = tuple[Any, dict[str, int]]  # (codec, its resolved params): what --through-codec sends patches through


def wire_of(cfg: EvalConfig) -> Wire | None:
    """The codec and params the server's patches go through (``cfg.through_codec``), else ``None``."""
    if not cfg.through_codec:
        return None
    from shared.codecs import get_codec

    codec = get_codec(cfg.codec)
    return codec, codec.resolve_params(dict(cfg.codec_params))


def received_tokens(loaded: Any, pixels: Any, masks: BoolArray, wire: Wire, batch: int, bf16: bool) -> Any:
    """All patch tokens (B, N, D) of ``pixels`` (B, H, W, 3) uint8 for ``loaded`` (a LoadedModel) after the
    kept patches' codec round trip, as a worker embeds what it decodes."""
    import torch

    from shared import datasets
    from shared.subset import embed_all

    received = torch.from_numpy(codec_round_trip(pixels.numpy(), masks, loaded.patch_size, *wire))
    with autocast(bf16):
        return torch.cat([embed_all(loaded.model, datasets.normalize(received[s:e], loaded.preprocess))
                          for s, e in chunks(len(received), batch)])


def _full_passes(edge: Any, server: Any, pixels: Any, edge_pre: Any, server_pre: Any, batch: int,
                 bf16: bool, rollout: bool) -> dict[str, np.ndarray]:
    from shared.attention import edge_forward
    from shared.datasets import normalize
    from shared.scores import scores_from_output

    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("edge_logits", "edge_attention", "edge_rollout",
                                                         "server_logits", "server_attention")}
    for s, e in chunks(len(pixels), batch):
        with autocast(bf16):
            out = edge_forward(edge, normalize(pixels[s:e], edge_pre), all_layers=rollout)
            sout = edge_forward(server, normalize(pixels[s:e], server_pre))
        parts["edge_logits"].append(out.logits.float().numpy())
        parts["edge_attention"].append(scores_from_output(out, "attention").numpy())
        if rollout:
            parts["edge_rollout"].append(scores_from_output(out, "rollout").numpy())
        parts["server_logits"].append(sout.logits.float().numpy())
        parts["server_attention"].append(scores_from_output(sout, "attention").numpy())
        del out, sout
    return {k: np.concatenate(v) for k, v in parts.items() if v}


def compute_passes(cfg: EvalConfig, ds: Any, edge_m: Any, server_m: Any, specs: Sequence[SelectionSpec],
                   cache: Cache, bf16: bool, report: ProgressFn) -> Arrays:
    """Full-image passes and one server pass per selection, each skipped when cached.

    Images are processed in chunks whose server tokens fit in ~512 MB (all of CIFAR-10 in one);
    inside a chunk the server's patch embeddings are computed once and every selection gathers
    from them. Results are saved as soon as their last chunk is done, so an interrupted run keeps
    what it finished.
    """
    import torch

    from shared import datasets
    from shared.models import set_fused_attention
    from shared.subset import embed_all

    n_patches = edge_m.num_patches
    edge_pre, server_pre = edge_m.preprocess, server_m.preprocess
    full = cache.load("full")
    if full is not None and cfg.rollout and "edge_rollout" not in full:
        full = None
    cached = {sp.id: cache.load(f"sel-{sp.id}") for sp in specs}
    todo = [sp for sp in specs if cached[sp.id] is None]
    chunk = max(64, int(512e6 // (n_patches * server_m.embed_dim * 4)))
    bounds = list(chunks(len(ds), chunk))
    parts: dict[str, list[np.ndarray]] = {}
    sel_parts: dict[str, dict[str, list[np.ndarray]]] = {sp.id: {"mask": [], "pred": []} for sp in todo}
    done_units = 0
    spent: dict[str, float] = {}  # compute seconds per product
    for c_start, c_end in bounds if (full is None or todo) else []:
        last_chunk = c_end == len(ds)
        # The pixels a device owns: the edge's resize + crop; each model normalises them its own way.
        pixels, labels = datasets.to_tensor_batch(ds.samples[c_start:c_end], edge_pre)
        if full is None:
            # Only the last block's map is read from the server: the others may stay fused (faster).
            set_fused_attention(server_m.model, True)
            last_attn: Any = server_m.model.blocks[-1].attn
            last_attn.fused_attn = False
            t0 = time.perf_counter()
            got = _full_passes(edge_m.model, server_m.model, pixels, edge_pre, server_pre, cfg.batch_size,
                               bf16, cfg.rollout)
            spent["full"] = spent.get("full", 0.0) + time.perf_counter() - t0
            got["labels"] = labels.numpy()
            for k, v in got.items():
                parts.setdefault(k, []).append(v)
            report("full", c_end, len(ds), "edge + server on full images")
            source, offset = got, 0
            if last_chunk:
                full = {k: np.concatenate(v) for k, v in parts.items()}
                full["seconds"] = np.array(spent["full"])  # compute time, reported by later cached runs
                cache.save("full", full)
        else:
            source, offset = full, c_start
        if not todo:
            continue
        scores: dict[tuple[str, str], FloatArray] = {
            src: source[f"{src[0]}_{src[1]}"][offset:offset + c_end - c_start] for src in SCORE_SOURCES
            if f"{src[0]}_{src[1]}" in source}
        set_fused_attention(server_m.model, True)
        with autocast(bf16):
            tokens = torch.cat([embed_all(server_m.model, datasets.normalize(pixels[s:e], server_pre))
                                for s, e in chunks(len(pixels), cfg.batch_size)])
        masks_of: dict[str, BoolArray] = {}
        wire = wire_of(cfg)
        for sp in todo:
            t0 = time.perf_counter()
            if sp.score == "random":
                twin = masks_of.get(sp.twin.id)
                if twin is None:
                    twin = _select_masks(scores[("edge", "attention")], sp.twin, n_patches, cfg.spread)
                # Seeded by the spec and the chunk, so a rerun draws the same patches.
                rng = np.random.default_rng([cfg.seed, c_start, *sp.id.encode()])
                masks = random_matched_selection(twin.sum(axis=1), n_patches, rng)
            else:
                masks = _select_masks(scores[(sp.encoder, sp.score)], sp, n_patches, cfg.spread)
                masks_of[sp.id] = masks
            sel_tokens = tokens if wire is None else received_tokens(  # the kept patches as a worker decodes them
                server_m, pixels, masks, wire, cfg.batch_size, bf16)
            logits = server_on_masks(server_m.model, sel_tokens, masks, cfg.max_tokens, bf16)
            del sel_tokens
            spent[sp.id] = spent.get(sp.id, 0.0) + time.perf_counter() - t0
            sel_parts[sp.id]["mask"].append(np.packbits(masks, axis=1))
            sel_parts[sp.id]["pred"].append(logits.argmax(axis=1).astype(np.int32))
            if logits.shape[1] <= MAX_CACHED_CLASSES:
                sel_parts[sp.id].setdefault("logits", []).append(logits.astype(np.float16))
            if last_chunk:
                result = {k: np.concatenate(v) for k, v in sel_parts.pop(sp.id).items()}
                result["seconds"] = np.array(spent[sp.id])
                cache.save(f"sel-{sp.id}", result)
                cached[sp.id] = result
            done_units += 1
            report("subsets", done_units, len(todo) * len(bounds), sp.id)
        del tokens
    assert full is not None
    data = Arrays(num_patches=n_patches, labels=full["labels"].astype(np.int64),
                  edge_logits=full["edge_logits"], server_logits=full["server_logits"],
                  scores={src: full[f"{src[0]}_{src[1]}"] for src in SCORE_SOURCES
                          if f"{src[0]}_{src[1]}" in full})
    data.compute_seconds = float(full.get("seconds", 0.0))
    for sp in specs:
        a = cached[sp.id]
        assert a is not None
        data.compute_seconds += float(a.get("seconds", 0.0))
        data.packed_masks[sp.id] = a["mask"]
        data.counts[sp.id] = np.unpackbits(a["mask"], axis=1, count=n_patches).sum(axis=1)
        data.server_pred[sp.id] = a["pred"].astype(np.int64)
    return data


def expert_passes(cfg: EvalConfig, ds: Any, experts: Sequence[Any], data: Arrays, specs: Sequence[SelectionSpec],
                  cache: Cache, bf16: bool, report: ProgressFn) -> dict[str, IntArray]:
    """Every specialist on every image's kept patches, per selection: (E, B) global class ids.

    Computing all images (not only those routed) makes any routing rule a cheap combination of
    cached answers (:func:`routed_predictions`). Cached per expert's weights and selection."""
    import torch

    from shared import datasets
    from shared.models import set_fused_attention
    from shared.subset import embed_all

    out: dict[str, IntArray] = {sp.id: np.zeros((len(experts), len(data.labels)), dtype=np.int64) for sp in specs}
    wire = wire_of(cfg)
    done, total = 0, len(experts) * len(specs) * len(data.labels)
    for e, expert in enumerate(experts):
        tag = digest([weights_fingerprint(expert.model), expert.class_ids])
        todo = []
        for sp in specs:
            got = cache.load(f"expert-{tag}-{sp.id}")
            if got is None:
                todo.append(sp)
            else:
                out[sp.id][e] = got["pred"]
                done += len(data.labels)
        if not todo:
            continue
        set_fused_attention(expert.model, True)
        ids = np.asarray(expert.class_ids, dtype=np.int64)
        for c_start, c_end in chunks(len(data.labels), 2048):
            rows = np.arange(c_start, c_end)
            pixels, _ = datasets.to_tensor_batch(ds.samples[c_start:c_end], expert.preprocess)
            with autocast(bf16):
                tokens = torch.cat([embed_all(expert.model, datasets.normalize(pixels[s:t], expert.preprocess))
                                    for s, t in chunks(len(pixels), cfg.batch_size)])
            for sp in todo:
                masks = data.masks(sp.id, rows)
                sel_tokens = tokens if wire is None else received_tokens(
                    expert, pixels, masks, wire, cfg.batch_size, bf16)
                logits = server_on_masks(expert.model, sel_tokens, masks, cfg.max_tokens, bf16)
                out[sp.id][e, rows] = ids[logits.argmax(axis=1)]
                done += len(rows)
                report("experts", done, total, f"expert {e}, {sp.id}")
        for sp in todo:
            cache.save(f"expert-{tag}-{sp.id}", {"pred": out[sp.id][e]})
    return out
