"""``patchcast edge``: a fleet of simulated edge devices (one process, one shared edge model)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from patchcast.commands.common import add_broker_args, add_log_args, load

FAST_EXIT_DEVICES = 1000  # fleets this large end their process without the interpreter's teardown


def exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown. Thousands of devices' clients, sockets and
    tasks take seconds to free one by one (measured: 2.5 s of a 5,000-device fleet's stop), and none of
    them needs it: the summary is written and every connection is closed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "edge", help="simulate N edge devices: edge ViT, gate, patch selection, requests over MQTT",
        description="Run N simulated devices. Each has its own MQTT client id and reply topic "
        "and walks the image source from its own offset (device i of N starts at i/N of it and wraps), so that "
        "devices send different images at once; each sends --limit images (0: the whole source, so N devices "
        "make N passes over it). They share one edge model, batched across devices in "
        "one thread. Per image: edge ViT → gate (send when uncertainty ≥ η) → select patches → encode → "
        "publish → await the reply (timeout → keep the edge label). Prints a JSON summary at the end "
        "(images, sent fraction, patch fraction, bytes, accuracy edge-only/collaborative when labels are "
        "known, latency percentiles, timeouts, errors) and a 'fleet' section: devices connected and not, "
        "connect time, images abandoned at a stop, memory per device. Devices connect staggered "
        "(--connect-concurrency at once, each under its own connect timeout); a device that never connects is "
        "counted, not waited for. SIGTERM/SIGINT: stop sending and print the summary within seconds. "
        "--processes N splits the devices over N child fleets and merges their summaries.")
    add_broker_args(p)
    add_log_args(p)
    p.add_argument("--devices", type=int, help="simulated devices (edge.devices)")
    p.add_argument("--credentials", metavar="FILE", help="per-device logins, 'ID PASSWORD' lines from 'patchcast "
                   "broker add-device --credentials-out' (edge.credentials_file)")
    p.add_argument("--rate", type=float, help="images per second per device, 0 = as fast as replies allow "
                   "(edge.rate_hz)")
    p.add_argument("--source", help="images: folder, ImageFolder tree, tar, labels.csv folder or one file; "
                   "relative paths resolve under $PATCHCAST_DATA (edge.source)")
    p.add_argument("--duration", type=float, help="seconds to run, looping over the source (edge.duration_s)")
    p.add_argument("--limit", type=int, help="images per device (edge.limit; 0 = the whole source)")
    p.add_argument("--max-in-flight", type=int, help="requests awaiting a reply per device (edge.max_in_flight)")
    p.add_argument("--reply-timeout", type=float, help="seconds one attempt waits for its reply before the re-send "
                   "(edge.reply_timeout_s)")
    p.add_argument("--retries", type=int, help="re-sends, same request id, after a reply timeout or 'busy' "
                   "(edge.retries)")
    p.add_argument("--deadline", type=float, help="seconds from an image's first publish until it keeps the edge "
                   "label (edge.deadline_s; 0: (retries + 1) × reply timeout)")
    p.add_argument("--edge-model", help="edge model reference (models.edge)")
    p.add_argument("--server-model", help="server model reference, only to derive the topic's model id "
                   "(models.server)")
    p.add_argument("--model-id", help="model id in request topics (models.model_id)")
    p.add_argument("--threshold", type=float, help="gate threshold η (gate.threshold)")
    p.add_argument("--rule", choices=["topk", "threshold", "sum_threshold", "random_k"], help="selection.rule")
    p.add_argument("--value", type=float, help="selection.value (k, δ or δ_sum)")
    p.add_argument("--spread", type=int, metavar="C", help="keep the rule's count of patches spread over C×C cells "
                   "of the grid, the best of each cell first (selection.spread; 0: the highest-scoring, the paper's)")
    p.add_argument("--experts", metavar="'ID=C,C,…; ID=…'",
                   help="expert routing table (routing.experts): each sent image goes to the pool whose classes "
                   "hold the most of the edge's top-k probability mass, else to --model-id")
    p.add_argument("--offload", choices=["patches", "region", "top_up"],
                   help="patches: the attention-chosen patches; region: a downsampled glance, then the "
                   "full-resolution region the worker asks for (edge.offload; see [region] in the config); "
                   "top_up: the patches with an offer of more (--offer-rule), sent if the worker asks")
    p.add_argument("--offer-rule", choices=["topk", "threshold", "sum_threshold", "all"],
                   help="top-up offload: the larger selection offered (selection.offer_rule)")
    p.add_argument("--offer-value", type=float, help="top-up offload: k, δ or δ_sum of --offer-rule "
                   "(selection.offer_value)")
    p.add_argument("--downscale", type=int, help="region offload: glance downsampling factor (region.downscale)")
    p.add_argument("--codec", help="patch codec (codec.name)")
    p.add_argument("--quality", type=int, help="codec quality (codec.quality)")
    p.add_argument("--no-outcomes", action="store_true", help="do not publish a per-image Outcome message")
    p.add_argument("--processes", type=int, help="fleet processes that split the devices, each with its own event "
                   "loop and sockets (edge.processes; 0, the default: as few as the file-descriptor limit allows)")
    p.add_argument("--connect-concurrency", type=int, help="devices connecting at once; each gets "
                   "broker.connect_timeout_s from its own start (edge.connect_concurrency)")
    p.add_argument("--random-phase", action="store_true", default=None,
                   help="each device sends its first image at a random point of its first 1/rate interval "
                   "(edge.random_phase): a large fleet at a low per-device rate spreads its load")
    p.add_argument("--device-offset", type=int, help=argparse.SUPPRESS)  # set per child by --processes
    p.add_argument("--summary", type=Path, help="also write the JSON summary to this file")
    p.add_argument("--outcomes-jsonl", type=Path, help="write every outcome record as JSON lines")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    from dataclasses import asdict

    from edge_node.fleet import devices_per_process, run_fleet
    from edge_node.processes import run_processes
    from shared.logs import configure

    cfg = load(args,
               edge={"devices": args.devices, "rate_hz": args.rate, "source": args.source,
                     "duration_s": args.duration, "limit": args.limit, "max_in_flight": args.max_in_flight,
                     "reply_timeout_s": args.reply_timeout, "retries": args.retries, "deadline_s": args.deadline,
                     "publish_outcomes": False if args.no_outcomes else None, "offload": args.offload,
                     "credentials_file": args.credentials, "processes": args.processes,
                     "connect_concurrency": args.connect_concurrency, "random_phase": args.random_phase,
                     "device_offset": args.device_offset},
               region={"downscale": args.downscale},
               models={"edge": args.edge_model, "server": args.server_model, "model_id": args.model_id},
               gate={"threshold": args.threshold},
               selection={"rule": args.rule, "value": args.value, "offer_rule": args.offer_rule,
                          "offer_value": args.offer_value, "spread": args.spread},
               codec={"name": args.codec, "quality": args.quality},
               routing={"experts": args.experts})
    configure(cfg.logging.format, cfg.logging.level)
    processes = cfg.edge.processes or -(-cfg.edge.devices // devices_per_process())
    if processes > 1:
        summary, outcomes = asyncio.run(run_processes(cfg, processes, handle_signals=True))
    else:
        result = asyncio.run(run_fleet(cfg, handle_signals=True))
        summary, outcomes = result.summary, result.outcomes
    text = json.dumps(summary, indent=2)
    print(text)
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(text + "\n")
    if args.outcomes_jsonl:
        args.outcomes_jsonl.parent.mkdir(parents=True, exist_ok=True)
        with open(args.outcomes_jsonl, "w") as f:
            for record in outcomes:
                f.write(json.dumps(asdict(record)) + "\n")
    code = 0
    if summary["images"] == 0:
        print("patchcast edge: no image was processed", file=sys.stderr)
        code = 1
    if cfg.edge.devices >= FAST_EXIT_DEVICES:
        exit_now(code)
    return code
