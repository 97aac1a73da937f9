"""One MQTT v5 connection on asyncio: :class:`Connection` is the protocol object of one TCP (or TLS)
socket, from CONNECT to the end of the socket. :class:`shared.transport.Transport` opens one per
connection attempt and owns the reconnecting, the subscriptions and the errors users see.

Built for the service's hot path (a worker receiving thousands of requests a second):

* received bytes are split into packets in place, and a PUBLISH goes to the handler synchronously
  from ``data_received`` (no queue, no task per message);
* writes are gathered and flushed once per event-loop turn, so the PUBACKs of a burst and the replies
  published in the same turn leave in one ``send``;
* a QoS 1 publish is one future keyed by packet identifier; the broker's Receive Maximum caps how many
  wait at once; their deadlines share one timer, armed at the earliest (no timer per publish);
* the keep-alive is a timer, not a task: PINGREQ every keep-alive interval, and the connection is lost
  when the previous PINGREQ is still unanswered.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any, cast

from shared import mqtt_packets as mp
from shared.errors import TransportError

MessageHandler = Callable[[mp.Incoming], None]
_PACKET_SLACK = 64 * 1024  # headers and properties a broker may add around a payload of the configured size


class ConnectionLost(TransportError):
    """The connection ended: the broker closed it, sent DISCONNECT, broke the protocol, or the network
    failed. ``before_connack``: it ended before the broker answered CONNECT."""

    code = "transport"

    def __init__(self, message: str, *, before_connack: bool = False) -> None:
        super().__init__(message)
        self.before_connack = before_connack


class Connection(asyncio.Protocol):
    """An MQTT v5 client connection. :meth:`open` connects and returns the CONNACK; then :meth:`publish`,
    :meth:`subscribe`, :meth:`unsubscribe`; :attr:`closed` resolves (with :class:`ConnectionLost`)
    when the connection ends; :meth:`drop` ends it at once."""

    def __init__(self, *, handler: MessageHandler | None, max_packet_bytes: int) -> None:
        self.handler = handler
        self.handler_errors = 0
        self.on_handler_error: Callable[[mp.Incoming, BaseException], None] | None = None
        self.receive_maximum = 65_535  # the broker's, from its CONNACK
        self.broker_max_packet = mp.MAX_REMAINING_LENGTH
        self._limit = max_packet_bytes + _PACKET_SLACK
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._connack: asyncio.Future[mp.Connack] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._acks: dict[int, asyncio.Future[Any]] = {}  # packet id → PUBACK/SUBACK/UNSUBACK waiter
        # packet id → its publish's deadline (loop time). One timer watches them all, armed at the earliest:
        # a timer per publish, cancelled by nearly every PUBACK, cost more than the rest of the publish.
        self._deadlines: dict[int, float] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf
        self._qos2_in: set[int] = set()  # QoS 2 messages received, PUBREL not yet seen
        self._next_id = 0
        self._publishes_in_flight = 0
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._keepalive: asyncio.TimerHandle | None = None
        self._ping_unanswered = False
        self._paused = False
        self._resumed: asyncio.Future[None] | None = None

    # ---- opening and closing --------------------------------------------------------------------
    async def open(self, host: str, port: int, connect: bytes, *, keepalive_s: int,
                   tls: ssl.SSLContext | None = None, tls_timeout_s: float = 10.0) -> mp.Connack:
        """TCP connect (then the TLS handshake), send ``connect`` (a CONNECT packet), wait for the CONNACK.
        :class:`OSError` when the TCP connect fails, :class:`ssl.SSLError` (or a reset) when the handshake
        does, :class:`ConnectionLost` when the broker closes before its CONNACK. The caller bounds the
        whole call with a timeout."""
        infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        sock: socket.socket | None = None
        error: OSError | None = None
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await self._loop.sock_connect(sock, address)
                break
            except OSError as exc:
                sock.close()
                sock, error = None, exc
            except BaseException:  # cancelled or timed out by the caller: no socket left behind
                sock.close()
                raise
        if sock is None:
            raise error or OSError(f"{host}:{port}: no address")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await self._loop.create_connection(lambda: self, sock=sock, ssl=tls,
                                               server_hostname=host if tls is not None else None,
                                               ssl_handshake_timeout=tls_timeout_s if tls is not None else None)
        except BaseException:
            sock.close()
            raise
        self._write(connect)
        either: list[asyncio.Future[Any]] = [self._connack, self.closed]
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self.drop()
            raise
        if not self._connack.done() or self._connack.cancelled():
            self._connack.cancel()
            self.closed.result()  # raises ConnectionLost
        connack = self._connack.result()
        if connack.reason_code < 0x80:
            self.receive_maximum = connack.properties.get(mp.RECEIVE_MAXIMUM, 65_535) or 65_535
            self.broker_max_packet = connack.properties.get(mp.MAXIMUM_PACKET_SIZE, mp.MAX_REMAINING_LENGTH)
            keepalive_s = connack.properties.get(mp.SERVER_KEEP_ALIVE, keepalive_s)
            if keepalive_s > 0:
                self._keepalive = self._loop.call_later(keepalive_s, self._ping, keepalive_s)
        return connack

    def socket(self) -> Any:
        """The connection's socket (asyncio's wrapper), or ``None`` before :meth:`open` / after the end."""
        return self._transport.get_extra_info("socket") if self._transport is not None else None

    @property
    def write_buffer_empty(self) -> bool:
        t = self._transport
        return not self._out and (t is None or t.get_write_buffer_size() == 0)

    def drop(self, *, disconnect: bool = False) -> None:
        """End the connection now. ``disconnect``: a DISCONNECT goes out first (the broker discards the
        will), only when nothing else is waiting to be written; without it the broker publishes the will."""
        transport = self._transport
        if transport is None or transport.is_closing():
            self._lost(ConnectionLost("connection closed by this client"))
            return
        if disconnect and self.write_buffer_empty:
            transport.write(mp.DISCONNECT_PACKET)
            transport.close()  # flushes the DISCONNECT, then closes
        else:
            transport.abort()
        self._lost(ConnectionLost("connection closed by this client"))

    # ---- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, whichever loop made it: uvloop's are not asyncio.Transport subclasses (an
        # isinstance check here left a worker under uvloop reconnecting forever).
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        before = not self._connack.done()
        detail = f": {exc}" if exc else ""
        what = "before its CONNACK" if before else ""
        self._lost(ConnectionLost(f"the broker closed the connection {what}{detail}".replace("  ", " ").strip(),
                                  before_connack=before), cause=exc)
        self._transport = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)
        self._resumed = None

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        try:
            while (found := mp.split_packet(buf, pos, self._limit)) is not None:
                first, body_start, pos = found
                self._dispatch(first, bytes(buf[body_start:pos]))
        except mp.MalformedPacket as exc:
            self._protocol_error(str(exc))
            return
        if pos:
            del buf[:pos]

    # ---- incoming packets ------------------------------------------------------------------------
    def _dispatch(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == mp.PUBLISH:
            message, qos, packet_id = mp.parse_publish(first, body)
            if qos == 2:
                self._write(mp.ack_packet(mp.PUBREC, packet_id))
                if packet_id in self._qos2_in:
                    return  # a redelivery of a message already handed over
                self._qos2_in.add(packet_id)
            self._deliver(message)
            if qos == 1:
                self._write(mp.ack_packet(mp.PUBACK, packet_id))
        elif kind == mp.PUBACK or kind == mp.PUBCOMP:
            packet_id, code = mp.parse_ack(body)
            self._settle(packet_id, code)
        elif kind == mp.PUBREC:
            packet_id, code = mp.parse_ack(body)
            if code >= 0x80:
                self._settle(packet_id, code)
            else:
                self._write(mp.ack_packet(mp.PUBREL, packet_id))
        elif kind == mp.PUBREL:
            packet_id, _ = mp.parse_ack(body)
            self._qos2_in.discard(packet_id)
            self._write(mp.ack_packet(mp.PUBCOMP, packet_id))
        elif kind == mp.SUBACK or kind == mp.UNSUBACK:
            packet_id, codes = mp.parse_suback(body)
            waiter = self._acks.pop(packet_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(codes)
        elif kind == mp.PINGRESP:
            self._ping_unanswered = False
        elif kind == mp.CONNACK:
            if self._connack.done():
                raise mp.MalformedPacket("a second CONNACK")
            self._connack.set_result(mp.parse_connack(body))
        elif kind == mp.DISCONNECT:
            code, reason = mp.parse_disconnect(body)
            text = f"the broker sent DISCONNECT 0x{code:02X} ({mp.reason_name(code)}{f': {reason}' if reason else ''})"
            self._close_with(ConnectionLost(text, before_connack=not self._connack.done()))
        else:
            raise mp.MalformedPacket(f"unexpected packet type {kind} from the broker")

    def _deliver(self, message: mp.Incoming) -> None:
        handler = self.handler
        if handler is None:
            return
        try:
            handler(message)
        except Exception as exc:  # a handler bug must not take the connection down
            self.handler_errors += 1
            if self.on_handler_error is not None:
                self.on_handler_error(message, exc)

    def _settle(self, packet_id: int, code: int) -> None:
        """A publish's acknowledgement: its slot freed, its deadline dropped, its waiter (if still waiting) told."""
        waiter = self._acks.pop(packet_id, None)
        if waiter is None:
            return  # a publish nobody waits for any more (timed out)
        self._deadlines.pop(packet_id, None)  # the sweep finds it gone
        self._release_slot()
        if not waiter.done():
            waiter.set_result(code)

    def _expire(self, packet_id: int) -> None:
        """No acknowledgement in time: the slot is freed (a late one finds nobody) and the waiter fails."""
        self._deadlines.pop(packet_id, None)
        waiter = self._acks.pop(packet_id, None)
        if waiter is None:
            return
        self._release_slot()
        if not waiter.done():
            waiter.set_exception(TimeoutError())

    # ---- outgoing --------------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        transport = self._transport
        if transport is not None and not transport.is_closing() and out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _packet_id(self) -> int:
        for _ in range(65_535):
            self._next_id = self._next_id % 65_535 + 1
            if self._next_id not in self._acks:
                return self._next_id
        raise TransportError("no free MQTT packet identifier (65,535 calls awaiting acknowledgement)")

    def _check_open(self) -> None:
        if self.closed.done():
            self.closed.result()  # raises the ConnectionLost
            raise ConnectionLost("connection closed")

    def can_start(self, qos: int) -> bool:
        """Whether :meth:`start_publish` may be called now: open, the socket taking writes, and for QoS ≥ 1
        room under the broker's Receive Maximum."""
        return (not self.closed.done() and not self._paused
                and (not qos or self._publishes_in_flight < self.receive_maximum))

    def start_publish(self, topic: str, payload: bytes, *, qos: int, retain: bool, properties: bytes,
                      timeout_s: float) -> asyncio.Future[int]:
        """Write a PUBLISH now (only when :meth:`can_start`); a future of the broker's reason code (QoS 0:
        done, 0). It fails with :class:`TimeoutError` when no acknowledgement comes within ``timeout_s``
        (its deadline, dropped by the acknowledgement), with :class:`ConnectionLost` when the connection
        ends first. Cancelling it gives nothing back: the acknowledgement or the deadline frees its slot."""
        waiter: asyncio.Future[int] = self._loop.create_future()
        if not qos:
            self._write(mp.publish_packet(topic, payload, qos=0, retain=retain, packet_id=0, properties=properties))
            waiter.set_result(0)
            return waiter
        packet_id = self._packet_id()
        self._acks[packet_id] = waiter
        self._publishes_in_flight += 1
        self._write(mp.publish_packet(topic, payload, qos=qos, retain=retain, packet_id=packet_id,
                                      properties=properties))
        deadline = self._deadlines[packet_id] = self._loop.time() + timeout_s
        if deadline < self._sweep_at:
            self._arm_sweep(deadline)
        return waiter

    def _arm_sweep(self, when: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = when
        self._sweep = self._loop.call_at(when, self._expire_overdue)

    def _expire_overdue(self) -> None:
        """The sweep: every publish past its deadline expires; the timer is armed again at the next one."""
        self._sweep, self._sweep_at = None, math.inf
        now = self._loop.time()
        for packet_id in [pid for pid, at in self._deadlines.items() if at <= now]:
            self._expire(packet_id)
        if self._deadlines:
            self._arm_sweep(min(self._deadlines.values()))

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool,
                      properties: bytes = mp.NO_PROPERTIES, timeout_s: float = 10.0) -> int:
        """Publish and, for QoS ≥ 1, wait for the broker's acknowledgement: its reason code (QoS 0: 0 once
        written). :class:`TimeoutError` when room to send, or the acknowledgement, takes longer than
        ``timeout_s``; :class:`ConnectionLost` when the connection ends first."""
        self._check_open()
        if not self.can_start(qos):
            async with asyncio.timeout(timeout_s):
                await self.room(qos)
        code: int = await self.start_publish(topic, payload, qos=qos, retain=retain, properties=properties,
                                             timeout_s=timeout_s)
        return code

    async def room(self, qos: int) -> None:
        """Until :meth:`can_start` (the socket takes writes again and, for QoS ≥ 1, the broker's Receive
        Maximum has room); :class:`ConnectionLost` when the connection ends first."""
        self._check_open()
        if self._paused:
            await self._writable()
        while qos and self._publishes_in_flight >= self.receive_maximum:
            slot: asyncio.Future[None] = self._loop.create_future()
            self._slot_waiters.append(slot)
            await slot
            self._check_open()

    async def subscribe(self, filters: Sequence[tuple[str, int]]) -> list[int]:
        """SUBSCRIBE and wait for the SUBACK: one reason code per filter (the granted QoS, or a failure)."""
        return await self._call(lambda pid: mp.subscribe_packet(pid, filters))

    async def unsubscribe(self, filters: Sequence[str]) -> list[int]:
        return await self._call(lambda pid: mp.unsubscribe_packet(pid, filters))

    async def _call(self, build: Callable[[int], bytes]) -> list[int]:
        self._check_open()
        packet_id = self._packet_id()
        waiter: asyncio.Future[list[int]] = self._loop.create_future()
        self._acks[packet_id] = waiter
        self._write(build(packet_id))
        try:
            codes: list[int] = await waiter
        finally:
            if not waiter.done() and self._acks.get(packet_id) is waiter:
                del self._acks[packet_id]  # cancelled or timed out by the caller: a late SUBACK finds nobody
        return codes

    async def _writable(self) -> None:
        if self._resumed is None:
            self._resumed = self._loop.create_future()
        either: list[asyncio.Future[Any]] = [self._resumed, self.closed]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        self._check_open()

    def _release_slot(self) -> None:
        self._publishes_in_flight -= 1
        while self._slot_waiters:
            slot = self._slot_waiters.popleft()
            if not slot.done():
                slot.set_result(None)
                break

    # ---- keep-alive and failures -----------------------------------------------------------------
    def _ping(self, keepalive_s: int) -> None:
        if self.closed.done():
            return
        if self._ping_unanswered:
            self._close_with(ConnectionLost(f"no PINGRESP within the keep-alive interval ({keepalive_s} s)"))
            return
        self._ping_unanswered = True
        self._write(mp.PINGREQ_PACKET)
        self._keepalive = self._loop.call_later(keepalive_s, self._ping, keepalive_s)

    def _protocol_error(self, why: str) -> None:
        self._close_with(ConnectionLost(f"malformed packet from the broker: {why}",
                                        before_connack=not self._connack.done()))

    def _close_with(self, exc: ConnectionLost) -> None:
        self._lost(exc)
        if self._transport is not None:
            self._transport.abort()

    def _lost(self, exc: ConnectionLost, cause: BaseException | None = None) -> None:
        if self.closed.done():
            return
        if cause is not None:
            exc.__cause__ = cause
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep, self._sweep_at = None, math.inf
        self._deadlines.clear()
        self.closed.set_exception(exc)
        self.closed.exception()  # retrieved: nobody has to await it
        for waiter in (*self._acks.values(), *self._slot_waiters):
            if not waiter.done():
                waiter.set_exception(exc)
                waiter.exception()
        self._acks.clear()
        self._slot_waiters.clear()
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)
        with contextlib.suppress(asyncio.InvalidStateError):
            if not self._connack.done():
                self._connack.cancel()
