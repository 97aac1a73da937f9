"""The production broker profile really enforces what its README promises, against a real Mosquitto
with the dynamic-security plugin: no anonymous or foreign logins, client ids bound to device user
names, devices confined to their own topics and refused at SUBSCRIBE/PUBLISH, and every refusal an
error with its reason code at once (never a timeout)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from service_helpers import async_test, dynsec_plugin_missing
from waiting import wait_until_async

from patchcast.broker import PRODUCTION_CONF, BrokerProcess, SecurityFile
from shared.config import BrokerConfig
from shared.errors import RefusedError
from shared.topics import Topics
from shared.transport import Incoming, Transport

pytestmark = pytest.mark.skipif(dynsec_plugin_missing(), reason="Mosquitto's dynamic-security plugin is not installed")
T = Topics()
MODEL = "deit"


def security_file(tmp: Path) -> tuple[Path, dict[str, str]]:
    sec = SecurityFile.load(tmp / "dynsec.json")
    passwords = {"cam-0001": sec.add_client("cam-0001", "device"), "cam-0002": sec.add_client("cam-0002", "device"),
                 "worker-pool-deit": sec.add_client("worker-pool-deit", "worker"),
                 "monitor": sec.add_client("monitor", "observer")}
    return sec.save(), passwords


async def refused_connect(cfg: BrokerConfig, client_id: str) -> RefusedError:
    """Run a client that the broker must refuse; its run() ends with the RefusedError at once."""
    t = Transport(cfg, client_id=client_id)
    with pytest.raises(RefusedError) as info:
        async with asyncio.timeout(cfg.connect_timeout_s):  # a refusal, not a timeout
            await t.run()
    assert t.failure is info.value and t.stats.refusals[info.value.code] == 1
    with pytest.raises(RefusedError):  # anyone waiting for the connection learns it too
        await t.wait_connected(5.0)
    return info.value


@async_test(60)
async def test_production_acl_matrix(tmp_path: Path) -> None:
    dynsec, pw = security_file(tmp_path)
    with BrokerProcess(port=0, template=PRODUCTION_CONF, security_file=dynsec) as broker:
        def cfg(user: str = "", password: str = "") -> BrokerConfig:
            return BrokerConfig(port=broker.port, username=user, password=password, connect_timeout_s=5.0,
                                publish_timeout_s=5.0, reconnect_min_s=0.1, reconnect_max_s=0.5)

        a_got: list[Incoming] = []
        b_got: list[Incoming] = []
        worker_got: list[Incoming] = []
        mon_got: list[Incoming] = []
        a = Transport(cfg("cam-0001", pw["cam-0001"]), client_id="cam-0001", handler=a_got.append)
        b = Transport(cfg("cam-0002", pw["cam-0002"]), client_id="cam-0002", handler=b_got.append)
        worker = Transport(cfg("worker-pool-deit", pw["worker-pool-deit"]), client_id="worker-w1",
                           handler=worker_got.append)
        monitor = Transport(cfg("monitor", pw["monitor"]), client_id="monitor-1", handler=mon_got.append)
        await worker.subscribe(T.worker_subscription("workers", MODEL))
        await worker.subscribe(T.region_filter("w1"))
        await a.subscribe(T.reply("cam-0001"))
        await b.subscribe(T.reply("cam-0002"))
        await monitor.subscribe(f"{T.prefix}/#")
        await monitor.subscribe("$SYS/broker/clients/connected", qos=0)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(t.run(), name=t.client_id) for t in (a, b, worker, monitor)]
            for t in (a, b, worker, monitor):
                await t.wait_connected()

            # ---- CONNECT: anonymous, wrong password, foreign client ids ---------------------------
            assert (await refused_connect(cfg(), "nobody")).code == "not_authorized"
            bad = await refused_connect(cfg("cam-0001", "wrong"), "cam-0001")
            assert bad.code in ("bad_credentials", "not_authorized") and bad.reason_code >= 0x80
            # Client-id takeover (the repro: 20 tries as the worker): refused before any takeover.
            for victim in ["worker-w1"] * 20 + ["cam-0002"]:
                exc = await refused_connect(cfg("cam-0001", pw["cam-0001"]), victim)
                assert exc.code == "not_authorized" and exc.reason_code == 0x87, exc
            assert worker.connected and b.connected and a.connected
            assert worker.stats.disconnects == b.stats.disconnects == 0

            # ---- SUBSCRIBE: B's replies, the workers' shared subscription, requests, everything --
            for topic_filter in (T.reply("cam-0002"), f"{T.prefix}/reply/+", T.worker_subscription("workers", MODEL),
                                 T.worker_subscription("rogue", MODEL), T.request_filter(MODEL),
                                 T.request(MODEL, "cam-0002"), f"{T.prefix}/#", "#", T.region_filter("w1")):
                with pytest.raises(RefusedError) as info:
                    await a.subscribe(topic_filter)
                assert info.value.code == "not_authorized" and info.value.reason_code == 0x87, topic_filter

            # ---- PUBLISH: as B, into B's reply topic, as a worker ---------------------------------
            for topic in (T.request(MODEL, "cam-0002"), T.reply("cam-0002"), T.reply("cam-0001"),
                          T.region("w1", "cam-0002"), T.availability("worker", "w1"), T.metrics("worker", "w1")):
                with pytest.raises(RefusedError) as info:
                    async with asyncio.timeout(3.0):  # the PUBACK says so at once
                        await a.publish(topic, b"forged", qos=1, response_topic=T.reply("cam-0002"))
                assert info.value.code == "not_authorized" and info.value.reason_code == 0x87, topic
            with pytest.raises(RefusedError):
                await monitor.publish(T.request(MODEL, "cam-0001"), b"observers only read")

            # ---- what is allowed still works, and nothing forged arrived anywhere ----------------
            await a.publish(T.request(MODEL, "cam-0001"), b"mine", response_topic=T.reply("cam-0001"))
            await a.publish(T.region("w1", "cam-0001"), b"region")
            await wait_until_async(lambda: len(worker_got) >= 2, 5.0, 0.02, message="the worker's two messages")
            await worker.publish(T.reply("cam-0001"), b"answer-a")
            await worker.publish(T.reply("cam-0002"), b"answer-b")
            await wait_until_async(lambda: len(a_got) >= 1 and len(b_got) >= 1, 5.0, 0.02,
                                   message="each device's answer")
            await wait_until_async(lambda: sum(m.topic.startswith(f"{T.prefix}/reply/") for m in mon_got) >= 2, 5.0,
                                   0.02, message="the monitor seeing both answers")
            assert sorted(m.payload for m in worker_got) == [b"mine", b"region"]
            assert [m.payload for m in a_got] == [b"answer-a"]
            assert [m.payload for m in b_got] == [b"answer-b"]
            assert b"forged" not in {m.payload for m in mon_got}
            assert a.stats.refusals["not_authorized"] == 9 + 6
            assert worker.stats.disconnects == b.stats.disconnects == a.stats.disconnects == 0
            for task in tasks:
                task.cancel()


@async_test(60)
async def test_device_cannot_swallow_requests_through_the_shared_subscription(tmp_path: Path) -> None:
    """The issue's repro: a device joining the workers' shared subscription. Refused at SUBSCRIBE,
    so every request of another device still reaches the worker pool (none dropped at delivery)."""
    dynsec, pw = security_file(tmp_path)
    with BrokerProcess(port=0, template=PRODUCTION_CONF, security_file=dynsec) as broker:
        def cfg(user: str) -> BrokerConfig:
            return BrokerConfig(port=broker.port, username=user, password=pw[user], connect_timeout_s=5.0,
                                publish_timeout_s=5.0)

        worker_got: list[Incoming] = []
        rogue_got: list[Incoming] = []
        worker = Transport(cfg("worker-pool-deit"), client_id="worker-w1", handler=worker_got.append)
        rogue = Transport(cfg("cam-0001"), client_id="cam-0001", handler=rogue_got.append)
        victim = Transport(cfg("cam-0002"), client_id="cam-0002")
        await worker.subscribe(T.worker_subscription("workers", MODEL))
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(t.run(), name=t.client_id) for t in (worker, rogue, victim)]
            for t in (worker, rogue, victim):
                await t.wait_connected()
            with pytest.raises(RefusedError):
                await rogue.subscribe(T.worker_subscription("workers", MODEL))
            for i in range(41):
                await victim.publish(T.request(MODEL, "cam-0002"), f"r{i}".encode())
            await wait_until_async(lambda: len(worker_got) >= 41, 5.0, 0.02, message="the victim's 41 requests")
            assert sorted(m.payload for m in worker_got) == sorted(f"r{i}".encode() for i in range(41))
            assert rogue_got == []
            for task in tasks:
                task.cancel()


@async_test(60)
async def test_cli_makes_credentials_and_certificates_and_runs_the_production_profile(tmp_path: Path) -> None:
    """`patchcast broker add-device/add-user/make-certs`, then `patchcast broker --profile production
    --tls-dir` in a subprocess: a device logs in over TLS with the password it was given."""
    import subprocess
    import sys

    from patchcast.cli import main
    from shared.transport import read_credentials

    sec, creds, certs = tmp_path / "dynsec.json", tmp_path / "fleet.cred", tmp_path / "certs"
    assert main(["broker", "add-device", "--count", "2", "--prefix", "dev", "--security", str(sec),
                 "--credentials-out", str(creds)]) == 0
    assert main(["broker", "add-user", "monitor", "--kind", "observer", "--security", str(sec)]) == 0
    assert main(["broker", "make-certs", "--out", str(certs)]) == 0
    assert main(["broker", "add-device", "dev-0000", "--security", str(sec)]) == 1  # exists: refused
    logins = read_credentials(creds)
    assert sorted(logins) == ["dev-0000", "dev-0001"] and (creds.stat().st_mode & 0o777) == 0o600
    assert (sec.stat().st_mode & 0o777) == 0o600
    assert sorted(SecurityFile.load(sec).usernames()) == ["dev-0000", "dev-0001", "monitor"]

    proc = subprocess.Popen([sys.executable, "-m", "patchcast.cli", "broker", "--profile", "production",  # noqa: ASYNC220
                             "--security", str(sec), "--tls-dir", str(certs), "--port", "0", "--print-port-only"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30))
        base = {"port": port, "tls": True, "tls_ca_file": str(certs / "ca.crt"), "connect_timeout_s": 5.0}
        dev = Transport(BrokerConfig(**base, username="dev-0001", password=logins["dev-0001"]),  # type: ignore[arg-type]
                        client_id="dev-0001")
        task = asyncio.create_task(dev.run())
        await dev.wait_connected()
        with pytest.raises(RefusedError):
            await dev.subscribe(T.worker_subscription("workers", MODEL))
        task.cancel()
        # The other device's password is not this one's.
        exc = await refused_connect(BrokerConfig(**base, username="dev-0000",  # type: ignore[arg-type]
                                                 password=logins["dev-0001"]), "dev-0000")
        assert exc.code == "not_authorized"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
