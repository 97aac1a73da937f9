"""``patchcast health``: exit 0 when a service's retained availability says online (container
healthchecks, scripts)."""

from __future__ import annotations

import argparse

from patchcast.commands.common import add_broker_args, load


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "health", help="exit 0 when a service's retained availability says online (healthchecks)",
        description="Read the retained availability messages (patchcast/v1/availability/ROLE/ID) and exit 0 "
        "when one matching --id (exactly) or --prefix says online, 1 otherwise (offline, unknown or no "
        "broker within --timeout). With neither, any online service of the role counts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_broker_args(p)
    p.add_argument("--role", default="worker", choices=("worker", "edge", "monitor", "scaler"))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--id", dest="ident", help="exact service id")
    g.add_argument("--prefix", help="id prefix, e.g. the container host name (worker ids are HOST-PID)")
    p.add_argument("--min", type=int, default=1, help="at least this many matching services online")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for retained messages")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from patchcast.monitor.health import check_availability

    cfg = load(args)
    online, seen = asyncio.run(check_availability(cfg.broker, role=args.role, ident=args.ident,
                                                  prefix=args.prefix, timeout_s=args.timeout))
    ok = len(online) >= args.min
    if not args.quiet:
        what = args.ident or (f"{args.prefix}*" if args.prefix else "*")
        print(f"{args.role} {what}: {len(online)} online of {seen} seen -> {'healthy' if ok else 'unhealthy'}"
              + (f" ({', '.join(sorted(online)[:8])})" if online else ""))
    return 0 if ok else 1
