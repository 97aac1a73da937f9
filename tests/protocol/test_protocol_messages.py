"""Messages: round trips, field validation and the error code each failure carries."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from protocol_helpers import code_of, make_request, pack, sample_messages, wire

from shared import protocol as P
from shared.errors import BadMaskError, BusyError, ProtocolError, TooLargeError


@pytest.mark.parametrize("message", sample_messages(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: P.Message) -> None:
    data = P.encode(message)
    assert P.decode(data) == message
    assert wire(message)["v"] == P.SCHEMA_VERSION and wire(message)["t"] == message.KIND


def test_typed_decoders_accept_their_kind_and_refuse_others() -> None:
    request, reply, error = make_request(), sample_messages()[2], sample_messages()[3]
    assert P.decode_request(P.encode(request)) == request
    assert P.decode_reply(P.encode(reply)) == reply
    assert P.decode_reply(P.encode(error)) == error
    assert code_of(P.encode(reply), P.decode_request) == "malformed"
    assert code_of(P.encode(request), P.decode_reply) == "malformed"


def test_request_properties_and_pixels() -> None:
    request = make_request("raw", size=64, patch=16, keep_every=3)
    assert request.num_patches == 16 and request.kept == 6
    assert request.indices.tolist() == [0, 3, 6, 9, 12, 15]
    assert request.edge_label == 7
    patches = P.decode_patches(P.decode_request(P.encode(request)))
    assert patches.shape == (6, 16, 16, 3) and patches.dtype == np.uint8


def test_optional_fields_are_left_out_and_unknown_keys_ignored() -> None:
    request = make_request(label=None, deadline=None)
    body = wire(request)
    assert "y" not in body and "dl" not in body
    body["future_field"] = [1, 2, 3]
    assert P.decode_request(pack(body)) == request


def test_ints_are_accepted_for_float_fields() -> None:
    body = wire(make_request(deadline=None))
    body["ts"], body["u"] = 1_763_800_000, 2
    decoded = P.decode_request(pack(body))
    assert decoded.sent_at == 1_763_800_000.0 and isinstance(decoded.sent_at, float)


@pytest.mark.parametrize(("key", "value", "code"), [
    ("v", 2, "bad_version"),
    ("v", True, "bad_version"),
    ("v", None, "bad_version"),
    ("t", "nope", "malformed"),
    ("h", True, "bad_field"),  # bool is not an int
    ("h", 65.0, "bad_field"),
    ("h", 72, "bad_geometry"),  # not a multiple of the patch size
    ("g", [4, 5], "bad_geometry"),
    ("g", [4], "bad_geometry"),
    ("p", 0, "bad_field"),
    ("m", b"\xff", "bad_mask"),  # 16 patches need 2 bytes
    ("m", b"\x00\x00", "bad_mask"),  # keeps nothing
    ("m", "aa", "bad_field"),
    ("c", "gif", "unknown_codec"),
    ("c", 3, "bad_field"),
    ("cp", {"q": 101, "ss": 420}, "bad_field"),
    ("cp", {"q": True}, "bad_field"),
    ("cp", {"zz": 1}, "bad_field"),
    ("cp", [1], "bad_field"),
    ("x", b"", "bad_field"),
    ("k", [1, 2], "bad_field"),  # length differs from kp
    ("k", [1, 1, 2], "bad_field"),  # duplicate class
    ("kp", [0.1, 0.5, 0.2], "bad_field"),  # not sorted
    ("kp", [0.9, 0.5, 0.2], "bad_field"),  # sums past 1
    ("u", float("nan"), "bad_field"),
    ("uk", "Min Entropy", "bad_field"),
    ("ts", -1.0, "bad_field"),
    ("dl", 1.0, "bad_field"),  # before sent_at
    ("y", False, "bad_field"),
    ("y", -3, "bad_field"),
    ("d", "cam/01", "bad_field"),
    ("d", "cam+", "bad_field"),
    ("d", "x" * 65, "bad_field"),
    ("r", "", "bad_field"),
])
def test_request_field_errors_carry_their_code(key: str, value: object, code: str) -> None:
    body = wire(make_request(size=64, patch=16, keep_every=2))
    body[key] = value
    assert code_of(pack(body), P.decode_request) == code


@pytest.mark.parametrize("key", ["d", "r", "h", "w", "p", "g", "m", "c", "cp", "x", "k", "kp", "u", "uk",
                                 "ts"])
def test_missing_required_field_is_malformed(key: str) -> None:
    body = wire(make_request())
    del body[key]
    assert code_of(pack(body), P.decode_request) == "malformed"


def test_padding_bits_of_the_mask_must_be_zero() -> None:
    # 12×12 patches of 4 px on a 48×48 image: 144 patches → 18 bytes, no padding; use 44×44 → 121.
    request = make_request("raw", size=44, patch=4, keep_every=5)
    body = wire(request)
    mask = bytearray(body["m"])
    mask[-1] |= 0x01  # bit 127 > 120
    body["m"] = bytes(mask)
    assert code_of(pack(body), P.decode_request) == "bad_mask"


@pytest.mark.parametrize("data", [
    b"", b"\xc1", pack([1, 2]), pack("req"), pack({"v": 1}) + b"\x00", pack({1: 2}),
    b"\xd6\xff\x00\x00\x00\x01",  # a msgpack timestamp
    pack(msgpack.ExtType(5, b"abc")),
    b"\x91" * 5000,  # nesting deeper than msgpack's stack
    b"\xa2\xff\xfe",  # invalid utf-8
])
def test_malformed_bytes(data: bytes) -> None:
    assert code_of(data) in {"malformed", "bad_version"}


def test_ext_types_inside_fields_are_refused() -> None:
    body = wire(make_request())
    body["ts"] = msgpack.ExtType(1, b"12345678")
    assert code_of(pack(body), P.decode_request) == "malformed"
    body["ts"] = msgpack.Timestamp(1, 0)
    assert code_of(pack(body), P.decode_request) == "malformed"


def test_payload_that_does_not_match_the_mask_is_refused_before_any_tensor() -> None:
    a = make_request("raw", keep_every=2)  # 8 patches
    b = make_request("raw", keep_every=4)  # 4 patches
    body = wire(a)
    body["x"] = wire(b)["x"]
    request = P.decode_request(pack(body))  # structurally fine
    with pytest.raises(ProtocolError) as info:
        P.decode_patches(request)
    assert info.value.code == "bad_payload"


def test_local_construction_validates_too() -> None:
    request = make_request()
    with pytest.raises(BadMaskError):
        P.PatchRequest(**{**request.__dict__, "mask": b"\x00\x00"})
    with pytest.raises(ProtocolError):
        P.PatchRequest(**{**request.__dict__, "height": np.int64(64)})  # numpy ints are not ints
    with pytest.raises(ProtocolError):
        P.Reply("r1", 3, (3,), (0.9,), 1.0, 1.0, 1.0, "w1", 0)  # batch size ≥ 1
    with pytest.raises(ProtocolError):
        P.Outcome("cam-01", "r1", 1.0, "edge", 5, 196, 100, None, 1, 1)  # edge sends nothing
    with pytest.raises(ProtocolError):
        P.EdgeMetrics("cam-01", 1.0, 5.0, 10, 4, 3, 1, 1, 0, 0, None, None, None)  # 5 answers for 4 sent
    with pytest.raises(ProtocolError):
        P.Availability("robot", "x", "online", 1.0)
    with pytest.raises(ProtocolError):
        P.WorkerMetrics("w1", "m", 1.0, 5.0, 0, 0, 0.0, 0, 0.0, 0, 0.0, 0, 0.0, 1.5, 0.0, 0.0, 0.0)


def test_error_reply_from_exception_keeps_the_code() -> None:
    reply = P.ErrorReply.from_error(BusyError("queue full"), request_id="r1", worker_id="w1")
    assert reply.code == "busy" and reply.message == "queue full"
    other = P.ErrorReply.from_error(RuntimeError("x" * 5000), request_id=None, worker_id="w1")
    assert other.code == "internal" and len(other.message) == 1024


def test_size_limits_are_enforced_before_and_while_unpacking() -> None:
    request = make_request("raw", size=64, keep_every=1)  # 12 KB payload
    data = P.encode(request)
    just_under = P.ProtocolLimits(max_message_bytes=len(data) - 1)
    assert code_of(data, P.decode_request, limits=just_under) == "too_large"
    assert code_of(data, P.decode_request, limits=P.ProtocolLimits(max_payload_bytes=1000)) == "too_large"
    assert code_of(data, P.decode_request, limits=P.ProtocolLimits(max_pixels=64 * 64 - 1)) == "too_large"
    assert code_of(data, P.decode_request, limits=P.ProtocolLimits(max_patches=15)) == "too_large"
    assert code_of(data, P.decode_request, limits=P.ProtocolLimits(max_patch_size=8)) == "too_large"
    assert code_of(data, P.decode_request, limits=P.ProtocolLimits(max_topk=2)) == "too_large"
    assert code_of(data, P.decode_request, limits=P.ProtocolLimits(max_str_len=5)) == "too_large"
    assert code_of(data, P.decode_request, limits=P.ProtocolLimits(max_map_len=10)) == "too_large"
    long_topk = pack({"v": 1, "t": "rep", "k": list(range(2000))})
    assert code_of(long_topk, limits=P.ProtocolLimits()) == "too_large"
    with pytest.raises(TooLargeError):
        P.encode(request, limits=P.ProtocolLimits(max_message_bytes=1000))


def test_limits_must_be_positive_ints() -> None:
    with pytest.raises(ProtocolError):
        P.ProtocolLimits(max_patches=0)
    with pytest.raises(ProtocolError):
        P.ProtocolLimits(max_patches=True)


def test_worker_metrics_without_arrival_lateness_still_decode() -> None:
    """``arrival_ms_p95`` ("al") came after schema v1's first workers: absent on the wire means 0."""
    import msgpack

    full = P.WorkerMetrics("w1", "m", 1.0, 5.0, 0, 8, 0.0, 0, 0.0, 0, 0.0, 0, 0.0, 0.5, 0.0, 0.0, 0.0, {}, 250.0)
    raw = msgpack.unpackb(P.encode(full), raw=False)
    assert raw["al"] == 250.0
    del raw["al"]
    older = P.decode(msgpack.packb(raw, use_bin_type=True))
    assert isinstance(older, P.WorkerMetrics) and older.arrival_ms_p95 == 0.0
    with pytest.raises(ProtocolError):
        P.WorkerMetrics("w1", "m", 1.0, 5.0, 0, 8, 0.0, 0, 0.0, 0, 0.0, 0, 0.0, 0.5, 0.0, 0.0, 0.0, {}, -1.0)


def test_outcome_full_bytes_is_optional_and_only_for_sent_images() -> None:
    import msgpack

    sent = P.Outcome("cam-01", "r1", 1.0, "server", 20, 64, 600, 12.0, 3, 3, 3, 1.5, None, 1_100)
    raw = msgpack.unpackb(P.encode(sent), raw=False)
    assert raw["fb"] == 1_100
    del raw["fb"]
    older = P.decode(msgpack.packb(raw, use_bin_type=True))  # devices that do not measure it
    assert isinstance(older, P.Outcome) and older.full_bytes is None
    with pytest.raises(ProtocolError):
        P.Outcome("cam-01", "r2", 1.0, "edge", 0, 64, 0, None, 3, 3, 3, 0.2, None, 1_100)
    with pytest.raises(ProtocolError):
        P.Outcome("cam-01", "r3", 1.0, "server", 20, 64, 600, 12.0, 3, 3, 3, 1.5, None, -5)
