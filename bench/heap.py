"""What the worker process's set-up is worth: glibc's heap settings and one thread for all torch work.

    .venv/bin/python bench/heap.py                   # DeiT-Base shape, paper mix, 3 rounds (~6 min)
    .venv/bin/python bench/heap.py --quick           # 2 rounds, 16 requests, 4 blocks (smoke run)

The same forwards in fresh child processes set up three ways:

* ``default``: glibc's malloc defaults; the model built and run on one inference thread;
* ``retained``: :func:`shared.heap.retain_freed_memory` at start-up, model built and run on one
  inference thread: **what the worker does** (``worker.retain_heap``, ``inference_pool``);
* ``retained-2threads``: the heap settings, but the model built on the main thread and run on a
  second thread: what the worker did before (two OpenMP teams alive, more OpenMP threads than
  cores, so libgomp stops spinning at barriers). Packed workload only.

mallopt settings and OpenMP teams cannot be undone inside a process, so every measurement is its own
child process (``--child KIND --workload W``); a process that ran one workload has also moved
glibc's dynamic mmap threshold, which would hide the default's cost from the next (the worker runs
one precision and one policy all its life). The parent alternates the kinds, ``--rounds`` times,
and prints images/s and each child's peak resident memory (medians over rounds) and per-round
ratios (median over rounds).

Workloads, as in ``bench/model_throughput.py`` (same seed, same ``paper`` mix: ~147 of 196 patches
kept, 32 requests): ``packed``, the worker's packed bf16 forward under its default caps
(``plan_batches(32, 2048)``, matrix weights stored in bf16, autocast); ``one-by-one``, one request
at a time with the same weights; ``packed-fp32``. Each child warms up once, times its workload
``--reps`` times and reports the median.
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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench.common import beta_lengths, make_sets, planned
from shared.machine import cpu_name

KINDS = ("default", "retained", "retained-2threads")
WORKLOADS = ("packed", "one-by-one", "packed-fp32")


def plan(workload: str) -> tuple[str, ...]:
    """The kinds measured for a workload (the thread comparison only where the worker runs: packed)."""
    return KINDS if workload == "packed" else KINDS[:2]


def child(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    from shared.heap import retain_freed_memory

    settings = retain_freed_memory() if kind != "default" else None  # before any tensor exists
    import timm
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from shared.packing import autocast_ready_copy, forward_packed, forward_sequential

    torch.set_num_threads(args.threads)
    state: dict[str, Any] = {}

    def setup() -> None:
        torch.manual_seed(args.seed)
        model = timm.create_model("deit_base_patch16_224", pretrained=False, depth=args.depth).eval()
        assert isinstance(model, VisionTransformer)
        lengths = beta_lengths(np.random.default_rng(args.seed), args.requests, 9.0, 3.0)
        sets = make_sets(lengths, int(model.embed_dim), seed=args.seed)
        state.update(model=model, ready=autocast_ready_copy(model), sets=sets, batches=planned(sets, 32, 2048))

    def packed_bf16() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for b in state["batches"]:
                forward_packed(state["ready"], b)

    def one_by_one_bf16() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            forward_sequential(state["ready"], state["sets"])

    def packed_fp32() -> None:
        for b in state["batches"]:
            forward_packed(state["model"], b)

    run: Callable[[], None] = {"packed": packed_bf16, "one-by-one": one_by_one_bf16,
                               "packed-fp32": packed_fp32}[args.workload]
    walls: list[float] = []

    def timed() -> None:
        with torch.inference_mode():
            run()  # warm-up: oneDNN primitives, autocast
            for _ in range(args.reps):
                t0 = time.perf_counter()
                run()
                walls.append(time.perf_counter() - t0)

    if kind == "retained-2threads":
        setup()  # on the main thread, which keeps its OpenMP team
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-infer") as pool:
        if kind != "retained-2threads":
            pool.submit(setup).result()
        pool.submit(timed).result()
    return {"kind": kind, "workload": args.workload, "applied": bool(settings and settings.applied),
            "reason": settings.reason if settings else "glibc defaults",
            "images_per_s": len(state["sets"]) / statistics.median(walls),
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(kind: str, workload: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--workload", workload,
           "--reps", str(args.reps), "--threads", str(args.threads),
           "--requests", str(args.requests), "--depth", str(args.depth), "--seed", str(args.seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child {kind}/{workload} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds, each measuring every kind (default 3; quick 2)")
    p.add_argument("--requests", type=int, default=32, help="requests in the paper mix (default 32; quick 16)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--depth", type=int, default=12, help="blocks (12 = DeiT-Base; quick 4)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per child, median kept (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 rounds, 16 requests, 4 blocks")
    p.add_argument("--json", type=Path, help="write every round's figures as JSON")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--workload", choices=WORKLOADS, default="packed", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.depth = 2, min(args.requests, 16), 4
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0

    rounds: list[dict[str, dict[str, float]]] = []
    rss: dict[tuple[str, str], list[float]] = {}
    reason = ""
    for r in range(args.rounds):
        figures: dict[str, dict[str, float]] = {kind: {} for kind in KINDS}
        for workload in WORKLOADS:
            kinds = plan(workload)
            shift = r % len(kinds)  # rotate the order: the machine drifts within minutes
            for kind in kinds[shift:] + kinds[:shift]:
                result = run_child(kind, workload, args)
                figures[kind][workload] = float(result["images_per_s"])
                rss.setdefault((kind, workload), []).append(float(result["max_rss_mib"]))
                if kind == "retained":
                    reason = str(result["reason"])
        rounds.append(figures)
        print(f"[{time.strftime('%H:%M:%S')}] round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    def ratio(a: str, b: str, workload: str) -> float:
        return statistics.median(x[a][workload] / x[b][workload] for x in rounds)

    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores, "
          f"{args.threads} threads, DeiT-Base shape depth {args.depth}, paper mix of {args.requests} requests, "
          f"{args.rounds} rounds")
    print(f"retained: {reason}\n")
    print("| workload | " + " | ".join(f"{k}, images/s (peak RSS)" for k in KINDS) + " | retained ÷ default |")
    print("|---|" + "---|" * (len(KINDS) + 1))
    ratios: dict[str, float] = {}
    for workload in WORKLOADS:
        cells = [f"{statistics.median(x[k][workload] for x in rounds):.2f} "
                 f"({statistics.median(rss[(k, workload)]):.0f} MiB)" if k in plan(workload) else ""
                 for k in KINDS]
        ratios[f"{workload}: retained ÷ default"] = ratio("retained", "default", workload)
        print(f"| {workload} | " + " | ".join(cells) + f" | {ratios[f'{workload}: retained ÷ default']:.2f}× |")
    ratios["packed: one thread ÷ two threads (both retained)"] = ratio("retained", "retained-2threads", "packed")
    for kind in KINDS[:2]:
        ratios[f"packed ÷ one-by-one, {kind}"] = statistics.median(
            x[kind]["packed"] / x[kind]["one-by-one"] for x in rounds)
    print()
    for key, value in ratios.items():
        print(f"- {key}: {value:.2f}×")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "ratios": ratios, "threads": args.threads,
                                         "max_rss_mib": {f"{k}/{w}": v for (k, w), v in rss.items()},
                                         "requests": args.requests, "depth": args.depth}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
