"""``patchcast demo``: broker + autoscaled workers + simulated devices + live monitor, one command."""

from __future__ import annotations

import argparse
import sys

from patchcast.commands.common import add_broker_args, load


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run everything locally: broker, autoscaled workers, N devices, live monitor",
        description="Start a local Mosquitto on a free port, an autoscaled pool of inference workers, N "
        "simulated devices and the live monitor; run for --duration seconds, then print a summary table and "
        "write a JSON report (--report). Defaults: the offline zoo models zoo:imagenette-edge / "
        "zoo:imagenette-server on the Imagenette val photos (imagenette2/val.tar) at their measured operating point; "
        "--profile cifar10 runs the CIFAR-10 zoo on the CIFAR-10 test images; --profile deit uses timm "
        "DeiT-Tiny/Base and an image folder. Every child process is stopped on exit, error or Ctrl-C. Exit "
        "status 1 when a request was lost.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_broker_args(p)
    p.add_argument("--profile", choices=("imagenette", "cifar10", "deit"), default=None, help="demo.profile")
    p.add_argument("--edge", default=None, help="edge model reference (default: the profile's)")
    p.add_argument("--server", default=None, help="server model reference (default: the profile's)")
    p.add_argument("--source", default=None, help="images (default: the profile's; under $PATCHCAST_DATA)")
    p.add_argument("--pretrained", action="store_true", help="timm: load official pretrained weights")
    p.add_argument("--top-up", action="store_true",
                   help="devices send their patches with an offer of more, and a worker unsure on the first asks "
                   "for the rest (edge.offload = top_up; an extension of the paper's method, docs/service.md); "
                   "the imagenette profile runs at its measured top-up point, other models at the config's "
                   "selection, selection.offer_* and region.top_up_threshold")
    p.add_argument("--devices", type=int, default=None, help="demo.devices")
    p.add_argument("--rate", type=float, default=None, help="images per second per device (demo.rate_hz)")
    p.add_argument("--duration", type=float, default=None, help="seconds the devices send (demo.duration_s)")
    p.add_argument("--min-workers", type=int, default=None, help="scaler.min_workers")
    p.add_argument("--max-workers", type=int, default=None, help="scaler.max_workers")
    p.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--reply-timeout", type=float, default=15.0,
                   help="seconds a device waits for a reply (a request not answered by then counts as lost)")
    p.add_argument("--server-eval", type=int, default=None,
                   help="full images for the server-only reference accuracy (default: 256 imagenette and "
                   "cifar10, 0 deit)")
    p.add_argument("--metrics-port", type=int, default=0, help="scaler Prometheus endpoint (0: off)")
    p.add_argument("--headless", action="store_true", help="no live dashboard; progress as log lines")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--log-dir", default=None, help="child process logs (default: runs/demo-TIMESTAMP)")
    p.add_argument("--use-broker", action="store_true",
                   help="use the broker at --broker / broker.host:port instead of starting a local one")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import time
    from pathlib import Path

    from rich.console import Console

    from patchcast.demo import DemoOptions, profile_defaults, run_demo, summary_table
    from shared.logs import configure

    cfg = load(args, demo={"profile": args.profile, "devices": args.devices, "rate_hz": args.rate,
                           "duration_s": args.duration},
               scaler={"min_workers": args.min_workers, "max_workers": args.max_workers,
                       "metrics_port": args.metrics_port})
    prof = profile_defaults(cfg, cfg.demo.profile)
    log_dir = Path(args.log_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    log_dir.mkdir(parents=True, exist_ok=True)
    console = Console()
    # The dashboard owns the terminal: logs go to a file unless headless.
    if args.headless:
        configure(cfg.logging.format, cfg.logging.level)
    else:
        configure("json", cfg.logging.level, stream=(log_dir / "demo.log").open("a"))
    opts = DemoOptions(
        profile=cfg.demo.profile, edge=args.edge or prof.edge, server=args.server or prof.server,
        source=args.source or prof.source, devices=cfg.demo.devices, rate_hz=cfg.demo.rate_hz,
        duration_s=cfg.demo.duration_s, headless=args.headless,
        report=Path(args.report) if args.report else None, log_dir=log_dir,
        broker=f"{cfg.broker.host}:{cfg.broker.port}" if args.use_broker else None, config_file=args.config,
        worker_threads=args.worker_threads, reply_timeout_s=args.reply_timeout,
        server_eval=prof.server_eval if args.server_eval is None else args.server_eval,
        pretrained=args.pretrained,
        # the profile's operating point goes with its own models only
        selection=prof.selection if (args.edge, args.server) == (None, None) else None,
        top_up=args.top_up, top_up_point=prof.top_up if (args.edge, args.server) == (None, None) else None)
    report = asyncio.run(run_demo(cfg, opts, console))
    console.print(summary_table(report))
    text = json.dumps(report, indent=2)
    if opts.report is not None:
        opts.report.parent.mkdir(parents=True, exist_ok=True)
        opts.report.write_text(text + "\n")
        console.print(f"report: {opts.report}   logs: {log_dir}")
    if report["interrupted"]:
        return 130
    if report["images"] == 0 or report["lost_requests"] or report["unaccounted_images"]:
        print(f"patchcast demo: {report['lost_requests']} lost requests, {report['unaccounted_images']} "
              f"unaccounted images, {report['images']} images (logs: {log_dir})", file=sys.stderr)
        return 1
    return 0
