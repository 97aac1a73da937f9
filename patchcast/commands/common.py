"""Flags and config loading shared by the commands that connect to the broker (worker, edge, monitor,
workers, demo, health): ``--config``, ``--broker``, the client TLS flags and the logging flags, and
:func:`load`, the one place those flags become config overrides."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from shared.errors import ConfigError


def add_broker_args(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--broker`` and the client TLS flags (:func:`add_tls_args`)."""
    p.add_argument("--config", help="PatchCast config file (TOML/YAML); PATCHCAST_<SECTION>__<FIELD> environment "
                   "variables and the flags below override it")
    p.add_argument("--broker", metavar="HOST:PORT",
                   help="MQTT broker address (overrides broker.host/port; default 127.0.0.1:1883)")
    add_tls_args(p)


def add_log_args(p: argparse.ArgumentParser) -> None:
    """``--log-format`` and ``--log-level`` (the ``logging`` config section), for the long-running services."""
    p.add_argument("--log-format", choices=["auto", "json", "console"], default=None,
                   help="log rendering (default: logging.format; JSON lines when not on a terminal)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)


def add_tls_args(p: argparse.ArgumentParser) -> None:
    """``--tls``, ``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--tls-no-verify-hostname``
    (the ``broker.tls*`` config fields; PATCHCAST_BROKER__TLS_CA_FILE … in the environment)."""
    g = p.add_argument_group("broker TLS (broker.tls* in the config)")
    g.add_argument("--tls", action="store_true", default=None,
                   help="connect over TLS (implied by --tls-ca/--tls-cert); the broker's certificate is verified")
    g.add_argument("--tls-ca", metavar="PEM", help="CA certificate(s) that signed the broker's certificate "
                   "(default: the system's trusted CAs)")
    g.add_argument("--tls-cert", metavar="PEM", help="mutual TLS: this client's certificate")
    g.add_argument("--tls-key", metavar="PEM", help="mutual TLS: the key of --tls-cert (if not inside it)")
    g.add_argument("--tls-no-verify-hostname", action="store_true", default=None,
                   help="do not check that the certificate names the broker's host (the chain is still verified)")


def tls_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``broker`` section overrides from the TLS flags (empty when none was given)."""
    out: dict[str, Any] = {}
    for flag, key in (("tls_ca", "tls_ca_file"), ("tls_cert", "tls_cert_file"), ("tls_key", "tls_key_file")):
        value = getattr(args, flag, None)
        if value:
            out[key] = str(Path(value).expanduser().resolve())
    if out or getattr(args, "tls", None):
        out["tls"] = True
    if getattr(args, "tls_no_verify_hostname", None):
        out["tls_verify_hostname"] = False
    return out


def broker_overrides(address: str | None) -> dict[str, Any]:
    """``broker`` section overrides from ``--broker HOST[:PORT]`` (empty when not given)."""
    if not address:
        return {}
    from patchcast.broker import parse_address

    host, port = parse_address(address)
    if not host:
        raise ConfigError(f"--broker {address!r}: expected HOST:PORT")
    return {"host": host} if port is None else {"host": host, "port": port}


def overrides(args: argparse.Namespace, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Config overrides from the shared flags (``--broker``, TLS, logging) plus per-command ``sections``
    (``None`` values are left to the file and the environment)."""
    out: dict[str, dict[str, Any]] = {k: dict(v) for k, v in sections.items()}
    broker = {**broker_overrides(getattr(args, "broker", None)), **tls_overrides(args)}
    if broker:
        out.setdefault("broker", {}).update(broker)
    log = {"format": getattr(args, "log_format", None), "level": getattr(args, "log_level", None)}
    if any(v is not None for v in log.values()):
        out.setdefault("logging", {}).update(log)
    return out


def load(args: argparse.Namespace, **sections: dict[str, Any]) -> Any:
    """The effective config: file → environment → the shared flags → per-command ``sections``."""
    from shared.config import load_config

    return load_config(getattr(args, "config", None), overrides=overrides(args, **sections))
