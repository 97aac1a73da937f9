"""``patchcast broker``: run Mosquitto with the project's configuration (the local profile, or the
production profile with its security file and TLS), and manage the production profile's clients
and certificates (``add-device``, ``add-user``, ``make-certs``)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from shared.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "broker", help="start Mosquitto (MQTT v5) with the project's broker config; manage production clients",
        description="Start 'mosquitto' on the given port or a free one, wait until it accepts connections, print "
        "the port, and run until interrupted. --profile local (default): broker/mosquitto.conf, anonymous, for "
        "development. --profile production: broker/production/mosquitto.conf with Mosquitto's dynamic-security "
        "plugin (--security FILE from 'patchcast broker add-device/add-user'): every client logs in, devices "
        "are bound to their own client id and topics and refused at SUBSCRIBE/PUBLISH otherwise; with "
        "--tls-dir the listener is TLS (certificates from 'patchcast broker make-certs' or your CA). "
        "See broker/production/README.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="PatchCast config file (TOML/YAML) for broker.max_packet_bytes")
    p.add_argument("--profile", choices=["local", "production"], default="local",
                   help="local: anonymous development broker; production: logins, ACLs, client-id binding")
    p.add_argument("--port", type=int, default=None,
                   help="TCP port (default: broker.port from the config; 0 picks a free port)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0: every interface)")
    p.add_argument("--conf", type=Path, default=None,
                   help="mosquitto.conf template (default: the profile's, broker/mosquitto.conf or "
                   "broker/production/mosquitto.conf)")
    p.add_argument("--security", type=Path, default=None,
                   help="production: the dynamic-security JSON holding clients and ACLs (see add-device)")
    p.add_argument("--tls-dir", type=Path, default=None,
                   help="a TLS listener with DIR/server.crt, DIR/server.key and DIR/ca.crt (make-certs writes them)")
    p.add_argument("--require-client-cert", action="store_true",
                   help="mutual TLS: clients must present a certificate signed by DIR/ca.crt")
    p.add_argument("--print-port-only", action="store_true",
                   help="print just the port number on stdout (for scripts)")
    p.set_defaults(handler=run)
    actions = p.add_subparsers(dest="broker_action", metavar="ACTION",
                               description="production profile: clients and certificates (optional)")

    a = actions.add_parser(
        "add-device", help="create devices' logins in a security file (user = client id = device id)",
        description="Add each device to the dynamic-security file (created when missing): its user name is its "
        "device id, its only allowed MQTT client id too, with a role for its own topics only. A random password "
        "is made per device and written once to --credentials-out ('ID PASSWORD' lines, mode 600; what "
        "'patchcast edge --credentials' reads) or printed. Restart the broker to load the file.")
    a.add_argument("ids", nargs="*", help="device ids (e.g. cam-0000)")
    a.add_argument("--count", type=int, default=0, help="also add PREFIX-0000 … PREFIX-(N-1), like the fleet simulator")
    a.add_argument("--prefix", default="cam", help="device id prefix for --count (edge.device_prefix)")
    a.add_argument("--security", type=Path, required=True, help="dynamic-security JSON file")
    a.add_argument("--credentials-out", type=Path, default=None,
                   help="append 'ID PASSWORD' lines here (mode 600) instead of printing them")
    a.add_argument("--replace", action="store_true", help="give existing devices a new password")
    a.set_defaults(handler=run_add_device)

    u = actions.add_parser(
        "add-user", help="create a worker-pool, observer (monitor/scaler) or admin login in a security file",
        description="Add a service login: 'worker' (one per pool: joins $share/<group>/… request subscriptions, "
        "answers on reply topics), 'observer' (monitor, scaler, health: read-only on patchcast/v1/# and $SYS), "
        "'admin' (mosquitto_ctrl dynsec on a running broker). Not bound to a client id (processes share it). "
        "The password is read from stdin with --password-stdin, else made at random and printed once.")
    u.add_argument("name", help="user name, e.g. worker-pool-deit, monitor")
    u.add_argument("--kind", choices=["worker", "observer", "admin"], required=True)
    u.add_argument("--security", type=Path, required=True, help="dynamic-security JSON file")
    u.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    u.add_argument("--replace", action="store_true", help="replace an existing user (new password)")
    u.set_defaults(handler=run_add_user)

    c = actions.add_parser(
        "make-certs", help="make a CA, a server certificate and client certificates with openssl",
        description="Write ca.crt/ca.key, server.crt/server.key (subjectAltName: every --host) and "
        "client-NAME.crt/.key per --client into DIR, P-256 keys, for --tls-dir and the clients' --tls-ca/"
        "--tls-cert/--tls-key. For tests and first deployments; keep ca.key offline or use your own CA.")
    c.add_argument("--out", type=Path, required=True, help="folder to write into")
    c.add_argument("--host", action="append", default=None,
                   help="DNS name or IP address clients use for the broker (repeat; default: localhost, 127.0.0.1)")
    c.add_argument("--client", action="append", default=[], help="a client certificate with this CN (repeat)")
    c.add_argument("--days", type=int, default=365, help="validity")
    c.set_defaults(handler=run_make_certs)


def _listener_tls(args: argparse.Namespace) -> Any:
    from patchcast.broker import ListenerTLS, check_tls_files

    if args.tls_dir is None:
        if args.require_client_cert:
            raise ConfigError("--require-client-cert needs --tls-dir")
        return None
    d = args.tls_dir.expanduser().resolve()
    tls = ListenerTLS(d / "server.crt", d / "server.key", d / "ca.crt", args.require_client_cert)
    check_tls_files(tls)
    return tls


def run(args: argparse.Namespace) -> int:
    from patchcast.broker import LOCAL_CONF, PRODUCTION_CONF, BrokerProcess
    from shared.config import load_config

    cfg = load_config(args.config)
    port = cfg.broker.port if args.port is None else args.port
    production = args.profile == "production"
    if production and args.security is None:
        raise ConfigError("--profile production needs --security FILE (create it with 'patchcast broker add-device')")
    if args.security is not None and not production:
        raise ConfigError("--security is for --profile production")
    if args.security is not None and not args.security.is_file():
        raise ConfigError(f"--security {args.security}: no such file (create it with 'patchcast broker add-device')")
    template = args.conf or (PRODUCTION_CONF if production else LOCAL_CONF)
    broker = BrokerProcess(port=port, host=args.host, template=template, tls=_listener_tls(args),
                           max_packet_bytes=cfg.broker.max_packet_bytes,
                           security_file=args.security.resolve() if args.security else None)
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
            scheme = "mqtts" if broker.tls else "mqtt"
            print(f"mosquitto (pid {broker.pid}, {args.profile} profile) listening on {scheme}://{broker.address} "
                  f"(max_packet_size {cfg.broker.max_packet_bytes}); Ctrl-C stops it", flush=True)
            tls_hint = f" --tls-ca {broker.tls.cafile}" if broker.tls else ""
            print(f"use: --broker {broker.address}{tls_hint}  or  PATCHCAST_BROKER__PORT={broker.port}", flush=True)
        code = broker.wait()
        if code:
            print(f"patchcast broker: mosquitto exited with status {code}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 0
    finally:
        broker.stop()


def run_add_device(args: argparse.Namespace) -> int:
    from patchcast.broker import SecurityFile, write_credentials
    from shared.naming import device_id

    if args.count < 0:
        raise ConfigError("--count must be ≥ 0")
    ids = [*args.ids, *(device_id(args.prefix, i) for i in range(args.count))]
    if not ids:
        raise ConfigError("name device ids, or --count N")
    sec = SecurityFile.load(args.security)
    made = {d: sec.add_client(d, "device", replace=args.replace) for d in ids}
    sec.save()
    if args.credentials_out:
        write_credentials(args.credentials_out, made)
        print(f"{len(made)} device(s) added to {args.security}; passwords in {args.credentials_out}")
    else:
        for d, secret in made.items():
            print(f"{d} {secret}")
    print("restart the broker (or use mosquitto_ctrl dynsec as an admin) to load the change", file=sys.stderr)
    return 0


def run_add_user(args: argparse.Namespace) -> int:
    from patchcast.broker import SecurityFile

    password = None
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise ConfigError("--password-stdin: empty password")
    sec = SecurityFile.load(args.security)
    secret = sec.add_client(args.name, args.kind, password, replace=args.replace)
    sec.save()
    if password is None:
        print(f"{args.name} {secret}")
    print(f"{args.kind} {args.name!r} added to {args.security}; restart the broker to load it", file=sys.stderr)
    return 0


def run_make_certs(args: argparse.Namespace) -> int:
    from patchcast.broker import make_test_certs

    certs = make_test_certs(args.out, hosts=args.host or ("localhost", "127.0.0.1"), clients=args.client,
                            days=args.days)
    print(f"CA {certs.ca}\nserver {certs.server_cert} {certs.server_key}")
    for name, (cert, key) in certs.clients.items():
        print(f"client {name} {cert} {key}")
    return 0
