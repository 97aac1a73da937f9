"""``patchcast worker``: one inference worker of a pool (shared MQTT subscription)."""

from __future__ import annotations

import argparse
from typing import NoReturn

from patchcast.commands.common import add_broker_args, add_log_args, load
from shared.precision import PRECISION_SETTINGS


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "worker", help="run one inference worker: server ViT on received patches, replies over MQTT",
        description="Run one inference worker. It joins the worker pool '$share/GROUP/patchcast/v1/req/MODEL/+' "
        "(the broker hands each request to one pool member), batches requests dynamically (closes at "
        "--max-batch requests, --max-tokens tokens or --max-delay-ms after the first), runs the server ViT "
        "in one inference thread on the CPU (bf16 where it measures faster than fp32) or a CUDA GPU "
        "(--device; the model then runs in a child process, see --engine-process) and publishes each reply to the "
        "request's response topic. Retained availability (online; offline as last will) and a WorkerMetrics "
        "message every worker.metrics_interval_s. SIGTERM/SIGINT: stop taking work, answer what is queued "
        "within worker.shutdown_grace_s, publish offline, exit 0.")
    add_broker_args(p)
    add_log_args(p)
    p.add_argument("--server-model", help="server model: zoo:NAME, timm:NAME or file:PATH.safetensors "
                   "(default: models.server)")
    p.add_argument("--model-id", help="model id in request topics (default: derived from the server model; "
                   "devices must use the same)")
    p.add_argument("--group", help="shared-subscription group (default: worker.group)")
    p.add_argument("--worker-id", help="worker id in topics and logs (default: host name + pid)")
    p.add_argument("--max-batch", type=int, help="batch closes at this many requests (batching.max_batch)")
    p.add_argument("--max-tokens", type=int, help="… or this many tokens, CLS included (batching.max_tokens)")
    p.add_argument("--max-delay-ms", type=float, help="… or this long after its first request (batching.max_delay_ms)")
    p.add_argument("--policy", choices=["packed", "padded", "sequential"], help="batched forward (batching.policy)")
    p.add_argument("--queue-capacity", type=int, help="bounded queue; beyond it 'busy' replies (worker.queue_capacity)")
    p.add_argument("--threads", type=int, help="torch threads for inference, 0 = all cores (worker.threads)")
    p.add_argument("--precision", choices=PRECISION_SETTINGS, help="worker.precision")
    p.add_argument("--device", help="cpu, cuda or cuda:N: where the server model runs (worker.device)")
    p.add_argument("--engine-process", choices=["auto", "on", "off"],
                   help="run the server model in a child process, away from the event loop's GIL; auto: on for "
                        "CUDA (worker.engine_process)")
    p.add_argument("--frontends", type=int,
                   help="worker processes sharing one engine process, which runs their waiting batches as one "
                        "forward (needs the engine process; worker.frontends)")
    p.add_argument("--decode-processes", type=int,
                   help="decode patch payloads in this many child processes, 0 = in threads (worker.decode_processes)")
    p.add_argument("--region-threshold", type=float,
                   help="region exchanges: ask for a region when the glance's min-entropy is at least this "
                   "(region.threshold)")
    p.add_argument("--top-up-threshold", type=float,
                   help="top-up exchanges: ask a device that offers more patches for them when the min-entropy on "
                   "the sent ones is at least this (region.top_up_threshold)")
    p.add_argument("--region-fusion", choices=["image", "probs", "image+probs"],
                   help="region exchanges: how the region is combined with the glance (region.fusion)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (worker.metrics_port)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from inference_worker.service import run_worker
    from shared.logs import configure

    cfg = load(args,
               models={"server": args.server_model, "model_id": args.model_id},
               worker={"group": args.group, "worker_id": args.worker_id, "queue_capacity": args.queue_capacity,
                       "threads": args.threads, "precision": args.precision, "metrics_port": args.metrics_port,
                       "device": args.device, "engine_process": args.engine_process,
                       "decode_processes": args.decode_processes, "frontends": args.frontends},
               batching={"max_batch": args.max_batch, "max_tokens": args.max_tokens,
                         "max_delay_ms": args.max_delay_ms, "policy": args.policy},
               region={"threshold": args.region_threshold, "fusion": args.region_fusion,
                       "top_up_threshold": args.top_up_threshold})
    configure(cfg.logging.format, cfg.logging.level)
    if cfg.worker.frontends > 1:
        from inference_worker.frontends import run_frontends

        return run_frontends(cfg)
    asyncio.run(run_worker(cfg))
    exit_now(0)


def exit_now(code: int, children_wait_s: float = 5.0) -> NoReturn:
    """Leave the process without the interpreter's teardown, once the worker has stopped.

    By then the worker has closed what it owns: answered or refused its queue, published offline,
    disconnected, joined its engine process and unlinked its shared memory. What is left is
    finalising a few thousand modules (torch, timm and their imports): ~1 s on an idle 2-core host and
    several seconds on a busy one, during which a supervisor or an orchestrator waits on a process
    that has nothing left to do. Child processes still winding down (the pixel decoders) are joined
    first, so none is orphaned; output is flushed.
    """
    import contextlib
    import logging
    import multiprocessing
    import os
    import sys
    import time

    deadline = time.monotonic() + children_wait_s
    for child in multiprocessing.active_children():
        child.join(max(0.0, deadline - time.monotonic()))
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
