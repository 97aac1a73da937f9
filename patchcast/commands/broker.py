"""``patchcast broker``: run a local Mosquitto with the project's configuration."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "broker", help="start a local Mosquitto (MQTT v5) with the project's broker config",
        description="Start 'mosquitto' with broker/mosquitto.conf (listener on loopback, TCP_NODELAY, "
        "max_packet_size from broker.max_packet_bytes) on the given port or a free one, wait until it "
        "accepts MQTT connections, print the port, and run until interrupted. For a network-facing "
        "broker with passwords and ACLs see broker/production/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="PatchCast config file (TOML/YAML) for broker.max_packet_bytes")
    p.add_argument("--port", type=int, default=None,
                   help="TCP port (default: broker.port from the config; 0 picks a free port)")
    p.add_argument("--host", default="127.0.0.1", help="listen address")
    p.add_argument("--conf", type=Path, default=None,
                   help="mosquitto.conf template (default: the project's broker/mosquitto.conf)")
    p.add_argument("--print-port-only", action="store_true",
                   help="print just the port number on stdout (for scripts)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from patchcast.broker import BrokerProcess
    from shared.config import load_config

    cfg = load_config(args.config)
    port = cfg.broker.port if args.port is None else args.port
    broker = BrokerProcess(port=port, host=args.host, template=args.conf,
                           max_packet_bytes=cfg.broker.max_packet_bytes)
    broker.start()

    def stop(signum: int, _frame: FrameType | None) -> None:
        # Unwind out of wait(); the finally below stops the broker (stopping it from inside the
        # handler would deadlock on Popen's wait lock).
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        if args.print_port_only:
            print(broker.port, flush=True)
        else:
            print(f"mosquitto (pid {broker.pid}) listening on {broker.address} "
                  f"(max_packet_size {cfg.broker.max_packet_bytes}); Ctrl-C stops it", flush=True)
            print(f"use: --broker {broker.address}  or  PATCHCAST_BROKER__PORT={broker.port}", flush=True)
        code = broker.wait()
        if code:
            print(f"patchcast broker: mosquitto exited with status {code}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 0
    finally:
        broker.stop()
