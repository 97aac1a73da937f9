"""``Transport.abort`` against a real Mosquitto: the fast end of a connection a stopping fleet uses for
thousands of devices at once. Without DISCONNECT the broker publishes the will; with it (after a
farewell) the broker discards the will; either way the run task ends at once when cancelled."""

from __future__ import annotations

import asyncio

import pytest
from service_helpers import async_test
from waiting import wait_until_async

from shared.config import BrokerConfig
from shared.transport import Incoming, Outgoing, Transport


def broker_config(port: int) -> BrokerConfig:
    return BrokerConfig(port=port, connect_timeout_s=3.0, publish_timeout_s=2.0, reconnect_min_s=0.05,
                        reconnect_max_s=0.5)


@pytest.mark.parametrize("disconnect", [False, True], ids=["dropped", "disconnected"])
@async_test(60)
async def test_abort_ends_the_connection_at_once_and_the_will_follows_the_disconnect(broker, unique,
                                                                                      disconnect: bool) -> None:
    cfg = broker_config(broker.port)
    topic = f"{unique}/availability"
    got: list[Incoming] = []
    spy = Transport(cfg, client_id=f"{unique}-spy", handler=got.append)
    device = Transport(cfg, client_id=f"{unique}-device", will=Outgoing(topic, b"offline"))
    async with asyncio.TaskGroup() as tg:
        spy_task = tg.create_task(spy.run())
        await spy.subscribe(topic)
        await spy.wait_connected()
        link = tg.create_task(device.run())
        await device.wait_connected()
        await device.publish(topic, b"online")
        await wait_until_async(lambda: [m.payload for m in got] == [b"online"], 10, 0.02, message="online")

        device.abort(disconnect=disconnect)
        link.cancel()
        async with asyncio.timeout(1.0):  # no graceful disconnect to wait for
            await asyncio.gather(link, return_exceptions=True)
        assert not device.connected
        if disconnect:
            await asyncio.sleep(1.0)  # not a wait: a will would be here by now (it comes within ms when due)
            assert [m.payload for m in got] == [b"online"], "a clean DISCONNECT must discard the will"
        else:
            await wait_until_async(lambda: len(got) == 2, 10, 0.02, message="the will")
            assert got[1].payload == b"offline"
        # Aborted means closed for good: nothing reconnects under this client id.
        assert device.stats.connects == 1
        spy_task.cancel()


@async_test(30)
async def test_close_says_whether_the_farewell_reached_the_broker(broker, unique) -> None:
    """Only a farewell that reached the broker may be followed by a DISCONNECT (which discards the will)."""
    cfg = broker_config(broker.port)
    never = Transport(cfg, client_id=f"{unique}-never")
    assert await never.close([Outgoing(f"{unique}/bye", b"offline")]) is False  # never connected: nothing said
    device = Transport(cfg, client_id=f"{unique}-device")
    async with asyncio.TaskGroup() as tg:
        link = tg.create_task(device.run())
        await device.wait_connected()
        assert await device.close([Outgoing(f"{unique}/bye", b"offline")]) is True
        device.abort(disconnect=True)
        link.cancel()
