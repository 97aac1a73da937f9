"""MQTT v5 packets: encoding what a PatchCast client sends, decoding what a broker sends (OASIS MQTT
Version 5.0, §2–§3). Pure and synchronous: :mod:`shared.mqtt_client` puts it on a socket.

Only the client side of the protocol is here: CONNECT, PUBLISH, PUBACK, PUBREC/PUBREL/PUBCOMP,
SUBSCRIBE, UNSUBSCRIBE, PINGREQ and DISCONNECT out; CONNACK, PUBLISH, the acknowledgements, PINGRESP,
DISCONNECT and AUTH in. A malformed packet from the broker raises :class:`MalformedPacket`, which ends
the connection (the broker is the only peer; a device's bytes reach this code only inside a PUBLISH's
payload and properties, which the broker has framed and checked).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Packet types (§2.1.2), the high nibble of the first byte.
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"  # remaining length 0: reason 0x00, normal disconnection
MAX_REMAINING_LENGTH = 268_435_455  # the largest a 4-byte variable byte integer holds

# Property identifiers (§2.2.2.2) and how each is encoded.
PAYLOAD_FORMAT, MESSAGE_EXPIRY, CONTENT_TYPE, RESPONSE_TOPIC, CORRELATION_DATA = 0x01, 0x02, 0x03, 0x08, 0x09
SUBSCRIPTION_ID, SESSION_EXPIRY, ASSIGNED_CLIENT_ID, SERVER_KEEP_ALIVE = 0x0B, 0x11, 0x12, 0x13
REASON_STRING, RECEIVE_MAXIMUM, TOPIC_ALIAS_MAXIMUM, TOPIC_ALIAS = 0x1F, 0x21, 0x22, 0x23
MAXIMUM_QOS, RETAIN_AVAILABLE, USER_PROPERTY, MAXIMUM_PACKET_SIZE = 0x24, 0x25, 0x26, 0x27
SHARED_SUBSCRIPTION_AVAILABLE = 0x2A
_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
_PROPERTY_KINDS = {
    0x01: _BYTE, 0x02: _U32, 0x03: _STR, 0x08: _STR, 0x09: _BIN, 0x0B: _VARINT, 0x11: _U32, 0x12: _STR,
    0x13: _U16, 0x15: _STR, 0x16: _BIN, 0x17: _BYTE, 0x18: _U32, 0x19: _BYTE, 0x1A: _STR, 0x1C: _STR,
    0x1F: _STR, 0x21: _U16, 0x22: _U16, 0x23: _U16, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _U32,
    0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}

# Reason codes (§2.4) by name, for error messages.
REASON_NAMES = {
    0x00: "Success", 0x10: "No matching subscribers", 0x11: "No subscription existed",
    0x80: "Unspecified error", 0x81: "Malformed Packet", 0x82: "Protocol Error", 0x83: "Implementation specific error",
    0x84: "Unsupported Protocol Version", 0x85: "Client Identifier not valid", 0x86: "Bad User Name or Password",
    0x87: "Not authorized", 0x88: "Server unavailable", 0x89: "Server busy", 0x8A: "Banned",
    0x8B: "Server shutting down", 0x8C: "Bad authentication method", 0x8D: "Keep Alive timeout",
    0x8E: "Session taken over", 0x8F: "Topic Filter invalid", 0x90: "Topic Name invalid",
    0x91: "Packet Identifier in use", 0x92: "Packet Identifier not found", 0x93: "Receive Maximum exceeded",
    0x94: "Topic Alias invalid", 0x95: "Packet too large", 0x96: "Message rate too high", 0x97: "Quota exceeded",
    0x98: "Administrative action", 0x99: "Payload format invalid", 0x9A: "Retain not supported",
    0x9B: "QoS not supported", 0x9C: "Use another server", 0x9D: "Server moved",
    0x9E: "Shared Subscriptions not supported", 0x9F: "Connection rate exceeded", 0xA0: "Maximum connect time",
    0xA1: "Subscription Identifiers not supported", 0xA2: "Wildcard Subscriptions not supported",
}


class MalformedPacket(ValueError):
    """Bytes from the broker that are not a valid MQTT v5 packet: the connection must end."""


def reason_name(code: int) -> str:
    return REASON_NAMES.get(code, "failure" if code >= 0x80 else "unknown")


# ---- primitives -------------------------------------------------------------------------------------
def varint(n: int) -> bytes:
    """A variable byte integer (§1.5.5)."""
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError(f"variable byte integer out of range: {n}")
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def read_varint(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """``(value, next position)``; ``None`` when ``buf`` ends before the integer does."""
    value, shift = 0, 0
    for i in range(pos, min(pos + 4, len(buf))):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    if len(buf) - pos >= 4:
        raise MalformedPacket("variable byte integer longer than 4 bytes")
    return None


def _str(s: str) -> bytes:
    b = s.encode()
    if len(b) > 0xFFFF:
        raise ValueError("MQTT strings are at most 65,535 bytes")
    return struct.pack("!H", len(b)) + b


def _bin(b: bytes) -> bytes:
    if len(b) > 0xFFFF:
        raise ValueError("MQTT binary data is at most 65,535 bytes")
    return struct.pack("!H", len(b)) + b


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + varint(len(body)) + body


# ---- properties -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublishProperties:
    """The PUBLISH properties PatchCast sends: request/reply (response topic, correlation data), message
    expiry in whole seconds, user properties. ``packed`` is their wire form, length prefix included."""

    response_topic: str | None = None
    correlation_data: bytes | None = None
    expiry_s: int | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    packed: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "packed", pack_publish_properties(
            self.response_topic, self.correlation_data, self.expiry_s, self.user_properties))


NO_PROPERTIES = b"\x00"


def pack_publish_properties(response_topic: str | None, correlation_data: bytes | None, expiry_s: int | None,
                            user_properties: Sequence[tuple[str, str]] = ()) -> bytes:
    """The wire form of :class:`PublishProperties`' fields (for the publish path, without the object)."""
    if response_topic is None and correlation_data is None and expiry_s is None and not user_properties:
        return NO_PROPERTIES
    body = b""
    if expiry_s is not None:
        if not 0 <= expiry_s <= 0xFFFFFFFF:
            raise ValueError(f"message expiry must be 0..2^32-1 seconds, got {expiry_s}")
        body += struct.pack("!BI", MESSAGE_EXPIRY, expiry_s)
    if response_topic is not None:
        body += b"\x08" + _str(response_topic)
    if correlation_data is not None:
        body += b"\x09" + _bin(correlation_data)
    for key, value in user_properties:
        body += b"\x26" + _str(key) + _str(value)
    return varint(len(body)) + body


def read_properties(buf: bytes, pos: int, end: int) -> tuple[dict[int, Any], int]:
    """The property block at ``pos`` (length prefix included): ``({identifier: value}, next position)``.
    User properties come as a list of pairs, subscription identifiers as a list of integers."""
    got = read_varint(buf, pos)
    if got is None:
        raise MalformedPacket("truncated property length")
    length, pos = got
    stop = pos + length
    if stop > end:
        raise MalformedPacket("property block longer than its packet")
    props: dict[int, Any] = {}
    try:
        while pos < stop:
            ident = buf[pos]
            kind = _PROPERTY_KINDS.get(ident)
            pos += 1
            value: Any
            if kind == _BYTE:
                value = buf[pos]
                pos += 1
            elif kind == _U16:
                value = (buf[pos] << 8) | buf[pos + 1]
                pos += 2
            elif kind == _U32:
                (value,) = struct.unpack_from("!I", buf, pos)
                pos += 4
            elif kind == _VARINT:
                got = read_varint(buf, pos)
                if got is None:
                    raise MalformedPacket("truncated property")
                value, pos = got
            elif kind in (_STR, _BIN):
                n = (buf[pos] << 8) | buf[pos + 1]
                raw = bytes(buf[pos + 2:pos + 2 + n])
                if len(raw) != n:
                    raise MalformedPacket("truncated property")
                value = raw.decode() if kind == _STR else raw
                pos += 2 + n
            elif kind == _PAIR:
                pair = []
                for _ in range(2):
                    n = (buf[pos] << 8) | buf[pos + 1]
                    raw = bytes(buf[pos + 2:pos + 2 + n])
                    if len(raw) != n:
                        raise MalformedPacket("truncated user property")
                    pair.append(raw.decode())
                    pos += 2 + n
                props.setdefault(USER_PROPERTY, []).append((pair[0], pair[1]))
                continue
            else:
                raise MalformedPacket(f"unknown property identifier 0x{ident:02X}")
            if ident == SUBSCRIPTION_ID:
                props.setdefault(SUBSCRIPTION_ID, []).append(value)
            else:
                props[ident] = value
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise MalformedPacket(f"bad property block: {exc}") from exc
    if pos != stop:
        raise MalformedPacket("property overruns its block")
    return props, stop


# ---- client → broker --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outgoing:
    """A message to publish later: a will (published by the broker when the connection ends without a
    DISCONNECT), birth messages (on every connect) or farewell messages."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False

    def __post_init__(self) -> None:
        if self.qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {self.qos}")
        if not self.topic or any(c in self.topic for c in "+#"):
            raise ValueError(f"invalid publish topic {self.topic!r}")


def connect_packet(client_id: str, *, keepalive_s: int, username: str | None = None, password: str | None = None,
                   will: Outgoing | None = None, clean_start: bool = True) -> bytes:
    """CONNECT (§3.1): protocol level 5, no properties (a session that ends with the connection)."""
    if not 0 <= keepalive_s <= 0xFFFF:
        raise ValueError(f"keep-alive must be 0..65535 s, got {keepalive_s}")
    flags = 0x02 if clean_start else 0
    payload = _str(client_id)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += NO_PROPERTIES + _str(will.topic) + _bin(will.payload)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
    if password is not None:
        flags |= 0x40
        payload += _bin(password.encode())
    header = b"\x00\x04MQTT\x05" + bytes((flags,)) + struct.pack("!H", keepalive_s) + NO_PROPERTIES
    return _packet(CONNECT << 4, header + payload)


def publish_packet(topic: str, payload: bytes, *, qos: int, retain: bool, packet_id: int,
                   properties: bytes = NO_PROPERTIES, dup: bool = False) -> bytes:
    """PUBLISH (§3.3); ``properties``: a packed property block (:attr:`PublishProperties.packed`)."""
    t = topic.encode()
    remaining = 2 + len(t) + (2 if qos else 0) + len(properties) + len(payload)
    if remaining > MAX_REMAINING_LENGTH:
        raise ValueError("PUBLISH larger than MQTT allows")
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    head = bytes((first,)) + varint(remaining) + struct.pack("!H", len(t)) + t
    if qos:
        head += struct.pack("!H", packet_id)
    return b"".join((head, properties, payload))


def publish_size(topic: str, payload_len: int, qos: int, properties: bytes = NO_PROPERTIES) -> int:
    """Exact size in bytes of the PUBLISH packet :func:`publish_packet` builds."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + len(properties) + payload_len
    return 1 + len(varint(min(remaining, MAX_REMAINING_LENGTH))) + remaining


def ack_packet(kind: int, packet_id: int, reason_code: int = 0) -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP (§3.4–§3.7); a success code is sent in the short form."""
    first = (kind << 4) | (0x02 if kind == PUBREL else 0)
    if reason_code == 0:
        return bytes((first, 2)) + struct.pack("!H", packet_id)
    return bytes((first, 3)) + struct.pack("!HB", packet_id, reason_code)


def subscribe_packet(packet_id: int, filters: Sequence[tuple[str, int]]) -> bytes:
    """SUBSCRIBE (§3.8): each filter with its maximum QoS, no other option."""
    body = struct.pack("!H", packet_id) + NO_PROPERTIES + b"".join(_str(f) + bytes((qos,)) for f, qos in filters)
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def unsubscribe_packet(packet_id: int, filters: Sequence[str]) -> bytes:
    body = struct.pack("!H", packet_id) + NO_PROPERTIES + b"".join(_str(f) for f in filters)
    return _packet((UNSUBSCRIBE << 4) | 0x02, body)


# ---- broker → client --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Incoming:
    """One received message with the MQTT v5 properties PatchCast uses."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    expiry_s: int | None = None  # remaining message-expiry interval as delivered by the broker
    user_properties: tuple[tuple[str, str], ...] = ()
    retain: bool = False
    received_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Connack:
    session_present: bool
    reason_code: int
    properties: dict[int, Any]


def split_packet(buf: bytearray, pos: int, limit: int) -> tuple[int, int, int] | None:
    """The complete packet at ``buf[pos:]``: ``(first byte, body start, body end)``; ``None`` when more
    bytes are needed. A declared length over ``limit`` raises :class:`MalformedPacket` at once."""
    if len(buf) - pos < 2:
        return None
    got = read_varint(buf, pos + 1)
    if got is None:
        return None
    length, start = got
    if length > limit:
        raise MalformedPacket(f"a {length}-byte packet exceeds this client's limit of {limit} bytes")
    end = start + length
    return (buf[pos], start, end) if end <= len(buf) else None


def parse_connack(body: bytes) -> Connack:
    if len(body) < 2:
        raise MalformedPacket("CONNACK shorter than 2 bytes")
    props: dict[int, Any] = {}
    if len(body) > 2:
        props, _ = read_properties(body, 2, len(body))
    return Connack(bool(body[0] & 1), body[1], props)


def parse_publish(first: int, body: bytes) -> tuple[Incoming, int, int]:
    """``(message, qos, packet id)`` of a PUBLISH (packet id 0 at QoS 0)."""
    qos = (first >> 1) & 3
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    try:
        n = (body[0] << 8) | body[1]
        pos = 2 + n
        topic = bytes(body[2:pos]).decode()
        packet_id = 0
        if qos:
            packet_id = (body[pos] << 8) | body[pos + 1]
            pos += 2
    except (IndexError, UnicodeDecodeError) as exc:
        raise MalformedPacket(f"bad PUBLISH header: {exc}") from exc
    end = len(body)
    if pos >= end:
        raise MalformedPacket("PUBLISH without its property length")
    if body[pos] == 0:  # no properties: the common case for a reply
        return Incoming(topic, bytes(body[pos + 1:]), retain=bool(first & 1)), qos, packet_id
    props, pos = read_properties(body, pos, end)
    user = props.get(USER_PROPERTY)
    message = Incoming(topic, bytes(body[pos:]), response_topic=props.get(RESPONSE_TOPIC),
                       correlation_data=props.get(CORRELATION_DATA), expiry_s=props.get(MESSAGE_EXPIRY),
                       user_properties=tuple(user) if user else (), retain=bool(first & 1))
    return message, qos, packet_id


def parse_ack(body: bytes) -> tuple[int, int]:
    """``(packet id, reason code)`` of a PUBACK, PUBREC, PUBREL or PUBCOMP."""
    if len(body) < 2:
        raise MalformedPacket("acknowledgement shorter than 2 bytes")
    return (body[0] << 8) | body[1], body[2] if len(body) > 2 else 0


def parse_suback(body: bytes) -> tuple[int, list[int]]:
    """``(packet id, reason codes)`` of a SUBACK or UNSUBACK."""
    if len(body) < 3:
        raise MalformedPacket("SUBACK/UNSUBACK too short")
    _, pos = read_properties(body, 2, len(body))
    return (body[0] << 8) | body[1], list(body[pos:])


def parse_disconnect(body: bytes) -> tuple[int, str]:
    """``(reason code, reason string)`` of the broker's DISCONNECT."""
    if not len(body):
        return 0, ""
    reason = ""
    if len(body) > 1:
        props, _ = read_properties(body, 1, len(body))
        reason = props.get(REASON_STRING, "")
    return body[0], reason
