"""The transport against a real Mosquitto: v5 properties, size check before sending, TCP_NODELAY,
last will + birth on reconnect, re-subscription after a broker restart, publish timeouts."""

from __future__ import annotations

import asyncio
import socket

import pytest
from service_helpers import async_test
from waiting import wait_until_async

from patchcast.broker import LOCAL_CONF, BrokerProcess
from shared.config import BrokerConfig
from shared.errors import TransportError
from shared.transport import Incoming, Outgoing, Transport, publish_packet_size, publish_properties


def broker_config(port: int, **kw: object) -> BrokerConfig:
    values: dict = {"port": port, "connect_timeout_s": 3.0, "publish_timeout_s": 2.0, "reconnect_min_s": 0.05,
                    "reconnect_max_s": 0.5, **kw}
    return BrokerConfig(**values)


def test_packet_size_is_exact_for_what_is_sent() -> None:
    props = publish_properties(response_topic="a/b", correlation_data=b"xyz", expiry_s=2.2)
    assert props is not None and props.expiry_s == 3  # rounded up, never 0
    # Properties: expiry (1 + 4), response topic (1 + 2 + 3), correlation data (1 + 2 + 3), length prefix 1.
    assert len(props.packed) == 1 + 5 + 6 + 6
    # PUBLISH QoS 1: 1 type byte + remaining-length varint + topic + packet id + properties + payload
    payload = b"p" * 200
    remaining = 2 + 3 + 2 + len(props.packed) + 200
    assert publish_packet_size("t/x", payload, 1, props) == 1 + 2 + remaining
    assert publish_packet_size("t/x", b"", 0, None) == 1 + 1 + 2 + 3 + 1
    assert publish_properties() is None


@async_test(60)
async def test_properties_roundtrip_and_oversize_is_refused_before_sending(broker, unique) -> None:
    cfg = broker_config(broker.port, max_packet_bytes=64 * 1024)
    got: list[Incoming] = []
    sub = Transport(cfg, client_id=f"{unique}-sub", handler=got.append)
    pub = Transport(cfg, client_id=f"{unique}-pub")
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(sub.run()), tg.create_task(pub.run())]
        await sub.subscribe(f"{unique}/#")
        await sub.wait_connected()
        await pub.wait_connected()
        await pub.publish(f"{unique}/a", b"hello", response_topic=f"{unique}/reply", correlation_data=b"\x00\x01",
                          expiry_s=30, user_properties=[("k", "v")])
        with pytest.raises(TransportError) as info:
            await pub.publish(f"{unique}/big", b"x" * (64 * 1024))
        assert info.value.code == "too_large"
        # The connection survived: the over-size packet was never sent.
        await pub.publish(f"{unique}/b", b"after")
        await wait_until_async(lambda: len(got) == 2, 10, 0.02, message="both messages")
        assert pub.stats.connects == 1 and pub.stats.disconnects == 0
        first = got[0]
        assert (first.topic, first.payload, first.response_topic, first.correlation_data) == (
            f"{unique}/a", b"hello", f"{unique}/reply", b"\x00\x01")
        assert first.user_properties == (("k", "v"),) and first.expiry_s is not None and 0 < first.expiry_s <= 30
        # TCP_NODELAY on the client socket.
        conn = pub._client
        assert conn is not None
        sock = conn.socket()
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        for t in tasks:
            t.cancel()


@async_test(60)
async def test_last_will_on_connection_loss_then_reconnect_and_birth(broker, unique) -> None:
    cfg = broker_config(broker.port)
    topic = f"{unique}/availability"
    seen: list[bytes] = []
    watcher = Transport(cfg, client_id=f"{unique}-watch", handler=lambda m: seen.append(m.payload))
    service = Transport(cfg, client_id=f"{unique}-svc", will=Outgoing(topic, b"offline", retain=True),
                        birth=[Outgoing(topic, b"online", retain=True)])
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(watcher.run())]
        await watcher.subscribe(topic)
        await watcher.wait_connected()
        tasks.append(tg.create_task(service.run()))
        await wait_until_async(lambda: seen == [b"online"], 10, 0.02, message="the birth message")
        # An abrupt loss (no DISCONNECT): the broker publishes the will, the transport reconnects and
        # announces itself again.
        assert service._client is not None
        sock = service._client.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)
        await wait_until_async(lambda: seen[-2:] == [b"offline", b"online"], 10, 0.02,
                               message="the last will, then a new birth")
        assert service.stats.connects == 2
        await service.close([Outgoing(topic, b"offline", retain=True)])
        await wait_until_async(lambda: seen[-1] == b"offline", 10, 0.02, message="the farewell")
        for t in tasks:
            t.cancel()
    # The retained state is what a late subscriber sees.
    retained: list[bytes] = []
    late = Transport(cfg, client_id=f"{unique}-late", handler=lambda m: retained.append(m.payload))
    async with asyncio.TaskGroup() as tg:
        t = tg.create_task(late.run())
        await late.subscribe(topic)
        await wait_until_async(lambda: retained == [b"offline"], 10, 0.02, message="the retained state")
        t.cancel()


@async_test(90)
async def test_resubscribes_after_broker_restart_and_publish_times_out_while_down(unique) -> None:
    first = BrokerProcess(port=0, template=LOCAL_CONF).start()
    port = first.port
    cfg = broker_config(port, publish_timeout_s=0.5)
    got: list[Incoming] = []
    sub = Transport(cfg, client_id=f"{unique}-sub", handler=got.append)
    pub = Transport(cfg, client_id=f"{unique}-pub")
    second: BrokerProcess | None = None
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(sub.run()), tg.create_task(pub.run())]
            await sub.subscribe(f"{unique}/t")
            await sub.wait_connected()
            await pub.wait_connected()
            await pub.publish(f"{unique}/t", b"1")
            await wait_until_async(lambda: len(got) == 1, 10, 0.02, message="the first message")
            first.stop()
            await wait_until_async(lambda: not pub.connected and not sub.connected, 10, 0.02,
                                   message="both clients disconnected")
            with pytest.raises(TransportError) as info:
                await pub.publish(f"{unique}/t", b"lost")
            assert info.value.code == "timeout"
            second = BrokerProcess(port=port, template=LOCAL_CONF).start()
            await sub.wait_connected(10)  # set only once its subscriptions are renewed on the new broker
            await pub.wait_connected(10)
            await pub.publish(f"{unique}/t", b"2")  # the new broker knows nothing: sub re-subscribed itself
            await wait_until_async(lambda: len(got) == 2, 10, 0.02, message="the message after the restart")
            assert [m.payload for m in got] == [b"1", b"2"]
            assert sub.stats.connects == 2
            for t in tasks:
                t.cancel()
    finally:
        first.stop()
        if second is not None:
            second.stop()


@async_test(60)
async def test_publish_nowait_starts_at_once_or_says_it_cannot(broker, unique) -> None:
    cfg = broker_config(broker.port)
    got: list[Incoming] = []
    sub = Transport(cfg, client_id=f"{unique}-sub", handler=got.append)
    pub = Transport(cfg, client_id=f"{unique}-pub", max_in_flight=2)
    assert pub.publish_nowait(f"{unique}/t", b"early") is None  # no connection yet
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(sub.run()), tg.create_task(pub.run())]
        await sub.subscribe(f"{unique}/t")
        await sub.wait_connected()
        await pub.wait_connected()
        first = pub.publish_nowait(f"{unique}/t", b"1", correlation_data=b"c1", response_topic=f"{unique}/r")
        second = pub.publish_nowait(f"{unique}/t", b"2")
        assert first is not None and second is not None
        assert pub.publish_nowait(f"{unique}/t", b"3") is None  # both slots taken until their PUBACKs
        await asyncio.wait([first, second])
        assert pub.publish_result(f"{unique}/t", first) == 0 and pub.publish_result(f"{unique}/t", second) == 0
        nobody = pub.publish_nowait(f"{unique}/nobody", b"x")
        assert nobody is not None
        await asyncio.wait([nobody])
        assert pub.publish_result(f"{unique}/nobody", nobody) == 0x10  # accepted, no subscriber
        with pytest.raises(TransportError) as info:
            pub.publish_nowait(f"{unique}/t", b"x" * (cfg.max_packet_bytes + 1))
        assert info.value.code == "too_large"
        await wait_until_async(lambda: len(got) == 2, 10, 0.02, message="both messages")
        assert [m.payload for m in got] == [b"1", b"2"] and got[0].correlation_data == b"c1"
        assert pub.stats.published == 3 and pub.stats.publish_failures == 0
        for t in tasks:
            t.cancel()


def test_slots_pass_a_given_slot_to_the_oldest_waiter() -> None:
    from shared.transport import Slots

    async def scenario() -> list[str]:
        slots = Slots(1)
        order: list[str] = []
        assert slots.try_take() and not slots.try_take()

        async def waiter(name: str) -> None:
            await slots.take()
            order.append(name)

        a, b = asyncio.create_task(waiter("a")), asyncio.create_task(waiter("b"))
        c = asyncio.create_task(waiter("c"))
        await asyncio.sleep(0)
        b.cancel()  # a cancelled waiter is skipped, never handed a slot it cannot give back
        slots.give()
        await a
        slots.give()
        await c
        slots.give()
        assert slots.free == 1 and slots.try_take()
        return order

    assert asyncio.run(scenario()) == ["a", "c"]
