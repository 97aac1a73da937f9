"""The MQTT v5 codec (shared.mqtt_packets): exact encodings from the standard's layouts, round trips,
a third-party encoder (paho) as the reference where it is installed, and malformed broker bytes that
must raise MalformedPacket, never anything else."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import mqtt_packets as mp


def frame(packet: bytes) -> tuple[int, bytes]:
    """(first byte, body) of one whole packet, through the streaming splitter."""
    buf = bytearray(packet)
    found = mp.split_packet(buf, 0, 1 << 20)
    assert found is not None
    first, start, end = found
    assert end == len(packet)
    return first, bytes(buf[start:end])


def test_varint_matches_the_standard_examples() -> None:
    # MQTT v5 §1.5.5: the boundaries of 1, 2, 3 and 4-byte encodings.
    for value, wire in [(0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"),
                        (16_384, b"\x80\x80\x01"), (2_097_151, b"\xff\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01"),
                        (268_435_455, b"\xff\xff\xff\x7f")]:
        assert mp.varint(value) == wire
        assert mp.read_varint(wire, 0) == (value, len(wire))
    with pytest.raises(ValueError):
        mp.varint(268_435_456)
    assert mp.read_varint(b"\x80\x80", 0) is None  # more bytes needed
    with pytest.raises(mp.MalformedPacket):
        mp.read_varint(b"\x80\x80\x80\x80\x01", 0)  # a fifth byte


def test_connect_packet_layout() -> None:
    packet = mp.connect_packet("dev-1", keepalive_s=30, username="u", password="pw",
                               will=mp.Outgoing("a/b", b"bye", qos=1, retain=True))
    first, body = frame(packet)
    assert first == 0x10
    assert body[:7] == b"\x00\x04MQTT\x05"
    # username, password, will retain, will QoS 1, will flag, clean start
    assert body[7] == 0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02
    assert struct.unpack("!H", body[8:10]) == (30,) and body[10] == 0  # keep-alive, no properties
    assert body[11:] == b"\x00\x05dev-1" + b"\x00" + b"\x00\x03a/b" + b"\x00\x03bye" + b"\x00\x01u" + b"\x00\x02pw"
    anonymous = frame(mp.connect_packet("x", keepalive_s=0))[1]
    assert anonymous[7] == 0x02 and anonymous[11:] == b"\x00\x01x"


def test_publish_round_trip_with_every_property() -> None:
    props = mp.PublishProperties(response_topic="r/dev", correlation_data=b"\x00\xff", expiry_s=7,
                                 user_properties=(("k", "v"), ("k", "w")))
    payload = bytes(range(256)) * 3
    packet = mp.publish_packet("req/m/dev", payload, qos=1, retain=True, packet_id=513, properties=props.packed)
    assert len(packet) == mp.publish_size("req/m/dev", len(payload), 1, props.packed)
    first, body = frame(packet)
    assert first == 0x30 | 0x02 | 0x01
    message, qos, packet_id = mp.parse_publish(first, body)
    assert (qos, packet_id) == (1, 513)
    assert (message.topic, message.payload, message.retain) == ("req/m/dev", payload, True)
    assert (message.response_topic, message.correlation_data, message.expiry_s) == ("r/dev", b"\x00\xff", 7)
    assert message.user_properties == (("k", "v"), ("k", "w"))
    bare, qos0, pid0 = mp.parse_publish(*frame(mp.publish_packet("t", b"", qos=0, retain=False, packet_id=0)))
    assert (bare.topic, bare.payload, bare.response_topic, qos0, pid0) == ("t", b"", None, 0, 0)


def test_properties_agree_with_paho() -> None:
    """A third-party MQTT v5 implementation reads our property block as we meant it, and we read its."""
    paho_properties = pytest.importorskip("paho.mqtt.properties")
    packettypes = pytest.importorskip("paho.mqtt.packettypes")
    ours = mp.PublishProperties(response_topic="r/x", correlation_data=b"abc", expiry_s=30,
                                user_properties=(("a", "1"),))
    theirs = paho_properties.Properties(packettypes.PacketTypes.PUBLISH)
    theirs.unpack(ours.packed)
    assert (theirs.ResponseTopic, theirs.CorrelationData, theirs.MessageExpiryInterval) == ("r/x", b"abc", 30)
    assert theirs.UserProperty == [("a", "1")]
    decoded, end = mp.read_properties(theirs.pack(), 0, len(theirs.pack()))
    assert end == len(theirs.pack())
    assert decoded[mp.RESPONSE_TOPIC] == "r/x" and decoded[mp.CORRELATION_DATA] == b"abc"
    assert decoded[mp.MESSAGE_EXPIRY] == 30 and decoded[mp.USER_PROPERTY] == [("a", "1")]


def test_acknowledgements_subscribe_and_disconnect() -> None:
    assert mp.ack_packet(mp.PUBACK, 7) == b"\x40\x02\x00\x07"
    assert mp.ack_packet(mp.PUBREL, 7) == b"\x62\x02\x00\x07"  # PUBREL's fixed flags 0010
    assert mp.ack_packet(mp.PUBACK, 7, 0x87) == b"\x40\x03\x00\x07\x87"
    assert mp.parse_ack(b"\x00\x07") == (7, 0)  # the short form means success
    assert mp.parse_ack(b"\x00\x07\x10\x00") == (7, 0x10)
    assert mp.subscribe_packet(1, [("a/#", 1)]) == b"\x82\x09\x00\x01\x00\x00\x03a/#\x01"
    assert mp.unsubscribe_packet(2, ["a/#"]) == b"\xa2\x08\x00\x02\x00\x00\x03a/#"
    assert mp.parse_suback(b"\x00\x01\x00\x01\x87") == (1, [1, 0x87])
    assert mp.parse_disconnect(b"") == (0, "")
    reason = b"\x1f\x00\x04gone"
    assert mp.parse_disconnect(b"\x8e" + mp.varint(len(reason)) + reason) == (0x8E, "gone")
    connack = mp.parse_connack(b"\x00\x00\x08\x21\x00\x14\x27\x00\x10\x00\x00")
    assert connack.reason_code == 0 and not connack.session_present
    assert connack.properties == {mp.RECEIVE_MAXIMUM: 20, mp.MAXIMUM_PACKET_SIZE: 1 << 20}


def test_splitter_waits_for_whole_packets_and_refuses_oversize() -> None:
    packet = mp.publish_packet("t", b"x" * 300, qos=1, retain=False, packet_id=1)
    buf = bytearray()
    for i, byte in enumerate(packet):
        assert mp.split_packet(buf, 0, 1 << 20) is None, f"a packet before its byte {i}"
        buf.append(byte)
    assert mp.split_packet(buf, 0, 1 << 20) is not None
    with pytest.raises(mp.MalformedPacket, match="exceeds"):
        mp.split_packet(buf, 0, 100)
    two = bytearray(mp.ack_packet(mp.PUBACK, 1) + mp.ack_packet(mp.PUBACK, 2))
    first = mp.split_packet(two, 0, 100)
    assert first is not None
    second = mp.split_packet(two, first[2], 100)
    assert second is not None and mp.parse_ack(bytes(two[second[1]:second[2]])) == (2, 0)


@pytest.mark.parametrize("first, body", [
    (0x36, b"\x00\x01t\x00\x01\x00"),               # QoS 3
    (0x30, b"\x00\x05ab"),                           # topic longer than the packet
    (0x30, b"\x00\x01t"),                            # no property length
    (0x30, b"\x00\x02\xff\xfe\x00"),                 # topic not UTF-8
    (0x30, b"\x00\x01t\x05\x08\x00\x09ab"),          # a property longer than its block
    (0x30, b"\x00\x01t\x02\x7f\x00"),                # an unknown property
    (0x30, b"\x00\x01t\x04\x08\x00\x02\xc3"),        # block overrun by a truncated string
])
def test_malformed_publish_raises_malformed_packet(first: int, body: bytes) -> None:
    with pytest.raises(mp.MalformedPacket):
        mp.parse_publish(first, body)


@settings(max_examples=400, deadline=None)
@given(first=st.integers(0x30, 0x3F), body=st.binary(max_size=64))
def test_any_publish_body_parses_or_raises_malformed(first: int, body: bytes) -> None:
    try:
        message, qos, _ = mp.parse_publish(first, body)
    except mp.MalformedPacket:
        return
    assert qos in (0, 1, 2) and isinstance(message.payload, bytes)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=40))
def test_any_ack_connack_or_disconnect_parses_or_raises_malformed(body: bytes) -> None:
    for parse in (mp.parse_connack, mp.parse_suback, mp.parse_disconnect, mp.parse_ack):
        try:
            got = parse(body)
        except mp.MalformedPacket:
            continue
        assert isinstance(got, mp.Connack | tuple)


def test_reason_names() -> None:
    assert mp.reason_name(0x87) == "Not authorized" and mp.reason_name(0xFE) == "failure"
