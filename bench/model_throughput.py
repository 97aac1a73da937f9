"""Worker throughput in-process: how fast the server ViT classifies variable-length token sets.

    .venv/bin/python bench/model_throughput.py            # full: DeiT-Base shape, 32 requests/mix, 5 rounds
    .venv/bin/python bench/model_throughput.py --quick    # a few seconds per variant, fewer variants

Model: timm ``deit_base_patch16_224`` with random weights (compute does not depend on them), eval,
``torch.inference_mode``. bf16 is the worker's mode: CPU autocast over a copy whose matrix weights are
stored in bf16 (:func:`shared.packing.autocast_ready_copy`, bit-identical to autocast over fp32 weights)
and, where this torch can (:func:`shared.prepack.prepack_available`), the blocks' Linear weights
prepacked in oneDNN's blocked layout (:func:`shared.prepack.prepack_linears`, ``worker.prepack_weights``).

Token-length mixes (patch tokens per request, CLS not counted; every request gets its own set):

* ``paper``: the paper's operating point, ~147 of 196 patches kept at δ_sum = 0.97, with spread
  (kept fraction ~ Beta(9, 3): mean 0.75, sd 0.12);
* ``keep32``: ~32 % kept (Beta(6.6, 14): mean 0.32, sd 0.10);
* ``zoo``: the kept fractions of ``zoo:cifar10-edge`` (CLS attention, sum threshold δ_sum = 0.97) on
  CIFAR-10 test images, scaled to 196 patches (skipped, and said so, if the zoo model or data is missing);
* ``full``: all 196 patches (the full image, 197 tokens), and ``equal``: the mix's total real tokens
  spread evenly over the same number of requests (no raggedness: the padding-free ideal);
* ``stream``: the ``paper`` distribution, but **fresh requests every round** (and another draw for
  the warm-up). The other mixes repeat their workload each round, so every matrix shape is one
  oneDNN has built a kernel for already; a serving worker sees new batch sizes all the time, and
  building a kernel for a new shape cost more than running it (``shape_buckets`` is the answer).

Variants (one workload = the mix's requests in arrival order):

* ``one-by-one``: each request alone, as the official implementation serves them (bf16 autocast over
  the fp32 weights; ``-ready``: over bf16-stored weights; ``-prepacked``: on the worker's own model,
  the loop at its best; ``-fp32``: the official implementation's arithmetic);
* ``pad197`` / ``padmax``: FIFO batches of ``--batch``, padded to 197 tokens / to the batch's longest
  set, key-padding mask (:func:`shared.packing.forward_padded`);
* ``padmax-sorted``: :func:`shared.packing.plan_batches` (sorted, ``pad_to_max`` budget) then padmax:
  the ``padded`` policy of the worker;
* ``packed``: :func:`shared.packing.forward_packed` on batches from ``plan_batches`` under
  ``--max-batch``/``--max-tokens``: the worker's default policy; ``packed-b32``: one FIFO batch of
  exactly ``--batch`` requests (for MFU at batch 32);
* ablations: fp32, bf16 by casting the weights, attention as one padded SDPA call, last block on all
  tokens, one thread, other token budgets, weights not prepacked (``packed-noprepack``), no shape
  buckets (``packed-nobuckets``), and
  (``--compile``) the MLPs compiled with inductor; (``--flex``) attention alone over one batch's sets:
  per-set SDPA (what ``packed`` runs) against one padded masked SDPA and against FlexAttention
  (compiled, block-diagonal mask over the packed sequence).

The machine's limit is measured in the same run: a 4096² bf16 ``torch.matmul`` into a preallocated
result (and 2048² fp32), and GEMMs of the model's MLP shape at one request's rows and at a batch's
rows (plain and prepacked). MFU = model FLOPs (2 × :func:`shared.costs.vit_flops`, i.e. 2 × MACs of
the encoder, on each request's real tokens) × images/s ÷ the bf16 limit of the same round: the
fastest of the 4096² matmul and the batch-rows GEMMs (which one wins varies by host and run). The
process keeps freed memory as the worker does (:func:`shared.heap.retain_freed_memory`;
``--glibc-heap`` not) and raises oneDNN's kernel cache to ``--kernel-cache`` (4,096) so that its
many interleaved variants do not evict each other's kernels.

Every figure is also given per CPU-second of this process (``time.process_time``). With ``--threads 1``
that is the work a variant costs, nearly independent of what else runs on the machine (a starved
run only waits longer), so on a busy machine the CPU-time ratios are the trustworthy ones; with
more threads it also counts threads spinning at barriers.

Timing: ``time.perf_counter`` around a variant's whole workload, after one warm-up batch; variants run
interleaved, ``--rounds`` times, each round in a rotated order; figures are medians over rounds, and
ratios are medians of per-round ratios (a shared, noisy machine drifts within minutes). The process
CPU time is recorded too: ``cpu share`` = CPU seconds ÷ (wall × threads) shows how much of the cores
the run actually got.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench.common import (
    NUM_PATCHES,
    Batch,
    Variant,
    beta_lengths,
    equal_lengths,
    fifo,
    log,
    make_sets,
    measure,
    med,
    model_flops,
    paired,
    planned,
    write_json,
    zoo_fractions,
)
from shared.heap import HeapSettings, retain_freed_memory
from shared.machine import machine_info
from shared.packing import (
    AttentionImpl,
    autocast_ready_copy,
    forward_packed,
    forward_padded,
    forward_sequential,
    plan_batches,
)
from shared.precision import bf16_flags, probe_once, resolve
from shared.prepack import PrepackedLinear, prepack_available, prepack_linears

# ---- variants -------------------------------------------------------------------------------------

DEPTH = 12  # DeiT-Base; --depth changes it for smoke runs only


def skipped_flops(lengths: Sequence[int], dim: int = 768, mlp_ratio: float = 4.0) -> float:
    """FLOPs the packed forward does not execute: the last block's non-CLS rows (Q, proj, MLP, and
    their attention), which nothing downstream reads."""
    total = 0.0
    for k in lengths:
        t = k + 1
        total += 2.0 * ((t - 1) * (2 + 2 * mlp_ratio) * dim * dim + 2 * (t - 1) * t * dim)
    return total


def model_variant(key: str, mix: str, what: str, batches: list[Batch], run: Callable[[Batch], object], *,
                  pad_to: int | None = None, per_batch_max: bool = False, threads: int | None = None) -> Variant:
    lengths = [int(t.shape[0]) for b in batches for t in b]
    if pad_to is not None:
        computed = sum((pad_to + 1) * len(b) for b in batches)
    elif per_batch_max:
        computed = sum((max(int(t.shape[0]) for t in b) + 1) * len(b) for b in batches)
    else:
        computed = sum(k + 1 for k in lengths)
    return Variant(key, mix, what, batches, run, threads, images=len(lengths),
                   real_tokens=sum(k + 1 for k in lengths), computed_tokens=computed, flops=model_flops(lengths, DEPTH))


def matmul_variant(key: str, n: int, dtype: torch.dtype, reps: int) -> Variant:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)  # preallocated: a fresh 32 MiB result per call is page-faulted in

    def run(_batch: Batch) -> None:
        for _ in range(reps):
            torch.matmul(a, b, out=out)

    return Variant(key, "machine", f"torch.matmul {n}² {str(dtype).removeprefix('torch.')} ×{reps}", [[]], run,
                   flops=2.0 * n**3 * reps, peak=True)


def gemm_variant(key: str, rows: int, reps: int, prepacked: bool = False) -> Variant:
    """The MLP's fc1 GEMM (rows × 768 → 3072) in bf16: how efficient one request's rows are vs a batch's;
    ``prepacked``: through the worker's prepacked Linear (weight laid out once, bias fused)."""
    x = torch.randn(rows, 768).to(torch.bfloat16)
    lin = torch.nn.Linear(768, 3072).to(torch.bfloat16)
    layer: torch.nn.Module = PrepackedLinear(lin) if prepacked else lin

    def run(_batch: Batch) -> None:
        for _ in range(reps):
            layer(x)

    how = "prepacked linear" if prepacked else "linear"
    return Variant(key, "machine", f"bf16 {how} {rows}×768→3072 ×{reps}", [[]], run,
                   flops=2.0 * rows * 768 * 3072 * reps, peak=True)


def autocast_bf16() -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def build_variants(args: argparse.Namespace, model: torch.nn.Module, mixes: dict[str, list[int]],
                   notes: list[str]) -> list[Variant]:
    from timm.models.vision_transformer import VisionTransformer

    assert isinstance(model, VisionTransformer)
    vit: VisionTransformer = model
    dim = int(vit.embed_dim)
    bf16_cast = copy.deepcopy(vit).to(torch.bfloat16)
    ready = autocast_ready_copy(vit)  # matrix weights stored in bf16, autocast
    # The worker's bf16 model: the same, with the blocks' Linear weights prepacked where torch can.
    worker = autocast_ready_copy(vit)
    can_prepack = prepack_available() and not args.no_prepack
    if can_prepack:
        prepack_linears(worker)
    notes.append("worker model: bf16-stored weights, " + ("blocks' Linear weights prepacked (oneDNN)" if can_prepack
                 else "not prepacked (" + ("--no-prepack" if args.no_prepack else "this torch cannot") + ")"))
    mb, mt, b = args.max_batch, args.max_tokens, args.batch

    def packed(m: VisionTransformer, *, amp: bool = True, attention: AttentionImpl = "sdpa",
               cls_only_last: bool = True, buckets: bool = True) -> Callable[[Batch], object]:
        def run(batch: Batch) -> object:
            with autocast_bf16() if amp else nullcontext():
                return forward_packed(m, batch, attention=attention, cls_only_last=cls_only_last,
                                      shape_buckets=buckets)
        return run

    def padded(length: int | None, amp: bool = True) -> Callable[[Batch], object]:
        def run(batch: Batch) -> object:
            with autocast_bf16() if amp else nullcontext():
                return forward_padded(worker, batch, length)
        return run

    def one_by_one(amp: bool = True, m: VisionTransformer = vit) -> Callable[[Batch], object]:
        def run(batch: Batch) -> object:
            with autocast_bf16() if amp else nullcontext():
                return forward_sequential(m, batch)
        return run

    out: list[Variant] = []
    peak = matmul_variant("peak-bf16", 4096 if not args.quick else 2048, torch.bfloat16, 1 if not args.quick else 2)
    out.append(peak)
    for mix, lengths in mixes.items():
        if mix == "stream":
            out += stream_variants(args, lengths, dim, packed, one_by_one, worker, ready)
            continue
        sets = make_sets(lengths, dim, seed=args.seed)
        eq = make_sets(equal_lengths(lengths), dim, seed=args.seed + 1)
        default = planned(sets, mb, mt)
        singles = [[s] for s in sets]
        if mix == "paper":
            # Order matters a little: neighbours in this list stay neighbours in every rotated round,
            # so the pairs the acceptance compares are measured close together in time.
            out += [
                model_variant("packed-b32", mix, f"packed, FIFO batches of {b} (MFU)", fifo(sets, b), packed(worker)),
                model_variant("packed", mix, f"packed, plan_batches({mb}, {mt}) — default", default, packed(worker)),
                model_variant("equal", mix, "same total tokens, equal lengths, packed, same caps",
                              planned(eq, mb, mt), packed(worker)),
                model_variant("one-by-one", mix, "one request at a time (bf16 autocast over fp32 weights)", singles,
                              one_by_one()),
                model_variant("one-by-one-ready", mix, "one request at a time, bf16-stored matrix weights + autocast",
                              singles, one_by_one(m=ready)),
                model_variant("one-by-one-prepacked", mix, "one request at a time, the worker's model (prepacked)",
                              singles, one_by_one(m=worker)),
                model_variant("packed-noprepack", mix, "packed, bf16-stored weights, not prepacked", default,
                              packed(ready)),
                model_variant("packed-nobuckets", mix, "packed, no shape buckets", default,
                              packed(worker, buckets=False)),
                model_variant("packed-fp32w", mix, "packed, autocast over fp32 weights (cast per call)", default,
                              packed(vit)),
                model_variant("padmax-sorted", mix, f"plan_batches({mb}, {mt}, pad_to_max), pad to batch max",
                              planned(sets, mb, mt, pad_to_max=True), padded(None), per_batch_max=True),
                model_variant("padmax", mix, f"FIFO batches of {b}, pad to batch max", fifo(sets, b), padded(None),
                              per_batch_max=True),
                model_variant("pad197", mix, f"FIFO batches of {b}, pad to 197", fifo(sets, b), padded(NUM_PATCHES),
                              pad_to=NUM_PATCHES),
                model_variant("packed-fp32", mix, "packed, default caps, fp32", default, packed(vit, amp=False)),
            ]
            if not args.quick:
                out += [
                    model_variant("one-by-one-fp32", mix, "one request at a time, fp32", singles,
                                  one_by_one(amp=False)),
                    model_variant("packed-bf16cast", mix, "packed, weights cast to bf16 (no autocast)", default,
                                  packed(bf16_cast, amp=False)),
                    model_variant("one-by-one-bf16cast", mix, "one request at a time, weights cast to bf16", singles,
                                  one_by_one(amp=False, m=bf16_cast)),
                    model_variant("packed-padattn", mix, "packed, attention as one padded masked SDPA", default,
                                  packed(worker, attention="padded")),
                    model_variant("packed-alltok", mix, "packed, last block on every token", default,
                                  packed(worker, cls_only_last=False)),
                    model_variant("packed-padattn-alltok", mix, "packed, padded attention, last block on every token",
                                  default, packed(worker, attention="padded", cls_only_last=False)),
                    model_variant("packed-bf16cast-padattn-alltok", mix,
                                  "packed, bf16 weights, padded attention, last block on every token", default,
                                  packed(bf16_cast, amp=False, attention="padded", cls_only_last=False)),
                    model_variant("packed-1thread", mix, "packed, default caps, 1 thread", default, packed(worker),
                                  threads=1),
                ]
                for budget in args.budgets:
                    if budget != mt:
                        out.append(model_variant(f"packed-t{budget}", mix, f"packed, plan_batches({mb}, {budget})",
                                                 planned(sets, mb, budget), packed(worker)))
                if args.compile:
                    out.append(compiled_variant(vit, mix, default, notes))
        else:
            out += [model_variant("packed", mix, f"packed, plan_batches({mb}, {mt}) — default", default,
                                  packed(worker))]
            if mix == "keep32":
                out += [model_variant("equal", mix, "same total tokens, equal lengths, packed, same caps",
                                      planned(eq, mb, mt), packed(worker))]
            if mix != "full":
                out += [model_variant("one-by-one", mix, "one request at a time (bf16)", singles, one_by_one()),
                        model_variant("one-by-one-prepacked", mix, "one request at a time, the worker's model",
                                      singles, one_by_one(m=worker)),
                        model_variant("padmax", mix, f"FIFO batches of {b}, pad to batch max", fifo(sets, b),
                                      padded(None), per_batch_max=True)]
    if not args.quick:
        out += [matmul_variant("peak-fp32", 2048, torch.float32, 1),
                gemm_variant("gemm-1req", 148, 8), gemm_variant("gemm-batch", 32 * 148, 1)]
        if can_prepack:
            out += [gemm_variant("gemm-1req-prepacked", 148, 8, prepacked=True),
                    gemm_variant("gemm-batch-prepacked", 32 * 148, 1, prepacked=True)]
    if args.flex:
        out += attention_variants(mixes["paper"], dim, args, notes)
    return out


def stream_variants(args: argparse.Namespace, lengths: list[int], dim: int, packed: Callable[..., Any],
                    one_by_one: Callable[..., Any], worker: Any, ready: Any) -> list[Variant]:
    """The ``stream`` mix: each round a fresh draw of the paper distribution (same count), so batch
    shapes are new to oneDNN as in a serving worker; ``lengths`` is the warm-up's draw."""
    mb, mt, r = args.max_batch, args.max_tokens, len(lengths)
    draws = [beta_lengths(np.random.default_rng([args.seed, 1000 + i]), r, 9.0, 3.0) for i in range(args.rounds)]
    per_round = [make_sets(d, dim, seed=args.seed + 2 + i) for i, d in enumerate(draws)]
    warm = make_sets(lengths, dim, seed=args.seed + 1000)
    mean_tokens = float(np.mean([sum(k + 1 for k in d) for d in draws]))

    def variant(key: str, what: str, run: Callable[[Batch], object], batching: Callable[[list[torch.Tensor]],
                list[Batch]]) -> Variant:
        v = model_variant(key, "stream", what, batching(warm), run)
        v.round_batches = [batching(sets) for sets in per_round]
        v.real_tokens = v.computed_tokens = round(mean_tokens)
        return v

    def default(sets: list[torch.Tensor]) -> list[Batch]:
        return planned(sets, mb, mt)

    def singles(sets: list[torch.Tensor]) -> list[Batch]:
        return [[t] for t in sets]

    return [
        variant("packed", f"packed, plan_batches({mb}, {mt}) — default", packed(worker), default),
        variant("packed-nobuckets", "packed, no shape buckets", packed(worker, buckets=False), default),
        variant("packed-noprepack", "packed, bf16-stored weights, not prepacked", packed(ready), default),
        variant("packed-nobuckets-noprepack", "packed, neither (the worker before)",
                packed(ready, buckets=False), default),
        variant("one-by-one", "one request at a time (bf16 autocast over fp32 weights)", one_by_one(), singles),
        variant("one-by-one-prepacked", "one request at a time, the worker's model", one_by_one(m=worker), singles),
    ]


def compiled_variant(vit: Any, mix: str, batches: list[Batch], notes: list[str]) -> Variant:
    """Packed forward with each block's MLP compiled by inductor (dynamic token count, weights frozen)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    m = copy.deepcopy(vit)
    for blk in m.blocks:
        blk.mlp.forward = torch.compile(blk.mlp.forward, dynamic=True)
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast_bf16():
        forward_packed(m, batches[0])
    notes.append(f"--compile: first call (compilation) took {time.perf_counter() - t0:.0f} s")

    def run(batch: Batch) -> object:
        with autocast_bf16():
            return forward_packed(m, batch)

    return model_variant("packed-compiled", mix, "packed, MLPs compiled (inductor, dynamic)", batches, run)


def attention_variants(lengths: Sequence[int], dim: int, args: argparse.Namespace, notes: list[str]) -> list[Variant]:
    """Attention alone over one default batch of the mix (DeiT-Base heads), ``DEPTH`` calls each:
    per-set SDPA on views of the packed Q/K/V (what the packed forward runs), one masked SDPA over a
    padded copy, and FlexAttention over the packed sequence with a block-diagonal mask (compiled)."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    heads, hd = 12, dim // 12
    batch = [k + 1 for k in lengths[:len(plan_batches(list(lengths), args.max_batch, args.max_tokens)[0])]]
    total = sum(batch)
    padded_total = -(-total // 128) * 128  # flex attention's block size
    g = torch.Generator().manual_seed(args.seed)
    q, k, v = (torch.randn(heads, padded_total, hd, generator=g).to(torch.bfloat16) for _ in range(3))
    scale = hd ** -0.5
    flops = sum(4.0 * n * n * hd * heads for n in batch) * DEPTH

    def per_set(_b: Batch) -> None:
        for _ in range(DEPTH):
            torch.cat([F.scaled_dot_product_attention(qi, ki, vi, scale=scale).transpose(0, 1).reshape(-1, dim)
                       for qi, ki, vi in zip(q[:, :total].split(batch, 1), k[:, :total].split(batch, 1),
                                             v[:, :total].split(batch, 1), strict=True)])

    lmax = max(batch)
    valid = torch.arange(lmax)[None, :] < torch.tensor(batch)[:, None]

    def padded(_b: Batch) -> None:
        for _ in range(DEPTH):
            def pad(x: torch.Tensor) -> torch.Tensor:
                out = x.new_zeros(len(batch), lmax, heads, hd)
                out[valid] = x[:, :total].transpose(0, 1)
                return out.transpose(1, 2)
            o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :], scale=scale)
            o.transpose(1, 2)[valid].reshape(total, dim)

    doc = torch.full((padded_total,), -1, dtype=torch.int32)
    doc[:total] = torch.repeat_interleave(torch.arange(len(batch), dtype=torch.int32), torch.tensor(batch))

    def same_set(_b: Any, _h: Any, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        return (doc[qi] == doc[ki]) & (doc[qi] >= 0)

    block_mask = create_block_mask(same_set, None, None, padded_total, padded_total, device="cpu")
    flex = torch.compile(flex_attention)
    t0 = time.perf_counter()
    with torch.inference_mode():
        flex(q[None], k[None], v[None], block_mask=block_mask, scale=scale)
    notes.append(f"--flex: FlexAttention compiled in {time.perf_counter() - t0:.0f} s; block mask over {total} tokens "
                 f"({len(batch)} sets) is {block_mask.sparsity():.0f} % sparse")

    def flex_run(_b: Batch) -> None:
        for _ in range(DEPTH):
            flex(q[None], k[None], v[None], block_mask=block_mask, scale=scale)

    what = f"{len(batch)} sets, {total} tokens, ×{DEPTH}"
    return [Variant("attn-sdpa", "attention", f"per-set SDPA, {what}", [[]], per_set, flops=flops, peak=True),
            Variant("attn-padded", "attention", f"one padded masked SDPA, {what}", [[]], padded, flops=flops,
                    peak=True),
            Variant("attn-flex", "attention", f"FlexAttention, block-diagonal mask, {what}", [[]], flex_run,
                    flops=flops, peak=True)]


# ---- report ---------------------------------------------------------------------------------------

def report(variants: list[Variant], args: argparse.Namespace, info: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    by = {(v.mix, v.key): v for v in variants}
    peak = by[("machine", "peak-bf16")]
    threads = torch.get_num_threads()
    lines = ["", "| mix | variant | what | images/s | real tokens/s | padding | rel. to packed | images/CPU-s "
             "| rel. (CPU) | cpu share |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows: list[dict[str, Any]] = []
    for v in variants:
        thr = med(v.per_round())
        share = med([c / (w * (v.threads or threads)) for c, w in zip(v.cpus, v.walls, strict=True)])
        thr_cpu = med(v.per_round(cpu=True))
        if v.peak:
            lines.append(f"| {v.mix} | {v.key} | {v.what} | {thr:.0f} GFLOP/s | | | | {thr_cpu:.0f} GFLOP/CPU-s "
                         f"| | {share:.2f} |")
            rows.append({"mix": v.mix, "key": v.key, "gflops": thr, "gflops_per_cpu_s": thr_cpu, "cpu_share": share,
                         "walls": v.walls, "cpus": v.cpus})
            continue
        base = by.get((v.mix, "packed"))
        rel = f"{paired(v, base):.2f}" if base is not None else ""
        rel_cpu = f"{paired(v, base, cpu=True):.2f}" if base is not None else ""
        tok = med([v.real_tokens / w for w in v.walls])
        waste = 1 - v.real_tokens / v.computed_tokens
        lines.append(f"| {v.mix} | {v.key} | {v.what} | {thr:.2f} | {tok:.0f} | {waste:.0%} | {rel} | {thr_cpu:.2f} "
                     f"| {rel_cpu} | {share:.2f} |")
        rows.append({"mix": v.mix, "key": v.key, "images_per_s": thr, "tokens_per_s": tok, "padding": waste,
                     "images_per_cpu_s": thr_cpu, "walls": v.walls, "cpus": v.cpus, "images": v.images,
                     "real_tokens": v.real_tokens, "cpu_share": share})

    acc: list[tuple[str, str, str, str, str]] = []

    def fmt(val: float, unit: str) -> str:
        return f"{val:.0%}" if unit == "%" else f"{val:.2f}×"

    def ratio(name: str, a: tuple[str, str], b: tuple[str, str], target: float | None, unit: str = "×") -> None:
        if a in by and b in by:
            val, val_cpu = paired(by[a], by[b]), paired(by[a], by[b], cpu=True)
            verdict = "" if target is None else ("PASS" if val >= target else "MISS")
            goal = "" if target is None else (f"≥ {target:.0%}" if unit == "%" else f"≥ {target:g}×")
            acc.append((name, fmt(val, unit), fmt(val_cpu, unit), goal, verdict))

    ratio("length-aware (packed) ÷ equal-length, same total real tokens", ("paper", "packed"), ("paper", "equal"),
          0.85, "%")
    ratio("  same, ~32 % kept mix", ("keep32", "packed"), ("keep32", "equal"), 0.85, "%")
    ratio("packed ÷ one-by-one, same mix, both bf16", ("paper", "packed"), ("paper", "one-by-one"), 3.0)
    ratio("  same, ~32 % kept mix", ("keep32", "packed"), ("keep32", "one-by-one"), 3.0)
    ratio("  same, zoo mix", ("zoo", "packed"), ("zoo", "one-by-one"), 3.0)
    ratio("  same, ~32 % kept mix, both the worker's model", ("keep32", "packed"),
          ("keep32", "one-by-one-prepacked"), 3.0)
    ratio("  same, zoo mix, both the worker's model", ("zoo", "packed"), ("zoo", "one-by-one-prepacked"), 3.0)
    ratio("  both with bf16-stored matrix weights + autocast, loop not prepacked", ("paper", "packed"),
          ("paper", "one-by-one-ready"), 3.0)
    ratio("  both the worker's model: bf16-stored, prepacked (same numerics; the loop at its best)",
          ("paper", "packed"), ("paper", "one-by-one-prepacked"), 3.0)
    ratio("  prepacked ÷ not prepacked: packed", ("paper", "packed"), ("paper", "packed-noprepack"), None)
    ratio("  prepacked ÷ not prepacked: one request at a time", ("paper", "one-by-one-prepacked"),
          ("paper", "one-by-one-ready"), None)
    ratio("fresh requests every round (stream mix): packed ÷ one-by-one (bf16 autocast over fp32 weights)",
          ("stream", "packed"), ("stream", "one-by-one"), 3.0)
    ratio("  same, both the worker's model (the loop at its best)", ("stream", "packed"),
          ("stream", "one-by-one-prepacked"), 3.0)
    ratio("  shape buckets on ÷ off (packed)", ("stream", "packed"), ("stream", "packed-nobuckets"), None)
    ratio("  prepacked ÷ not (packed, with buckets)", ("stream", "packed"), ("stream", "packed-noprepack"), None)
    ratio("  the worker now ÷ before both (packed)", ("stream", "packed"), ("stream", "packed-nobuckets-noprepack"),
          None)
    ratio("  repeated workload ÷ fresh (packed, worker's model; the cost of new shapes)", ("paper", "packed"),
          ("stream", "packed"), None)
    ratio("  stored bf16 matrix weights ÷ autocast casting fp32 weights per call (packed, both not prepacked)",
          ("paper", "packed-noprepack"), ("paper", "packed-fp32w"), None)
    ratio("  both with weights cast to bf16 (the loop's best bf16)", ("paper", "packed-bf16cast"),
          ("paper", "one-by-one-bf16cast"), 3.0)
    ratio("packed bf16 ÷ one-by-one fp32 (official loop, fp32)", ("paper", "packed"), ("paper", "one-by-one-fp32"),
          None)
    ratio("packed fp32 ÷ one-by-one fp32 (both fp32: what precision auto runs where bf16 does not pay)",
          ("paper", "packed-fp32"), ("paper", "one-by-one-fp32"), 3.0)
    ratio("bf16 ÷ fp32 (packed, default caps; bf16 = autocast)", ("paper", "packed"), ("paper", "packed-fp32"), 2.0)
    ratio("  bf16 by weights cast ÷ fp32", ("paper", "packed-bf16cast"), ("paper", "packed-fp32"), 2.0)
    ratio("  one-by-one: bf16 autocast ÷ fp32", ("paper", "one-by-one"), ("paper", "one-by-one-fp32"), None)
    ratio("~32 % kept ÷ full image (packed, images/s)", ("keep32", "packed"), ("full", "packed"), 2.5)
    ratio("packed ÷ pad-to-197", ("paper", "packed"), ("paper", "pad197"), None)
    ratio("packed ÷ pad-to-batch-max", ("paper", "packed"), ("paper", "padmax"), None)
    ratio("packed ÷ sorted pad-to-batch-max (padded policy)", ("paper", "packed"), ("paper", "padmax-sorted"), None)
    # The machine's bf16 limit, per round: the fastest bf16 GEMM measured in that round (the 4096²
    # matmul, or the batch-sized fc1 GEMM where that runs faster).
    bf16_gemms = [v for v in (peak, by.get(("machine", "gemm-batch")), by.get(("machine", "gemm-batch-prepacked")))
                  if v is not None]

    def limit(cpu: bool) -> list[float]:
        return [max(rates) for rates in zip(*(g.per_round(cpu) for g in bf16_gemms), strict=True)]

    def utilisation(v: Variant, cpu: bool, ref: list[float] | None = None) -> float:
        rates = limit(cpu) if ref is None else ref
        return med([(v.flops / 1e9 / t) / r for t, r in zip(v.cpus if cpu else v.walls, rates, strict=True)])

    b32 = by.get(("paper", "packed-b32"))
    if b32 is not None:
        mfu, mfu_cpu = utilisation(b32, False), utilisation(b32, True)
        acc.append((f"MFU at batch {args.batch} (model FLOPs ÷ same-round bf16 peak: the fastest of "
                    f"{' and '.join(g.key for g in bf16_gemms)})", f"{mfu:.0%}",
                    f"{mfu_cpu:.0%}", "≥ 35%", "PASS" if mfu >= 0.35 else "MISS"))
        executed = 1 - skipped_flops([int(t.shape[0]) for bt in b32.batches for t in bt]) / b32.flops
        acc.append((f"  hardware FLOP utilisation (executed FLOPs: {executed:.1%} of model FLOPs)",
                    f"{mfu * executed:.0%}", f"{mfu_cpu * executed:.0%}", "", ""))
    for key, label in (("packed", "MFU at the default caps"), ("one-by-one", "MFU of the one-by-one loop (bf16)"),
                       ("one-by-one-ready", "MFU of the one-by-one loop (bf16-stored weights, autocast)"),
                       ("one-by-one-prepacked", "MFU of the one-by-one loop (the worker's model, prepacked)"),
                       ("one-by-one-bf16cast", "MFU of the one-by-one loop (bf16 weights)")):
        found = by.get(("paper", key))
        if found is not None:
            u, uc = utilisation(found, False), utilisation(found, True)
            acc.append((f"{label}; a perfect batcher could be at most {1 / u:.2f}× faster" if key != "packed"
                        else label, f"{u:.0%}", f"{uc:.0%}", "", ""))
    peak32 = by.get(("machine", "peak-fp32"))
    if peak32 is not None:
        for key, label in (("packed-fp32", "fp32 MFU (÷ fp32 matmul peak) at the default caps"),
                           ("one-by-one-fp32", "fp32 MFU of the one-by-one fp32 loop")):
            found = by.get(("paper", key))
            if found is not None:
                u = utilisation(found, False, peak32.per_round())
                uc = utilisation(found, True, peak32.per_round(cpu=True))
                acc.append((f"{label}; a perfect batcher could be at most {1 / u:.2f}× faster"
                            if key.startswith("one") else label, f"{u:.0%}", f"{uc:.0%}", "", ""))
    g1, gb = by.get(("machine", "gemm-1req")), by.get(("machine", "gemm-batch"))
    if g1 is not None and gb is not None:
        acc.append(("GEMM efficiency, 148 rows ÷ 4736 rows (bf16 fc1 shape)", f"{1 / paired(gb, g1):.0%}",
                    f"{1 / paired(gb, g1, cpu=True):.0%}", "", ""))
    p1, pb = by.get(("machine", "gemm-1req-prepacked")), by.get(("machine", "gemm-batch-prepacked"))
    if p1 is not None and pb is not None and g1 is not None and gb is not None:
        acc.append(("  same, prepacked weights", f"{1 / paired(pb, p1):.0%}", f"{1 / paired(pb, p1, cpu=True):.0%}",
                    "", ""))
        acc.append(("  prepacked ÷ plain: 148 rows / 4736 rows", f"{paired(p1, g1):.2f}× / {paired(pb, gb):.2f}×",
                    f"{paired(p1, g1, cpu=True):.2f}× / {paired(pb, gb, cpu=True):.2f}×", "", ""))
    attn = {k: by.get(("attention", k)) for k in ("attn-sdpa", "attn-padded", "attn-flex")}
    if attn["attn-sdpa"] is not None:
        for k in ("attn-padded", "attn-flex"):
            other = attn[k]
            if other is not None:
                acc.append((f"attention alone: per-set SDPA ÷ {other.what}", f"{paired(attn['attn-sdpa'], other):.2f}×",
                            f"{paired(attn['attn-sdpa'], other, cpu=True):.2f}×", "", ""))
    lines += ["", "| acceptance / ratio (median of per-round ratios) | by wall time | by CPU time | target | |",
              "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in acc]
    print("\n".join(lines))
    for n in notes:
        print(f"- {n}")
    probe = probe_once()
    auto = resolve("auto")
    print(f"- precision auto on this machine: {auto} (bf16 probe: "
          f"{'not run, bf16 emulated' if probe is None else f'{probe.speedup:.2f}× fp32'})")
    return {"machine": info, "args": vars(args), "rows": rows, "acceptance": acc, "notes": notes,
            "precision_auto": auto, "bf16_probe_speedup": None if probe is None else probe.speedup,
            "peak_bf16_gflops_median": med(peak.per_round()), "bf16_limit_gflops_median": med(limit(False))}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small workloads, 2 rounds, fewer variants")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; quick 2)")
    p.add_argument("--requests", type=int, default=None, help="requests per mix (default 32; quick 8)")
    p.add_argument("--batch", type=int, default=None, help="FIFO batch size of the padded baselines and MFU "
                   "(default 32; quick 8)")
    p.add_argument("--max-batch", type=int, default=32, help="plan_batches request cap (default 32)")
    p.add_argument("--max-tokens", type=int, default=2048, help="plan_batches token budget, CLS included")
    p.add_argument("--budgets", type=int, nargs="*", default=[1024, 4096], help="other token budgets to compare")
    p.add_argument("--zoo-images", type=int, default=1000, help="CIFAR-10 images for the zoo mix")
    p.add_argument("--compile", action="store_true", help="also try the MLPs compiled with inductor (slow start)")
    p.add_argument("--flex", action="store_true", help="also time attention alone: per-set SDPA vs one padded SDPA "
                   "vs FlexAttention (compiled, ~20 s start)")
    p.add_argument("--no-prepack", action="store_true", help="the worker model without prepacked Linear weights "
                   "(worker.prepack_weights = false)")
    p.add_argument("--depth", type=int, default=12, help="blocks (12 = DeiT-Base; fewer only for smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--glibc-heap", action="store_true",
                   help="keep glibc's default malloc settings (the worker retains freed memory; bench/heap.py "
                        "compares the two)")
    p.add_argument("--kernel-cache", type=int, default=4096,
                   help="oneDNN kernel cache capacity for this run (ONEDNN_PRIMITIVE_CACHE_CAPACITY wins if set; "
                        "oneDNN's default 1024 is thrashed by this run's many variants; bench/shapes.py measures "
                        "what a worker's own stream does)")
    p.add_argument("--json", type=Path, default=None, help="write all figures here")
    args = p.parse_args(argv)
    # As the worker does (worker.retain_heap), before any tensor exists.
    heap = HeapSettings(False, "glibc defaults (--glibc-heap)") if args.glibc_heap else retain_freed_memory()
    # oneDNN keeps 1,024 built kernels (one per matrix shape) by default; a worker's own shapes fit
    # (shape buckets), but this run's ~50 interleaved variants, loops of 32 lengths each, do not, and
    # would rebuild each other's kernels every round. Read by oneDNN at its first product.
    kernel_cache = os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(args.kernel_cache))
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.requests = args.requests or (8 if args.quick else 32)
    args.batch = args.batch or (8 if args.quick else 32)

    torch.set_num_threads(args.threads)
    with suppress(RuntimeError):  # only settable before the first parallel work
        torch.set_num_interop_threads(1)
    info = machine_info()
    info["loadavg_start"] = os.getloadavg()[0]
    flags = bf16_flags()
    info["avx512_bf16"], info["amx_bf16"] = flags["avx512_bf16"], flags["amx_bf16"]
    info["threads"] = torch.get_num_threads()
    info["heap"] = heap.reason
    notes: list[str] = [f"heap: {heap.reason}", f"oneDNN kernel cache: {kernel_cache} kernels"]

    rng = np.random.default_rng(args.seed)
    r = args.requests
    mixes: dict[str, list[int]] = {"paper": beta_lengths(rng, r, 9.0, 3.0), "keep32": beta_lengths(rng, r, 6.6, 14.0)}
    fractions, how = zoo_fractions(min(args.zoo_images, 250) if args.quick else args.zoo_images)
    if fractions is not None:
        mixes["zoo"] = [int(v) for v in np.clip(np.rint(rng.choice(fractions, r) * NUM_PATCHES), 1, NUM_PATCHES)]
        notes.append(f"zoo mix from {how}: kept fraction mean {fractions.mean():.3f}, sd {fractions.std():.3f}, "
                     f"p10/p50/p90 {np.percentile(fractions, 10):.2f}/{np.percentile(fractions, 50):.2f}/"
                     f"{np.percentile(fractions, 90):.2f}")
    else:
        notes.append(f"zoo mix skipped: {how}")
    mixes["full"] = [NUM_PATCHES] * r
    mixes["stream"] = beta_lengths(np.random.default_rng([args.seed, 999]), r, 9.0, 3.0)  # its warm-up draw
    for name, lengths in mixes.items():
        notes.append(f"mix {name}: {len(lengths)} requests, patch tokens mean {np.mean(lengths):.1f}, "
                     f"min {min(lengths)}, max {max(lengths)}")

    import timm

    global DEPTH
    DEPTH = args.depth
    model = timm.create_model("deit_base_patch16_224", pretrained=False, depth=args.depth).eval()
    variants = build_variants(args, model, mixes, notes)
    log(f"{len(variants)} variants × {args.rounds} rounds, {info['threads']} threads, "
        f"load average {info['loadavg_start']:.1f}")
    measure(variants, args.rounds, log)
    info["loadavg_end"] = os.getloadavg()[0]
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, avx512_bf16={info['avx512_bf16']}, "
          f"amx_bf16={info['amx_bf16']}, torch {info['torch']}, {info['threads']} threads, "
          f"load average {info['loadavg_start']:.1f} → {info['loadavg_end']:.1f}")
    print(f"command: {' '.join(['python', 'bench/model_throughput.py', *(argv or sys.argv[1:])])}")
    result = report(variants, args, info, notes)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
