"""TLS against a real Mosquitto with certificates made at test time (openssl): the fleet, a worker and
the monitor end to end over mutual TLS under the production profile, and every way a TLS connection
can be wrong refused at once with a clear error (never a loop of timeouts)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from service_helpers import async_test, dynsec_plugin_missing, service_config
from waiting import wait_until_async

from patchcast.broker import (
    LOCAL_CONF,
    PRODUCTION_CONF,
    BrokerProcess,
    CertSet,
    SecurityFile,
    make_test_certs,
    write_credentials,
)
from shared.config import BrokerConfig
from shared.errors import ConfigError, TLSError, TransportError
from shared.transport import Incoming, Transport

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertSet, CertSet]:
    """A CA with a server certificate for localhost/127.0.0.1 and client certificates, and a second,
    unrelated CA (the wrong one)."""
    good = make_test_certs(tmp_path_factory.mktemp("ca"), clients=["fleet", "worker", "monitor"], days=2)
    wrong = make_test_certs(tmp_path_factory.mktemp("wrong-ca"), hosts=["other.example"], days=2)
    return good, wrong


def broker_cfg(port: int, **kw: Any) -> BrokerConfig:
    """A client config for the broker on ``port`` that gives up quickly (5 s to connect, 5 s to publish)."""
    return BrokerConfig(port=port, connect_timeout_s=5.0, publish_timeout_s=5.0, **kw)


async def connect_error(cfg: BrokerConfig, kind: type[TransportError] = TLSError,
                        code: str = "tls") -> TransportError:
    t = Transport(cfg, client_id="tls-probe")
    started = time.monotonic()
    with pytest.raises(kind) as info:
        await t.run()
    assert time.monotonic() - started < 3.0, "a TLS failure must not wait out timeouts or retry"
    with pytest.raises(kind):
        await t.wait_connected(1.0)
    assert info.value.code == code and t.stats.refusals[code] == 1
    return info.value


@async_test(60)
async def test_tls_listener_verifies_and_refuses_clearly(certs: tuple[CertSet, CertSet]) -> None:
    good, wrong = certs
    fleet_cert, fleet_key = good.clients["fleet"]
    with BrokerProcess(port=0, template=LOCAL_CONF, tls=good.listener()) as broker:
        ok = broker_cfg(broker.port, tls=True, tls_ca_file=str(good.ca))
        got: list[Incoming] = []
        sub = Transport(ok, client_id="tls-sub", handler=got.append)
        pub = Transport(broker_cfg(broker.port, host="localhost", tls=True, tls_ca_file=str(good.ca)),
                        client_id="tls-pub")
        await sub.subscribe("tls/check")
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(t.run()) for t in (sub, pub)]
            await sub.wait_connected()
            await pub.publish("tls/check", b"over tls")
            await wait_until_async(lambda: got, 5, 0.02, message="the message over TLS")
            assert got[0].payload == b"over tls"
            for t in tasks:
                t.cancel()

        # A client with the wrong CA: the broker's certificate does not verify.
        exc = await connect_error(broker_cfg(broker.port, tls=True, tls_ca_file=str(wrong.ca)))
        assert exc.code == "tls" and "CERTIFICATE_VERIFY_FAILED" in exc.message and "tls_ca_file" in exc.message
        # A plain client at a TLS listener (the TimeoutError loop): named as such, beside the
        # other cause of a close before CONNACK (a broker out of connections), which the bytes cannot tell apart.
        exc = await connect_error(broker_cfg(broker.port), TransportError, "closed_before_connack")
        assert "TLS listener" in exc.message and "connection limit" in exc.message
    # A certificate that does not name the host: refused, unless host checking is turned off.
    with BrokerProcess(port=0, template=LOCAL_CONF, tls=wrong.listener()) as broker:
        exc = await connect_error(broker_cfg(broker.port, tls=True, tls_ca_file=str(wrong.ca)))
        assert "CERTIFICATE_VERIFY_FAILED" in exc.message and "127.0.0.1" in exc.message
        lax = Transport(broker_cfg(broker.port, tls=True, tls_ca_file=str(wrong.ca), tls_verify_hostname=False),
                        client_id="tls-lax")
        task = asyncio.create_task(lax.run())
        await lax.wait_connected()
        task.cancel()
    # Mutual TLS: no client certificate, refused in the handshake; with one, connected.
    with BrokerProcess(port=0, template=LOCAL_CONF, tls=good.listener(require_certificate=True)) as broker:
        exc = await connect_error(broker_cfg(broker.port, tls=True, tls_ca_file=str(good.ca)))
        assert "certificate required" in exc.message.lower() or "alert" in exc.message.lower()
        mutual = Transport(broker_cfg(broker.port, tls=True, tls_ca_file=str(good.ca), tls_cert_file=str(fleet_cert),
                                        tls_key_file=str(fleet_key)), client_id="tls-mutual")
        task = asyncio.create_task(mutual.run())
        await mutual.wait_connected()
        task.cancel()
    # Unusable files are a configuration error before any connection.
    with pytest.raises(ConfigError, match="no such file"):
        Transport(BrokerConfig(tls=True, tls_ca_file="/nonexistent/ca.crt"), client_id="x")
    with pytest.raises(ConfigError, match="tls_cert_file"):
        Transport(BrokerConfig(tls=True, tls_ca_file=str(good.ca), tls_cert_file=str(fleet_cert),
                               tls_key_file=str(good.server_key)), client_id="x")
    with pytest.raises(ConfigError, match=r"broker\.tls = true"):
        BrokerConfig(tls_ca_file=str(good.ca))


@pytest.mark.skipif(dynsec_plugin_missing(), reason="Mosquitto's dynamic-security plugin is not installed")
@async_test(120)
async def test_fleet_worker_and_monitor_end_to_end_over_mutual_tls(
        certs: tuple[CertSet, CertSet], model_files, image_folder, unique, tmp_path: Path) -> None:
    from edge_node.fleet import run_fleet
    from inference_worker.service import InferenceWorker
    from patchcast.monitor.app import MonitorSession
    from shared.models import build_model

    good, _ = certs
    devices, per_device = 3, 6
    prefix = f"{unique}cam"
    sec = SecurityFile.load(tmp_path / "dynsec.json")
    logins = {f"{prefix}-{i:04d}": sec.add_client(f"{prefix}-{i:04d}", "device") for i in range(devices)}
    worker_pw = sec.add_client("worker-pool", "worker")
    monitor_pw = sec.add_client("monitor", "observer")
    sec.save()
    credentials = write_credentials(tmp_path / "fleet.credentials", logins)

    edge_path, server_path = model_files
    with BrokerProcess(port=0, template=PRODUCTION_CONF, security_file=sec.path,
                       tls=good.listener(require_certificate=True)) as broker:
        def cfg(role: str, **broker_fields: str) -> object:
            cert, key = good.clients[role]
            return service_config(
                broker.port, edge_path, server_path, image_folder,
                broker={"tls": True, "tls_ca_file": str(good.ca), "tls_cert_file": str(cert),
                        "tls_key_file": str(key), **broker_fields},
                models={"model_id": f"tiny-{unique}"}, worker={"group": f"pool-{unique}"},
                edge={"devices": devices, "limit": per_device, "device_prefix": prefix,
                      "credentials_file": str(credentials)},
                gate={"threshold": 0.0})  # every image goes to the worker
        worker_cfg = cfg("worker", username="worker-pool", password=worker_pw)
        monitor_cfg = cfg("monitor", username="monitor", password=monitor_pw)
        fleet_cfg = cfg("fleet")
        server = build_model(worker_cfg.models.server, role="server")  # type: ignore[attr-defined]
        worker = InferenceWorker(worker_cfg, server, worker_id=f"{unique}-w0")  # type: ignore[arg-type]
        monitor = MonitorSession(monitor_cfg)  # type: ignore[arg-type]
        async with asyncio.TaskGroup() as tg:
            monitor_task = tg.create_task(monitor.run(), name="monitor")
            worker_task = tg.create_task(worker.run(), name="worker")
            await monitor.wait_connected()
            await asyncio.wait_for(worker.ready.wait(), 30)
            result = await run_fleet(fleet_cfg)  # type: ignore[arg-type]
            await wait_until_async(lambda: monitor.snapshot().images_total >= devices * per_device, 10, 0.1,
                                   message="the monitor seeing the fleet's outcomes over TLS")
            worker.stop()
            await worker_task
            monitor_task.cancel()

    s = result.summary
    assert s["images"] == devices * per_device
    assert s["offloaded"] == s["images"] and s["replies"] == s["images"]
    assert s["timeouts"] == 0 and s["errors"] == 0
    assert s["replies_foreign"] == s["replies_malformed"] == 0
    assert {d.device_id for d in result.devices} == set(logins)
    snap = monitor.snapshot()
    assert snap.images_total == devices * per_device and snap.sent_total == devices * per_device


def test_tls_settings_reach_supervised_workers_and_every_command(tmp_path: Path) -> None:
    """`patchcast workers --tls-ca …` hands the TLS settings to the workers it starts (environment),
    and every command that connects takes the --tls* flags."""
    from patchcast.cli import build_parser
    from patchcast.commands.common import tls_overrides
    from patchcast.scaling.backends import worker_env
    from shared.config import load_config

    ca, cert, key = (tmp_path / n for n in ("ca.crt", "c.crt", "c.key"))
    cfg = load_config(overrides={"broker": {"tls": True, "tls_ca_file": str(ca), "tls_cert_file": str(cert),
                                            "tls_key_file": str(key), "tls_verify_hostname": False}}, environ={})
    child = load_config(environ={k: v for k, v in worker_env(cfg, base={}).items() if k.startswith("PATCHCAST_")})
    assert child.broker == cfg.broker
    assert "PATCHCAST_BROKER__TLS" not in worker_env(load_config(environ={}), base={})
    parser = build_parser()
    for command in (["worker"], ["edge"], ["monitor"], ["workers"], ["health", "--role", "worker"], ["demo"]):
        args = parser.parse_args([*command, "--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)])
        assert tls_overrides(args) == {"tls": True, "tls_ca_file": str(ca), "tls_cert_file": str(cert),
                                       "tls_key_file": str(key)}, command
    assert tls_overrides(parser.parse_args(["worker"])) == {}
    assert tls_overrides(parser.parse_args(["worker", "--tls", "--tls-no-verify-hostname"])) == {
        "tls": True, "tls_verify_hostname": False}
