"""A serving worker's stream of batches: oneDNN kernels built per matrix shape, and the memory they keep.

    .venv/bin/python bench/shapes.py             # DeiT-Base, 960 fresh requests per child, 2 rounds (~5 min)
    .venv/bin/python bench/shapes.py --quick     # 4 blocks, 192 requests, 1 round (smoke run)

oneDNN builds (JIT-compiles) a kernel for every new matrix shape and keeps it in a per-process
cache of 1,024 kernels (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``), each holding buffers that grow with
the shape's row count. A worker's packed batches hold a different number of tokens almost every
time, so without care every batch builds new kernels (slower than running them) and the cache
fills with large ones. ``bench/model_throughput.py`` cannot show this: it repeats its workloads,
so after the first round every shape is cached.

Here every child process serves a stream of **fresh** requests (the ``paper`` mix: ~147 of 196
patches kept, each request drawn anew) through the worker's own engine
(:class:`inference_worker.engine.ServerEngine`: patch embedding, packed bf16 forward, default caps),
32 requests at a time cut into batches by :func:`shared.packing.plan_batches`, as a busy worker's
batcher would. Settings (``worker.prepack_weights`` × ``batching.shape_buckets``):

* ``worker``: both on, the worker's defaults;
* ``no-buckets``: prepacked weights, token counts as they come;
* ``no-prepack``: shape buckets, plain bf16-stored weights;
* ``before``: neither (the worker before both existed).

Each child reports images/s over the first and the second half of its stream, its resident memory
(RSS) after model set-up, after each half, and its peak. One child per setting per round, settings
alternated, figures are medians over rounds. Random weights (compute does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from shared.machine import cpu_name

SETTINGS: dict[str, tuple[bool, bool]] = {  # name: (prepack_weights, shape_buckets)
    "worker": (True, True), "no-buckets": (True, False), "no-prepack": (False, True), "before": (False, False)}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(setting: str, args: argparse.Namespace) -> dict[str, Any]:
    """Serve the stream in this process and return its figures."""
    from shared.heap import retain_freed_memory

    retain_freed_memory()  # as the worker does, before any tensor exists
    import numpy as np
    import timm
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from inference_worker.engine import PatchSet, ServerEngine
    from shared.config import BatchingConfig
    from shared.models import LoadedModel, Preprocess
    from shared.packing import plan_batches

    torch.set_num_threads(args.threads)
    prepack, buckets = SETTINGS[setting]
    model = timm.create_model("deit_base_patch16_224", pretrained=False, depth=args.depth).eval()
    assert isinstance(model, VisionTransformer)
    loaded = LoadedModel(model=model, name="deit_base_patch16_224", preprocess=Preprocess.from_timm(model),
                         class_names=[])
    batching = BatchingConfig(shape_buckets=buckets)
    engine = ServerEngine(loaded, batching, "bf16", prepack=prepack)
    n, p = loaded.num_patches, loaded.patch_size
    rng = np.random.default_rng(args.seed)  # the same stream for every setting

    def request() -> PatchSet:
        k = int(np.clip(np.rint(rng.beta(9.0, 3.0) * n), 1, n))
        idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
        return PatchSet(rng.integers(0, 256, size=(k, p, p, 3), dtype=np.uint8), idx)

    windows = [[request() for _ in range(32)] for _ in range(args.requests // 32 + 1)]
    warm, stream = windows[0], windows[1:]

    def serve(window: list[PatchSet]) -> None:
        for batch in plan_batches([s.tokens - 1 for s in window], batching.max_batch, batching.max_tokens):
            engine.logits([window[i] for i in batch])

    serve(warm)
    rss_start = rss_mib()
    half = len(stream) // 2
    times: list[float] = []
    rss_half = 0.0
    for part in (stream[:half], stream[half:]):
        t0 = time.perf_counter()
        for window in part:
            serve(window)
        times.append(time.perf_counter() - t0)
        rss_half = rss_half or rss_mib()
    return {"setting": setting, "prepacked": engine.prepacked,
            "images_per_s_first_half": 32 * half / times[0],
            "images_per_s_second_half": 32 * (len(stream) - half) / times[1],
            "rss_after_setup_mib": rss_start, "rss_half_mib": rss_half, "rss_end_mib": rss_mib(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 blocks, 192 requests, 1 round")
    ap.add_argument("--requests", type=int, default=None, help="fresh requests per child (default 960; quick 192)")
    ap.add_argument("--rounds", type=int, default=None, help="children per setting (default 2; quick 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=None, help="blocks (12 = DeiT-Base; quick 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--json", type=Path, default=None, help="write all figures here")
    ap.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.requests = args.requests or (192 if args.quick else 960)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.depth = args.depth or (4 if args.quick else 12)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0

    passed = ["--requests", str(args.requests), "--threads", str(args.threads), "--depth", str(args.depth),
              "--seed", str(args.seed)]
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in args.settings}
    for r in range(args.rounds):
        order = args.settings[r % len(args.settings):] + args.settings[:r % len(args.settings)]
        for setting in order:
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--child", setting, *passed], capture_output=True,
                                  text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            results[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"[round {r + 1}/{args.rounds}] {setting}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    def med(setting: str, key: str) -> float:
        return float(statistics.median(x[key] for x in results[setting]))

    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores, "
          f"{args.threads} threads; {args.requests} fresh requests per child (paper mix), DeiT-Base shape "
          f"with {args.depth} blocks, bf16, {args.rounds} round(s)")
    print(f"command: python bench/shapes.py {' '.join(sys.argv[1:])}\n")
    print("| setting | prepacked | shape buckets | images/s, 1st half | images/s, 2nd half | RSS after set-up, MiB "
          "| growth over the 1st half, MiB | over the 2nd half, MiB | RSS at the end, MiB | peak RSS, MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in args.settings:
        prepack, buckets = SETTINGS[s]
        a, h, b = med(s, "rss_after_setup_mib"), med(s, "rss_half_mib"), med(s, "rss_end_mib")
        print(f"| {s} | {prepack and all(x['prepacked'] for x in results[s])} | {buckets} "
              f"| {med(s, 'images_per_s_first_half'):.2f} | {med(s, 'images_per_s_second_half'):.2f} "
              f"| {a:,.0f} | {h - a:+,.0f} | {b - h:+,.0f} | {b:,.0f} | {med(s, 'peak_rss_mib'):,.0f} |")
    if "worker" in results:
        print()
        for s in args.settings:
            if s != "worker":
                ratio = statistics.median(w["images_per_s_second_half"] / o["images_per_s_second_half"]
                                          for w, o in zip(results["worker"], results[s], strict=True))
                print(f"- worker ÷ {s}, images/s over the 2nd half (median of per-round ratios): {ratio:.2f}×")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
