"""``patchcast monitor``: the live dashboard (see :mod:`patchcast.monitor`)."""

from __future__ import annotations

import argparse

from patchcast.commands.common import add_broker_args, load


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "monitor", help="live dashboard: devices, offload, bytes, accuracy, latency, workers, broker",
        description="Subscribe to worker metrics, availability, device outcomes and the broker's $SYS "
        "statistics and show them live (rich). With --once, collect for N seconds and print one plain-text "
        "snapshot (or JSON with --json) for scripts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_broker_args(p)
    p.add_argument("--once", type=float, metavar="SECONDS", default=None,
                   help="collect for SECONDS, print one snapshot and exit")
    p.add_argument("--json", action="store_true", help="with --once: print the snapshot as JSON")
    p.add_argument("--refresh", type=float, default=None, help="refresh interval, s (monitor.refresh_s)")
    p.add_argument("--window", type=float, default=None, help="sliding window in seconds (monitor.window_s)")
    p.add_argument("--no-sys", action="store_true", help="do not subscribe to $SYS/# (broker statistics)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from patchcast.monitor.app import run_monitor
    from shared.logs import configure

    cfg = load(args, monitor={"refresh_s": args.refresh, "window_s": args.window,
                              "sys_topics": False if args.no_sys else None})
    # Logs go to stderr as JSON unless on a terminal; the dashboard owns stdout.
    configure(cfg.logging.format, "warning" if args.once is None else cfg.logging.level)
    try:
        asyncio.run(run_monitor(cfg, once_s=args.once, as_json=args.json))
    except KeyboardInterrupt:
        return 0
    return 0
