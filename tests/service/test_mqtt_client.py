"""shared.mqtt_client against a scripted broker on a loopback socket: the protocol cases a healthy
Mosquitto never produces (a silent keep-alive, a DISCONNECT, malformed or over-size packets, a small
Receive Maximum, QoS 2 deliveries, a failing handler). Everything Mosquitto does produce is covered
against the real broker (test_service_transport, test_transport_abort, test_tls and every service test)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest
from service_helpers import async_test
from waiting import wait_until_async

from shared import mqtt_packets as mp
from shared.config import BrokerConfig
from shared.mqtt_client import Connection, ConnectionLost
from shared.transport import Incoming, Transport

Script = Callable[["Peer"], Awaitable[None]]


class Peer:
    """One client connection as the scripted broker sees it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buf = bytearray()

    async def packet(self) -> tuple[int, bytes]:
        while (found := mp.split_packet(self.buf, 0, 1 << 20)) is None:
            data = await self.reader.read(65536)
            if not data:
                raise EOFError
            self.buf += data
        first, start, end = found
        body = bytes(self.buf[start:end])
        del self.buf[:end]
        return first, body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def accept(self, properties: bytes = b"\x00") -> None:
        first, _ = await self.packet()
        assert first >> 4 == mp.CONNECT
        await self.send(bytes((0x20,)) + mp.varint(2 + len(properties)) + b"\x00\x00" + properties)


class ScriptedBroker:
    def __init__(self, *scripts: Script) -> None:
        self.scripts = list(scripts)
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedBroker:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        script = self.scripts[min(self.connections, len(self.scripts) - 1)]
        self.connections += 1
        with contextlib.suppress(EOFError, ConnectionError, asyncio.CancelledError):
            await script(Peer(reader, writer))
        writer.close()


async def open_connection(port: int, handler: Callable[[Incoming], None] | None = None,
                          keepalive_s: int = 30) -> Connection:
    conn = Connection(handler=handler, max_packet_bytes=4096)
    connack = await asyncio.wait_for(
        conn.open("127.0.0.1", port, mp.connect_packet("c", keepalive_s=keepalive_s), keepalive_s=keepalive_s), 5)
    assert connack.reason_code == 0
    return conn


async def until_closed(conn: Connection, timeout_s: float = 5.0) -> ConnectionLost:
    with pytest.raises(ConnectionLost) as info:
        await asyncio.wait_for(conn.closed, timeout_s)
    return info.value


@async_test(30)
async def test_a_keep_alive_the_broker_does_not_answer_ends_the_connection() -> None:
    pings = []

    async def silent(peer: Peer) -> None:
        await peer.accept(b"\x03\x13\x00\x01")  # Server Keep Alive: 1 s
        while True:
            first, _ = await peer.packet()
            pings.append(first)

    async with ScriptedBroker(silent) as broker:
        conn = await open_connection(broker.port, keepalive_s=60)
        lost = await until_closed(conn)
        assert "PINGRESP" in lost.message and pings == [0xC0]  # one PINGREQ, unanswered a whole interval


@async_test(30)
async def test_the_brokers_disconnect_is_reported_with_its_reason() -> None:
    async def take_over(peer: Peer) -> None:
        await peer.accept()
        reason = b"\x1f\x00\x04gone"
        await peer.send(b"\xe0" + mp.varint(1 + 1 + len(reason)) + b"\x8e" + mp.varint(len(reason)) + reason)
        await peer.packet()

    async with ScriptedBroker(take_over) as broker:
        conn = await open_connection(broker.port)
        lost = await until_closed(conn)
        assert "0x8E" in lost.message and "Session taken over" in lost.message and "gone" in lost.message


@pytest.mark.parametrize("bad", [b"\x36\x05\x00\x01t\x00\x01", b"\x30\xff\xff\x7f", b"\x50\x01\x00"],
                         ids=["qos3", "oversize", "short-pubrec"])
@async_test(30)
async def test_malformed_bytes_end_the_connection_and_the_transport_reconnects(bad: bytes) -> None:
    got: list[Incoming] = []

    async def hostile(peer: Peer) -> None:
        await peer.accept()
        await peer.send(bad)
        await peer.packet()

    async def healthy(peer: Peer) -> None:
        await peer.accept()
        await peer.send(mp.publish_packet("t/ok", b"fine", qos=0, retain=False, packet_id=0))
        while True:
            await peer.packet()

    async with ScriptedBroker(hostile, healthy) as broker:
        cfg = BrokerConfig(port=broker.port, connect_timeout_s=3.0, publish_timeout_s=2.0, reconnect_min_s=0.05,
                           reconnect_max_s=0.1)
        transport = Transport(cfg, client_id="c", handler=got.append)
        task = asyncio.create_task(transport.run())
        # The second connection's message can reach the handler (from the socket's read) before the
        # transport's connect loop resumes and counts that connection: wait for both.
        await wait_until_async(lambda: [m.payload for m in got] == [b"fine"] and transport.stats.connects == 2, 10,
                               0.02, message="the second connection")
        assert transport.stats.disconnects == 1 and transport.stats.connects == 2 and broker.connections == 2
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@async_test(30)
async def test_publishes_wait_for_the_brokers_receive_maximum() -> None:
    most_unacked = 0

    async def slow(peer: Peer) -> None:
        nonlocal most_unacked
        await peer.accept(b"\x03\x21\x00\x02")  # Receive Maximum 2
        unacked: list[int] = []
        acks = 0
        while True:
            try:
                first, body = await asyncio.wait_for(peer.packet(), 0.1)
            except TimeoutError:  # nothing more comes while two wait: acknowledge the oldest
                await peer.send(mp.ack_packet(mp.PUBACK, unacked.pop(0), 0x10 if acks % 2 else 0))
                acks += 1
                continue
            assert first >> 4 == mp.PUBLISH
            _, _, packet_id = mp.parse_publish(first, body)
            unacked.append(packet_id)
            most_unacked = max(most_unacked, len(unacked))

    async with ScriptedBroker(slow) as broker:
        conn = await open_connection(broker.port)
        assert conn.receive_maximum == 2
        codes = await asyncio.wait_for(asyncio.gather(
            *(conn.publish("t", b"%d" % i, qos=1, retain=False) for i in range(6))), 10)
        assert most_unacked == 2 and sorted(codes) == [0, 0, 0, 0x10, 0x10, 0x10]
        conn.drop()


@async_test(30)
async def test_qos2_delivery_is_handed_over_once_and_a_failing_handler_does_not_end_the_connection() -> None:
    got: list[bytes] = []
    replies: list[int] = []

    def handler(message: Incoming) -> None:
        got.append(message.payload)
        if message.payload == b"boom":
            raise RuntimeError("a handler bug")

    async def qos2(peer: Peer) -> None:
        await peer.accept()
        once = mp.publish_packet("t", b"once", qos=2, retain=False, packet_id=9)
        await peer.send(once + mp.publish_packet("t", b"once", qos=2, retain=False, packet_id=9, dup=True))
        await peer.send(mp.ack_packet(mp.PUBREL, 9))
        await peer.send(mp.publish_packet("t", b"boom", qos=1, retain=False, packet_id=10))
        await peer.send(mp.publish_packet("t", b"after", qos=1, retain=False, packet_id=11))
        while True:
            first, _ = await peer.packet()
            replies.append(first)

    async with ScriptedBroker(qos2) as broker:
        conn = await open_connection(broker.port, handler=handler)
        # PUBREC twice (one per delivery), PUBCOMP, then a PUBACK for each QoS 1 message.
        await wait_until_async(lambda: len(replies) == 5, 5, 0.02, message="every acknowledgement")
        assert got == [b"once", b"boom", b"after"]
        assert replies == [0x50, 0x50, 0x70, 0x40, 0x40]
        assert conn.handler_errors == 1 and not conn.closed.done()
        conn.drop()


@async_test(30)
async def test_an_acknowledgement_that_never_comes_times_out_and_frees_its_slot() -> None:
    held: list[int] = []

    async def mute(peer: Peer) -> None:
        await peer.accept(b"\x03\x21\x00\x01")  # Receive Maximum 1: a leaked slot would block the next publish
        while True:
            first, body = await peer.packet()
            _, _, packet_id = mp.parse_publish(first, body)
            held.append(packet_id)
            if len(held) == 2:  # the first one's PUBACK, late: nobody waits for it any more
                await peer.send(mp.ack_packet(mp.PUBACK, held[0]) + mp.ack_packet(mp.PUBACK, held[1], 0x10))

    async with ScriptedBroker(mute) as broker:
        conn = await open_connection(broker.port)
        with pytest.raises(TimeoutError):
            await conn.publish("t", b"1", qos=1, retain=False, timeout_s=0.2)
        assert conn._publishes_in_flight == 0
        assert await conn.publish("t", b"2", qos=1, retain=False, timeout_s=5) == 0x10
        assert not conn.closed.done()
        conn.drop()


@async_test(30)
async def test_each_publish_expires_at_its_own_deadline_and_an_acknowledged_one_never() -> None:
    held: list[int] = []

    async def acks_only_the_second(peer: Peer) -> None:
        await peer.accept()
        while True:
            first, body = await peer.packet()
            _, _, packet_id = mp.parse_publish(first, body)
            held.append(packet_id)
            if len(held) == 2:
                await peer.send(mp.ack_packet(mp.PUBACK, packet_id))

    async with ScriptedBroker(acks_only_the_second) as broker:
        conn = await open_connection(broker.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        slow = conn.start_publish("t", b"slow", qos=1, retain=False, properties=mp.NO_PROPERTIES, timeout_s=3.0)
        acked = conn.start_publish("t", b"acked", qos=1, retain=False, properties=mp.NO_PROPERTIES, timeout_s=0.3)
        fast = conn.start_publish("t", b"fast", qos=1, retain=False, properties=mp.NO_PROPERTIES, timeout_s=0.6)
        assert await asyncio.wait_for(acked, 5) == 0
        with pytest.raises(TimeoutError):  # armed again after the sweep at the acknowledged one's deadline
            await asyncio.wait_for(fast, 5)
        assert 0.55 <= loop.time() - started < 2.0 and not slow.done()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(slow, 5)
        assert loop.time() - started >= 2.95
        assert conn._publishes_in_flight == 0 and not conn._deadlines and not conn.closed.done()
        conn.drop()


def test_a_connection_runs_on_uvloop_too() -> None:
    # uvloop's transports are not asyncio.Transport subclasses: the connection must not care whose loop it is.
    uvloop = pytest.importorskip("uvloop")
    got: list[bytes] = []

    async def echo(peer: Peer) -> None:
        await peer.accept()
        await peer.send(mp.publish_packet("t", b"hello", qos=1, retain=False, packet_id=5))
        while True:
            first, body = await peer.packet()
            if first >> 4 == mp.PUBLISH:
                _, _, packet_id = mp.parse_publish(first, body)
                await peer.send(mp.ack_packet(mp.PUBACK, packet_id))

    async def scenario() -> None:
        async with ScriptedBroker(echo) as broker:
            conn = await open_connection(broker.port, handler=lambda message: got.append(message.payload))
            assert await asyncio.wait_for(conn.publish("t", b"x", qos=1, retain=False), 5) == 0
            await wait_until_async(lambda: got == [b"hello"], 5, 0.02, message="the broker's message")
            conn.drop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(), 20))
