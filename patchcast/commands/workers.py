"""``patchcast workers``: an autoscaled worker pool (see :mod:`patchcast.scaling`)."""

from __future__ import annotations

import argparse

from patchcast.commands.common import add_broker_args, load


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "workers", help="run an autoscaled pool of 'patchcast worker' processes (or scale a compose service)",
        description="Supervise between --min and --max 'patchcast worker' subprocesses, scaling on backlog "
        "(queue depth, age of the oldest queued request) and busy fraction from the workers' metrics, with "
        "hysteresis and cooldowns. Crashed workers restart with a rate limit; surplus workers are drained "
        "(SIGTERM, bounded wait, then SIGKILL). With --backend compose it runs 'docker compose up -d "
        "--no-recreate --scale worker=N' instead. Pool metrics for Prometheus on --metrics-port (/metrics). "
        "Arguments after '--' are passed to every 'patchcast worker'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_broker_args(p)
    p.add_argument("--min", dest="min_workers", type=int, default=None, help="scaler.min_workers")
    p.add_argument("--max", dest="max_workers", type=int, default=None, help="scaler.max_workers")
    p.add_argument("--backend", choices=("process", "compose", "observe"), default=None,
                   help="scaler.backend (observe: export the desired size only, e.g. for KEDA)")
    p.add_argument("--metrics-port", type=int, default=None, help="scaler.metrics_port (0: off)")
    p.add_argument("--metrics-host", default=None, help="scaler.metrics_host")
    p.add_argument("--interval", type=float, default=None, help="scaler.interval_s")
    p.add_argument("--compose-file", default=None, help="scaler.compose_file")
    p.add_argument("--log-dir", default=None, help="write each worker's output to LOG_DIR/WORKER_ID.log")
    p.add_argument("--id-prefix", default="worker", help="worker ids are PREFIX-1, PREFIX-2, …")
    p.add_argument("worker_args", nargs=argparse.REMAINDER,
                   help="after '--': extra 'patchcast worker' arguments (e.g. -- --threads 1)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import signal
    from pathlib import Path

    from patchcast.monitor.errors import first_error
    from patchcast.scaling.backends import (
        ComposeBackend,
        ObserveBackend,
        PoolBackend,
        ProcessPool,
        worker_env,
    )
    from patchcast.scaling.service import ScalerService
    from shared.logs import configure

    cfg = load(args, scaler={
        "min_workers": args.min_workers, "max_workers": args.max_workers, "backend": args.backend,
        "metrics_port": args.metrics_port, "metrics_host": args.metrics_host, "interval_s": args.interval,
        "compose_file": args.compose_file})
    configure(cfg.logging.format, cfg.logging.level)
    extra = [a for a in args.worker_args if a != "--"]
    if args.config:
        extra = ["--config", args.config, *extra]

    async def main() -> None:
        backend: PoolBackend
        if cfg.scaler.backend == "compose":
            backend = ComposeBackend(cfg.scaler)
        elif cfg.scaler.backend == "observe":
            backend = ObserveBackend()
        else:
            from patchcast.scaling.backends import default_worker_argv

            backend = ProcessPool(cfg.scaler, argv=[*default_worker_argv(), *extra],
                                  env=worker_env(cfg), id_prefix=args.id_prefix,
                                  log_dir=Path(args.log_dir) if args.log_dir else None)
        service = ScalerService(cfg, backend)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        await service.run()

    try:
        asyncio.run(main())
    except BaseExceptionGroup as group:
        error = first_error(group)
        if error is None:
            raise
        raise error from group
    return 0
