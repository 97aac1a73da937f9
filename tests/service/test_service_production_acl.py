"""The production broker profile really enforces what its README promises: passwords required,
devices confined to their own topics, workers to the shared subscription and reply topics."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
from service_helpers import async_test

from patchcast.broker import REPO_ROOT, BrokerProcess
from shared.config import BrokerConfig
from shared.errors import TransportError
from shared.transport import Incoming, Transport

PROD = REPO_ROOT / "broker" / "production"
pytestmark = pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")


def production_conf(tmp: Path) -> Path:
    passwd = tmp / "passwd"
    for i, (user, password) in enumerate((("cam-0001", "pw1"), ("cam-0002", "pw2"), ("worker-pool-deit", "pww"))):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd), user, password],
                       check=True, capture_output=True, timeout=20)
    text = (PROD / "mosquitto.conf").read_text()
    text = text.replace("/etc/mosquitto/patchcast.passwd", str(passwd))
    text = text.replace("/etc/mosquitto/patchcast.acl", str(PROD / "acl.example"))
    text = text.replace("/var/lib/mosquitto/", str(tmp) + "/").replace("log_dest syslog", "log_dest stderr")
    # Started as root, mosquitto drops to its own user before reading these files; this test's files
    # live in a private temporary folder, so keep the test broker's privileges (ignored when not root).
    text += "\nuser root\n"
    conf = tmp / "production.conf"
    conf.write_text(text)
    return conf


async def wait_for(predicate, limit_s: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    try:
        async with asyncio.timeout(limit_s):
            while not predicate():  # noqa: ASYNC110 - polling what handlers collected
                await asyncio.sleep(0.02)
    except TimeoutError:
        return False
    return True


@async_test(90)
async def test_production_acl_confines_devices_and_workers(tmp_path: Path) -> None:
    with BrokerProcess(port=0, template=production_conf(tmp_path)) as broker:
        def cfg(user: str = "", password: str = "") -> BrokerConfig:
            return BrokerConfig(port=broker.port, username=user, password=password, connect_timeout_s=3.0,
                                publish_timeout_s=3.0, reconnect_min_s=0.1, reconnect_max_s=0.5)

        cam1_got: list[Incoming] = []
        worker_got: list[Incoming] = []
        cam1 = Transport(cfg("cam-0001", "pw1"), client_id="cam-0001", handler=cam1_got.append)
        worker = Transport(cfg("worker-pool-deit", "pww"), client_id="worker-1", handler=worker_got.append)
        anonymous = Transport(cfg(), client_id="nobody")
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(t.run()) for t in (cam1, worker, anonymous)]
            await worker.subscribe("$share/deit/patchcast/v1/req/deit/+")
            await cam1.subscribe("patchcast/v1/reply/cam-0001")
            await cam1.wait_connected()
            await worker.wait_connected()
            with pytest.raises(TransportError):
                await anonymous.wait_connected(1.5)  # no password: refused

            # A device may not read another device's replies: Mosquitto 2.0 grants the subscription
            # but never delivers (newer versions refuse it with 0x87; either is fine).
            try:
                await cam1.subscribe("patchcast/v1/reply/cam-0002")
            except TransportError as exc:
                assert exc.code == "subscribe_refused"
            await worker.publish("patchcast/v1/reply/cam-0002", b"not for cam-0001")

            await cam1.publish("patchcast/v1/req/deit/cam-0001", b"mine", response_topic="patchcast/v1/reply/cam-0001")
            await cam1.publish("patchcast/v1/req/deit/cam-0002", b"forged")  # accepted on the wire, not delivered
            assert await wait_for(lambda: len(worker_got) >= 1)
            await asyncio.sleep(0.3)
            assert [m.payload for m in worker_got] == [b"mine"]

            # A region goes to the worker that asked for it, under the device's own id only.
            await worker.subscribe("patchcast/v1/region/worker-1/+")
            await cam1.publish("patchcast/v1/region/worker-1/cam-0001", b"region")
            await cam1.publish("patchcast/v1/region/worker-1/cam-0002", b"forged region")
            assert await wait_for(lambda: len(worker_got) >= 2)
            await asyncio.sleep(0.3)
            assert [m.payload for m in worker_got] == [b"mine", b"region"]

            await worker.publish("patchcast/v1/reply/cam-0001", b"answer")
            await cam1.publish("patchcast/v1/reply/cam-0001", b"self-forged")  # devices cannot write replies
            assert await wait_for(lambda: len(cam1_got) >= 1)
            await asyncio.sleep(0.3)
            assert [m.payload for m in cam1_got] == [b"answer"]
            for t in tasks:
                t.cancel()
