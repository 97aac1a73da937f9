"""Where rumqttd, the second MQTT v5 broker the service tests run over, differs from Mosquitto.

The end-to-end, delivery and worker-kill tests marked ``any_broker`` run over both brokers
(tests/service/conftest.py, tests/service/other_brokers.py). No PatchCast code knows which broker it
talks to: only MQTT v5 (shared subscriptions ``$share/<group>/…``, response topic, correlation data,
message expiry, retained availability, PUBACK reason codes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from other_brokers import Rumqttd, rumqttd_installed
from service_helpers import async_test

from shared.config import load_config
from shared.topics import V1
from shared.transport import NO_SUBSCRIBERS, Transport

pytestmark = pytest.mark.skipif(not rumqttd_installed(),
                                reason="rumqttd is not installed (pip install iotcore: rumqttd compiled into a wheel)")


@pytest.fixture(scope="module")
def rumqttd() -> Iterator[Rumqttd]:
    b = Rumqttd().start()
    try:
        yield b
    finally:
        b.stop()


@async_test(30)
async def test_rumqttd_acknowledges_a_publish_to_nobody_with_plain_success(rumqttd, unique) -> None:
    """Where this broker differs: MQTT v5 lets a broker answer a QoS 1 publish that matched no
    subscriber with PUBACK 0x10 ("no matching subscribers"); Mosquitto does, rumqttd 0.20 answers
    0x00. PatchCast's fast re-send (test_delivery.py, a request that reached no worker) needs
    the 0x10; without it a device re-sends after edge.reply_timeout_s, as with a lost request."""
    cfg = load_config(overrides={"broker": {"port": rumqttd.port}}, environ={})
    client = Transport(cfg.broker, client_id=f"{unique}-lonely")
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(client.run(), name="client")
        await client.wait_connected()
        code = await client.publish(V1.request(f"nobody-{unique}", f"{unique}cam-0000"), b"x", qos=1)
        task.cancel()
    assert code == 0 != NO_SUBSCRIBERS
