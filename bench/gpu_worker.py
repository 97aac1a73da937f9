"""Worker throughput on a CUDA GPU: the server ViT's batched forward where a GPU serves the pool.

    python bench/gpu_worker.py --json reports/gpu_worker.json           # needs a CUDA GPU; ~3 min on an H100

The CPU benchmark (``bench/model_throughput.py``) asks how close packing gets to a CPU's limit. On
a GPU the question changes: one image of ~150 tokens is far too little work for the device, so the
one-at-a-time loop is bound by kernel launches, and the batcher's caps decide how much of the GPU a
batch can use. Same model (timm ``deit_base_patch16_224``, random init: compute does not depend on
weights), same token-length mixes as the CPU benchmark (``paper``, ``keep32``, ``full`` and, from
``--zoo-fractions`` or the CIFAR-10 data, ``zoo``), bf16 autocast over bf16-stored matrix weights.

Variants, per mix (one workload = the mix's requests in arrival order):

* ``one-by-one``: each request alone (the official implementation's loop, in bf16; ``-fp32``: in fp32);
* ``pad197`` / ``padmax``: FIFO batches of ``--batch``, padded to 197 tokens / to the batch's longest set;
* ``packed-sdpa``: packed tokens, one SDPA call per set (the CPU worker's default); ``packed-padattn``:
  one masked SDPA call over padded Q/K/V per block (what ``auto`` runs for fp32 on CUDA, as ``packed-fp32``);
* ``pad197-big`` / ``padded-policy``: batches under the GPU-sized caps padded to 197 / sorted by
  :func:`shared.packing.plan_batches` and padded to their longest (the worker's ``padded`` policy);
* ``packed``: packed tokens, one flash-attention call per block over every set
  (``torch.nn.attention.varlen``; ``attention = "auto"`` on CUDA), under the CPU worker's caps
  (``--max-batch`` 32, ``--max-tokens`` 2048); ``packed-big``: the same under GPU-sized caps
  (``--big-batch``, ``--big-tokens``); ``equal``: the mix's tokens spread evenly (the padding-free ideal);
* ``engine``: :class:`inference_worker.engine.ServerEngine` on ``cuda`` from uint8 patch pixels, the
  worker's whole GPU path (host → device copy, normalisation, patch embedding, blocks, logits back),
  under the GPU-sized caps (``engine-pageable``: the pixels copied from pageable memory, as before
  ``ServerEngine`` staged them in page-locked memory); ``packed-huge``: 4× the GPU-sized caps.

The device's limit is measured in the same run: an 8192³ bf16 ``torch.matmul``. MFU = the encoder's
model FLOPs on each request's real tokens × images/s ÷ that. Timing: a variant's whole workload between
``torch.cuda.synchronize()`` calls, after one warm-up batch; variants interleaved over ``--rounds``
rotated rounds; medians over rounds, ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench import common
from bench.common import NUM_PATCHES, Batch, Variant, fifo, planned
from inference_worker.engine import PatchSet, ServerEngine
from shared.config import BatchingConfig
from shared.machine import machine_info
from shared.models import LoadedModel, Preprocess
from shared.packing import (
    AttentionImpl,
    autocast_ready_copy,
    forward_packed,
    forward_padded,
    forward_sequential,
    varlen_available,
)


def patch_sets(lengths: Sequence[int], seed: int) -> list[PatchSet]:
    rng = np.random.default_rng(seed)
    return [PatchSet(rng.integers(0, 256, (k, 16, 16, 3), dtype=np.uint8),
                     np.sort(rng.choice(NUM_PATCHES, k, replace=False)).astype(np.int64)) for k in lengths]


def matmul_peak(n: int = 8192, reps: int = 10) -> float:
    """bf16 FLOP/s of an n³ product (median of ``reps`` timed after 3 warm-ups)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    times = []
    for i in range(reps + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times)


def build_variants(args: argparse.Namespace, model: torch.nn.Module, mixes: dict[str, list[int]]) -> list[Variant]:
    from timm.models.vision_transformer import VisionTransformer

    assert isinstance(model, VisionTransformer)
    depth = args.depth
    fp32 = model.cuda()
    ready = autocast_ready_copy(fp32)
    bf16 = torch.autocast("cuda", dtype=torch.bfloat16)

    def packed(attention: AttentionImpl, m: Any = ready, amp: bool = True) -> Callable[[Batch], object]:
        def run(batch: Batch) -> object:
            if amp:
                with bf16:
                    return forward_packed(m, batch, attention=attention, shape_buckets=True)
            return forward_packed(m, batch, attention=attention, shape_buckets=True)
        return run

    def padded(length: int | None) -> Callable[[Batch], object]:
        def run(batch: Batch) -> object:
            with bf16:
                return forward_padded(ready, batch, length)
        return run

    def one_by_one(amp: bool = True) -> Callable[[Batch], object]:
        def run(batch: Batch) -> object:
            if amp:
                with bf16:
                    return forward_sequential(ready, batch)
            return forward_sequential(fp32, batch)
        return run

    loaded = LoadedModel(model=copy.deepcopy(fp32).cpu(), name="deit_base", class_names=[],
                         preprocess=Preprocess(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    engine = ServerEngine(loaded, BatchingConfig(max_batch=args.big_batch, max_tokens=args.big_tokens),
                          "bf16", device="cuda")

    pageable = ServerEngine(loaded, BatchingConfig(max_batch=args.big_batch, max_tokens=args.big_tokens),
                            "bf16", device="cuda")
    pageable.pin_host_memory = False

    def engine_run(batch: Batch) -> object:
        return engine.logits(batch)

    def pageable_run(batch: Batch) -> object:
        return pageable.logits(batch)

    flash: AttentionImpl = "varlen" if varlen_available() else "sdpa"
    out: list[Variant] = []
    mb, mt, bb, bt, b = args.max_batch, args.max_tokens, args.big_batch, args.big_tokens, args.batch
    for mix, lengths in mixes.items():
        sets = common.make_sets(lengths, 768, seed=args.seed, device="cuda")
        flops = common.model_flops(lengths, depth)

        def variant(key: str, what: str, batches: list[Batch], run: Callable[[Batch], object],
                    mix: str = mix, flops: float = flops, n: int = len(lengths)) -> Variant:
            return Variant(key, mix, what, batches, run, images=n, flops=flops)

        out += [
            variant("packed", f"packed, flash attention per block, caps {mb}/{mt}", planned(sets, mb, mt),
                    packed(flash)),
            variant("packed-big", f"packed, flash attention per block, caps {bb}/{bt}", planned(sets, bb, bt),
                    packed(flash)),
            variant("one-by-one", "one request at a time, bf16", [[s] for s in sets], one_by_one()),
        ]
        if mix == "full":
            continue
        eq = common.make_sets(common.equal_lengths(lengths), 768, seed=args.seed + 1, device="cuda")
        out += [
            variant("equal", f"equal lengths, same total tokens, packed, caps {bb}/{bt}", planned(eq, bb, bt),
                    packed(flash)),
            variant("packed-sdpa", f"packed, one SDPA call per set, caps {bb}/{bt}", planned(sets, bb, bt),
                    packed("sdpa")),
            variant("pad197", f"FIFO batches of {b} padded to 197", fifo(sets, b), padded(NUM_PATCHES)),
            variant("padmax", f"FIFO batches of {b} padded to their longest", fifo(sets, b), padded(None)),
            variant("packed-b32", f"packed, flash attention, FIFO batches of {b} (MFU at batch {b})",
                    fifo(sets, b), packed(flash)),
            variant("pad197-big", f"FIFO batches of {bb} padded to 197", fifo(sets, bb), padded(NUM_PATCHES)),
            variant("padded-policy", f"plan_batches({bb}, {bt}, pad_to_max), padded to the batch's longest "
                    "(the padded policy)", planned(sets, bb, bt, pad_to_max=True), padded(None)),
            variant("engine", f"ServerEngine on cuda from uint8 patches, caps {bb}/{bt}",
                    planned_patch_sets(patch_sets(lengths, args.seed), bb, bt), engine_run),
        ]
        if mix == "paper":
            hb, ht = 4 * bb, 4 * bt
            out += [
                variant("engine-pageable", "same, pixels copied from pageable memory",
                        planned_patch_sets(patch_sets(lengths, args.seed), bb, bt), pageable_run),
                variant("packed-huge", f"packed, flash attention per block, caps {hb}/{ht}", planned(sets, hb, ht),
                        packed(flash)),
                variant("packed-padattn", f"packed, attention as one masked SDPA over padded Q/K/V, caps {bb}/{bt}",
                        planned(sets, bb, bt), packed("padded")),
                variant("packed-fp32", f"packed fp32 (padded attention: auto for fp32 on CUDA), caps {bb}/{bt}",
                        planned(sets, bb, bt), packed("padded", fp32, amp=False)),
                variant("one-by-one-fp32", "one request at a time, fp32", [[s] for s in sets], one_by_one(False)),
            ]
    return out


def planned_patch_sets(sets: list[PatchSet], max_batch: int, max_tokens: int) -> list[Batch]:
    from shared.packing import plan_batches

    groups = plan_batches([int(s.patches.shape[0]) for s in sets], max_batch, max_tokens)
    return [[sets[i] for i in g] for g in groups]


def ratio(variants: dict[tuple[str, str], Variant], a: tuple[str, str], b: tuple[str, str]) -> float | None:
    if a not in variants or b not in variants:
        return None
    return common.paired(variants[a], variants[b])


def report(variants: list[Variant], peak: float, args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
    by = {(v.mix, v.key): v for v in variants}
    print("\n| mix | variant | images/s | tokens/s (real) | MFU | what |\n|---|---|---|---|---|---|")
    rows = []
    for v in variants:
        mfu = v.flops * v.rate() / v.images / peak
        tokens = sum(int(t.shape[0]) + 1 if isinstance(t, torch.Tensor) else int(t.patches.shape[0]) + 1
                     for b in v.batches for t in b)
        print(f"| {v.mix} | {v.key} | {v.rate():,.0f} | {tokens * v.rate() / v.images:,.0f} | {mfu:.0%} | {v.what} |")
        rows.append({"mix": v.mix, "key": v.key, "what": v.what, "images_s": v.rate(), "mfu": mfu,
                     "walls": v.walls})
    checks = [
        ("length-aware ÷ equal-length, paper", ("paper", "packed-big"), ("paper", "equal"), 0.85),
        ("  same, ~32 % kept", ("keep32", "packed-big"), ("keep32", "equal"), 0.85),
        ("packed (GPU caps) ÷ one-by-one, paper", ("paper", "packed-big"), ("paper", "one-by-one"), 3.0),
        ("  same, ~32 % kept", ("keep32", "packed-big"), ("keep32", "one-by-one"), 3.0),
        ("  same, zoo", ("zoo", "packed-big"), ("zoo", "one-by-one"), 3.0),
        ("packed (CPU caps 32/2048) ÷ one-by-one, paper", ("paper", "packed"), ("paper", "one-by-one"), 3.0),
        ("bf16 ÷ fp32, packed, paper", ("paper", "packed-big"), ("paper", "packed-fp32"), 2.0),
        ("~32 % kept ÷ full image, packed (GPU caps)", ("keep32", "packed-big"), ("full", "packed-big"), 2.5),
        ("flash per block ÷ SDPA per set, paper", ("paper", "packed-big"), ("paper", "packed-sdpa"), None),
        ("flash per block ÷ one masked SDPA over padded Q/K/V, paper", ("paper", "packed-big"),
         ("paper", "packed-padattn"), None),
        ("packed ÷ the padded policy, GPU caps, paper", ("paper", "packed-big"), ("paper", "padded-policy"), None),
        ("  same, ~32 % kept", ("keep32", "packed-big"), ("keep32", "padded-policy"), None),
        ("packed ÷ padded to 197, GPU caps, paper", ("paper", "packed-big"), ("paper", "pad197-big"), None),
        ("  same, ~32 % kept", ("keep32", "packed-big"), ("keep32", "pad197-big"), None),
        ("4× the GPU caps ÷ GPU caps, packed, paper", ("paper", "packed-huge"), ("paper", "packed-big"), None),
        ("engine: pinned ÷ pageable pixel copies, paper", ("paper", "engine"), ("paper", "engine-pageable"), None),
        ("GPU caps ÷ CPU caps, packed, paper", ("paper", "packed-big"), ("paper", "packed"), None),
        ("packed ÷ padded to batch max (FIFO 32), paper", ("paper", "packed-b32"), ("paper", "padmax"), None),
        ("packed ÷ padded to 197 (FIFO 32), paper", ("paper", "packed-b32"), ("paper", "pad197"), None),
        ("engine (whole GPU path) ÷ packed model forward, paper", ("paper", "engine"), ("paper", "packed-big"), None),
        ("packed bf16 ÷ official fp32 loop, paper", ("paper", "packed-big"), ("paper", "one-by-one-fp32"), None),
    ]
    print("\n| ratio (median of per-round ratios) | value | target |\n|---|---|---|")
    ratios = {}
    for name, a, b, target in checks:
        value = ratio(by, a, b)
        if value is None:
            continue
        ratios[name.strip()] = value
        mark = "" if target is None else (" PASS" if value >= target else " MISS")
        shown = f"{value:.0%}" if target == 0.85 else f"{value:.2f}×"
        print(f"| {name} | {shown} | {'' if target is None else target}{mark} |")
    b32 = by.get(("paper", "packed-b32"))
    if b32 is not None:
        print(f"\nMFU at batch {args.batch} (paper mix): {b32.flops * b32.rate() / b32.images / peak:.0%} "
              f"of the {peak / 1e12:.0f} TFLOP/s bf16 matmul peak")
    return {"info": info, "peak_flops": peak, "variants": rows, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Needs a CUDA GPU. See docs/benchmarks.md for results.")
    p.add_argument("--requests", type=int, default=1024, help="requests per mix (default 1024)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--batch", type=int, default=32, help="FIFO batch of the padded baselines and MFU (default 32)")
    p.add_argument("--max-batch", type=int, default=32, help="CPU worker caps: requests (default 32)")
    p.add_argument("--max-tokens", type=int, default=2048, help="CPU worker caps: tokens (default 2048)")
    p.add_argument("--big-batch", type=int, default=1024, help="GPU-sized caps: requests (default 1024)")
    p.add_argument("--big-tokens", type=int, default=32768, help="GPU-sized caps: tokens (default 32768)")
    p.add_argument("--zoo-fractions", type=Path, help="JSON list of kept fractions for the zoo mix "
                   "(default: computed from the CIFAR-10 test data if present)")
    p.add_argument("--zoo-images", type=int, default=1000, help="CIFAR-10 images for the zoo mix (default 1000)")
    p.add_argument("--save-zoo-fractions", type=Path, help="write the zoo mix's kept fractions here and exit")
    p.add_argument("--depth", type=int, default=12, help="blocks (12 = DeiT-Base; fewer only for smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)

    if args.save_zoo_fractions:
        fractions, how = common.zoo_fractions(args.zoo_images)
        if fractions is None:
            print(f"error: {how}", file=sys.stderr)
            return 1
        args.save_zoo_fractions.write_text(json.dumps({"source": how, "fractions": fractions.round(4).tolist()}))
        print(f"{how} → {args.save_zoo_fractions}")
        return 0
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU (bench/model_throughput.py measures the CPU)", file=sys.stderr)
        return 1
    rng = np.random.default_rng(args.seed)
    r = args.requests
    mixes = {"paper": common.beta_lengths(rng, r, 9.0, 3.0), "keep32": common.beta_lengths(rng, r, 6.6, 14.0)}
    if args.zoo_fractions:
        data = json.loads(args.zoo_fractions.read_text())
        fractions, how = np.asarray(data["fractions"]), data["source"]
    else:
        fractions, how = common.zoo_fractions(args.zoo_images)
    if fractions is not None:
        mixes["zoo"] = [int(v) for v in np.clip(np.rint(rng.choice(fractions, r) * NUM_PATCHES), 1, NUM_PATCHES)]
    common.log(f"zoo mix: {how if fractions is not None else 'skipped: ' + how}")
    mixes["full"] = [NUM_PATCHES] * r
    import timm

    info = {**machine_info(), "gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
            "varlen": varlen_available(),
            "command": " ".join(["python", "bench/gpu_worker.py", *(argv or sys.argv[1:])])}
    for name, lengths in mixes.items():
        common.log(f"mix {name}: {len(lengths)} requests, patch tokens mean {np.mean(lengths):.1f}")
    model = timm.create_model("deit_base_patch16_224", pretrained=False, depth=args.depth).eval()
    variants = build_variants(args, model, mixes)
    peak = matmul_peak()
    common.log(f"{len(variants)} variants × {args.rounds} rounds on {info['gpu']}; "
               f"bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    common.measure(variants, args.rounds, common.log, sync=torch.cuda.synchronize)
    print(f"\nmachine: {info['gpu']}, torch {info['torch']} (CUDA {info['cuda']}), varlen flash attention "
          f"{'yes' if info['varlen'] else 'no'}\ncommand: {info['command']}")
    result = report(variants, peak, args, info)
    common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
