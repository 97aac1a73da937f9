"""Region retransmission on the wire: the global and region steps of a PatchRequest (``downscale`` "sc",
``exchange`` "ex"), the worker's RegionRequest ("rgq"), what a device's reply topic may carry, and the
region topics. Hostile inputs are refused with their error class and code, as for the other messages.

Everything here is exact (no tolerances): bytes, ints and floats that msgpack carries unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from protocol_helpers import code_of, make_request, pack, sample_messages, wire

from shared import protocol as P
from shared.bitmask import pack_mask
from shared.errors import (
    BadFieldError,
    BadGeometryError,
    BadMaskError,
    BadTopicError,
    ProtocolError,
    UnknownExchangeError,
)
from shared.topics import V1, Topics


def global_request(**overrides: object) -> P.PatchRequest:
    """The glance: a 64×64 image in 16-px patches (standing for a 128×128 one downsampled by 2), every patch."""
    kw: dict[str, object] = {"downscale": 2}
    kw.update(overrides)
    return make_request("raw", size=64, patch=16, keep_every=1, **kw)


def region_request(**overrides: object) -> P.PatchRequest:
    """The region: the window [5, 6, 9, 10] of a 4×4 grid, at full resolution, under an exchange id."""
    kw: dict[str, object] = {"indices": np.array([5, 6, 9, 10]), "scores": None, "exchange": "xa1b2c3.7"}
    kw.update(overrides)
    return make_request("raw", size=64, patch=16, **kw)


WINDOW = pack_mask([5, 6, 9, 10], 16)


def region_ask(**overrides: object) -> P.RegionRequest:
    kw: dict[str, object] = dict(
        request_id="r-000042", exchange="xa1b2c3.7", patch_size=16, grid=(4, 4), mask=WINDOW,
        topk_ids=(7, 3), topk_probs=(0.4, 0.3), uncertainty=1.75, worker_id="worker-1", ttl_s=5.0)
    kw.update(overrides)
    return P.RegionRequest(**kw)  # type: ignore[arg-type]


# ---- round trips -------------------------------------------------------------------------------


def test_a_global_request_round_trips() -> None:
    request = global_request()
    assert request.downscale == 2 and request.exchange is None and request.stage == "global"
    assert request.kept == 16
    body = wire(request)
    assert body["sc"] == 2 and "ex" not in body and body["t"] == "req"
    decoded = P.decode_request(P.encode(request))
    assert decoded == request and decoded.stage == "global"


def test_a_region_request_round_trips() -> None:
    request = region_request()
    assert request.exchange == "xa1b2c3.7" and request.downscale is None and request.stage == "region"
    body = wire(request)
    assert body["ex"] == "xa1b2c3.7" and "sc" not in body
    decoded = P.decode_request(P.encode(request))
    assert decoded == request and decoded.stage == "region"
    assert decoded.indices.tolist() == [5, 6, 9, 10]
    assert P.decode_patches(decoded).shape == (4, 16, 16, 3)


def test_a_plain_request_has_neither_field_on_the_wire() -> None:
    request = make_request()
    assert request.stage == "patches"
    body = wire(request)
    assert "sc" not in body and "ex" not in body


def test_stage_of_each_kind() -> None:
    assert [r.stage for r in (make_request(), global_request(), region_request())] == ["patches", "global", "region"]
    assert global_request(downscale=16).stage == "global"


def test_a_region_ask_round_trips() -> None:
    ask = region_ask(grid=[4, 4], mask=bytearray(WINDOW), uncertainty=2)  # normalised on construction
    assert ask.grid == (4, 4) and isinstance(ask.mask, bytes) and ask.uncertainty == 2.0
    assert isinstance(ask.uncertainty, float)
    body = wire(ask)
    assert body["t"] == "rgq" and body["v"] == P.SCHEMA_VERSION
    assert set(body) == {"v", "t", "r", "x", "p", "g", "m", "k", "kp", "u", "wk", "tl"}
    for decoded in (P.decode(P.encode(ask)), P.decode_device_message(P.encode(ask))):
        assert isinstance(decoded, P.RegionRequest)
        assert decoded == ask
        assert decoded.indices.tolist() == [5, 6, 9, 10]
        assert decoded.indices.dtype == np.int64


def test_a_region_ask_ignores_unknown_keys() -> None:
    body = wire(region_ask())
    body["future"] = {"a": 1}
    assert P.decode_device_message(pack(body)) == region_ask()


# ---- refusals: PatchRequest ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 17, 0, -2, True, False, 2.0, "2", [2]])
def test_downscale_out_of_range_or_of_the_wrong_type_is_refused(value: object) -> None:
    body = wire(global_request())
    body["sc"] = value
    assert code_of(pack(body), P.decode_request) == "bad_field"
    with pytest.raises(BadFieldError):
        global_request(downscale=value)


def test_downscale_bounds_are_inclusive() -> None:
    assert global_request(downscale=2).downscale == 2
    assert global_request(downscale=P.MAX_DOWNSCALE).downscale == P.MAX_DOWNSCALE == 16


def test_a_downscaled_request_must_keep_every_patch() -> None:
    with pytest.raises(BadMaskError):
        make_request("raw", size=64, patch=16, keep_every=2, downscale=2)
    body = wire(make_request("raw", size=64, patch=16, keep_every=2))  # 8 of 16 patches
    body["sc"] = 2
    assert code_of(pack(body), P.decode_request) == "bad_mask"
    # One patch short of all of them.
    almost = make_request("raw", size=64, patch=16, indices=np.arange(15), scores=None)
    body = wire(almost)
    body["sc"] = 2
    assert code_of(pack(body), P.decode_request) == "bad_mask"


def test_downscale_and_exchange_together_are_refused() -> None:
    with pytest.raises(BadFieldError, match="not both"):
        global_request(exchange="xa1b2c3.7")
    body = wire(global_request())
    body["ex"] = "xa1b2c3.7"
    assert code_of(pack(body), P.decode_request) == "bad_field"


@pytest.mark.parametrize("value", ["x/1", "x+", "#", "", "x" * 65, "a b", "é", 7, b"x1", True])
def test_a_bad_exchange_id_is_refused(value: object) -> None:
    body = wire(region_request())
    body["ex"] = value
    assert code_of(pack(body), P.decode_request) == "bad_field"
    with pytest.raises(BadFieldError):
        region_request(exchange=value)


def test_the_longest_exchange_id_is_accepted() -> None:
    assert region_request(exchange="x" * 64).exchange == "x" * 64


def test_nil_optional_fields_mean_absent() -> None:
    body = wire(make_request())
    body["sc"], body["ex"] = None, None
    assert P.decode_request(pack(body)).stage == "patches"


# ---- refusals: RegionRequest ---------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "code"), [
    ("m", b"", "bad_mask"),  # empty
    ("m", b"\x00\x00", "bad_mask"),  # keeps no patch
    ("m", b"\x06", "bad_mask"),  # 16 patches need 2 bytes
    ("m", b"\x06\x60\x00", "bad_mask"),  # one byte too many
    ("m", "\x06\x60", "bad_field"),  # a string, not bytes
    ("g", [4], "bad_geometry"),
    ("g", [], "bad_geometry"),
    ("g", [0, 4], "bad_geometry"),
    ("g", [4, -1], "bad_geometry"),
    ("g", [4, 4, 1], "bad_field"),  # three sides
    ("g", [4.0, 4], "bad_field"),
    ("g", [True, 4], "bad_field"),
    ("g", "ab", "bad_field"),
    ("g", [65_536, 1], "bad_geometry"),
    ("k", [], "bad_field"),  # with kp: the glance's top-k is required…
    ("p", 0, "bad_field"),
    ("p", 257, "bad_field"),
    ("p", True, "bad_field"),
    ("tl", 0, "bad_field"),
    ("tl", 0.0, "bad_field"),
    ("tl", -1.0, "bad_field"),
    ("tl", float("nan"), "bad_field"),
    ("tl", float("inf"), "bad_field"),
    ("tl", 3600.5, "bad_field"),
    ("tl", True, "bad_field"),
    ("u", float("nan"), "bad_field"),
    ("x", "x/1", "bad_field"),
    ("x", "x" * 65, "bad_field"),
    ("x", "", "bad_field"),
    ("r", "r+1", "bad_field"),
    ("wk", "$SYS", "bad_field"),
    ("kp", [0.3, 0.4], "bad_field"),  # not sorted
])
def test_region_ask_field_errors_carry_their_code(key: str, value: object, code: str) -> None:
    body = wire(region_ask())
    body[key] = value
    if key == "k":
        body["kp"] = []
    assert code_of(pack(body), P.decode_device_message) == code


def test_region_ask_local_construction_refuses_the_same() -> None:
    with pytest.raises(BadMaskError):
        region_ask(mask=b"")
    with pytest.raises(BadMaskError, match="keeps no patch"):
        region_ask(mask=b"\x00\x00")
    with pytest.raises(BadMaskError):
        region_ask(mask=b"\x06")
    with pytest.raises(BadMaskError):
        region_ask(grid=(3, 3), mask=b"\x80\x01")  # 9 patches: bit 15 is padding
    with pytest.raises(BadGeometryError):
        region_ask(grid=(4,))
    with pytest.raises(BadGeometryError):
        region_ask(grid=(0, 4), mask=b"")
    with pytest.raises(BadFieldError):
        region_ask(grid=(np.int64(4), 4))  # numpy ints are not ints
    with pytest.raises(BadFieldError, match="top-k"):
        region_ask(topk_ids=(), topk_probs=())
    for ttl in (0.0, -1.0, math.nan, -math.inf):
        with pytest.raises(BadFieldError):
            region_ask(ttl_s=ttl)
    assert region_ask(ttl_s=0.001).ttl_s == 0.001 and region_ask(ttl_s=3600).ttl_s == 3600.0


def test_region_ask_padding_bits_must_be_zero_on_the_wire() -> None:
    body = wire(region_ask(grid=(3, 3), mask=pack_mask([0, 4], 9)))
    assert P.decode(pack(body)) == region_ask(grid=(3, 3), mask=pack_mask([0, 4], 9))
    body["m"] = bytes([body["m"][0], body["m"][1] | 0x01])
    assert code_of(pack(body), P.decode_device_message) == "bad_mask"


@pytest.mark.parametrize("key", ["r", "x", "p", "g", "m", "k", "kp", "u", "wk", "tl"])
def test_region_ask_missing_required_field_is_malformed(key: str) -> None:
    body = wire(region_ask())
    del body[key]
    assert code_of(pack(body), P.decode_device_message) == "malformed"


def test_region_ask_top_k_is_bounded_by_the_limits() -> None:
    ask = region_ask(topk_ids=(1, 2, 3), topk_probs=(0.3, 0.2, 0.1))
    data = P.encode(ask)
    assert P.decode_device_message(data, limits=P.ProtocolLimits(max_topk=3)) == ask
    assert code_of(data, P.decode_device_message, limits=P.ProtocolLimits(max_topk=2)) == "too_large"
    assert code_of(data, P.decode_device_message, limits=P.ProtocolLimits(max_message_bytes=len(data) - 1)) \
        == "too_large"


# ---- which decoder takes what ----------------------------------------------------------------------


def test_decode_device_message_takes_what_a_reply_topic_carries() -> None:
    reply, error, ask = sample_messages()[2], sample_messages()[3], region_ask()
    for message in (reply, error, ask):
        decoded = P.decode_device_message(P.encode(message))
        assert type(decoded) is type(message) and decoded == message
    for other in (make_request(), global_request(), region_request(), sample_messages()[5]):
        assert code_of(P.encode(other), P.decode_device_message) == "malformed"


def test_older_decoders_refuse_a_region_ask() -> None:
    """A device that predates the mode reads its reply topic with decode_reply: a RegionRequest is
    refused as malformed, never taken for a Reply (its keys overlap: r, k, kp, wk)."""
    data = P.encode(region_ask())
    assert code_of(data, P.decode_reply) == "malformed"
    assert code_of(data, P.decode_request) == "malformed"
    with pytest.raises(ProtocolError) as info:
        P.decode_reply(data)
    assert "rgq" in info.value.message
    # And a Reply with "rgq" as its kind is validated as a RegionRequest, not passed off as a Reply.
    body = wire(sample_messages()[2])
    body["t"] = "rgq"
    assert code_of(pack(body), P.decode_device_message) == "malformed"  # lacks x, p, g, m, u, tl


def test_unknown_exchange_error_code() -> None:
    exc = UnknownExchangeError("no open exchange")
    assert exc.code == "no_exchange" and isinstance(exc, ProtocolError)
    reply = P.ErrorReply.from_error(exc, request_id="r-1", worker_id="w-1")
    assert reply.code == "no_exchange"
    assert P.decode_device_message(P.encode(reply)) == reply


# ---- topics ----------------------------------------------------------------------------------------


def test_region_topics() -> None:
    assert V1.region("worker-1", "cam-01") == "patchcast/v1/region/worker-1/cam-01"
    assert V1.region_filter("worker-1") == "patchcast/v1/region/worker-1/+"
    assert Topics("test/ns").region("w", "d") == "test/ns/region/w/d"
    assert V1.parse_region(V1.region("w.1:a", "cam_7-x")) == ("w.1:a", "cam_7-x")
    assert Topics("test/ns").parse_region("test/ns/region/w/d") == ("w", "d")


@pytest.mark.parametrize("topic", [
    "patchcast/v1/req/m/d", "patchcast/v1/reply/d", "patchcast/v2/region/w/d", "other/region/w/d",
    "patchcast/v1/regions/w/d", "patchcast/v1/region", "xpatchcast/v1/region/w/d", "",
])
def test_parse_region_of_another_topic_is_none(topic: str) -> None:
    assert V1.parse_region(topic) is None


def test_parse_region_under_another_prefix_is_none() -> None:
    assert Topics("test/ns").parse_region(V1.region("w", "d")) is None
    assert V1.parse_region(Topics("test/ns").region("w", "d")) is None


@pytest.mark.parametrize("topic", [
    "patchcast/v1/region/w/d/x",  # an extra level
    "patchcast/v1/region/w",  # a missing one
    "patchcast/v1/region/",
    "patchcast/v1/region/w/+",  # a filter, not a topic
    "patchcast/v1/region/#/d",
    "patchcast/v1/region//d",
    "patchcast/v1/region/w/",
    "patchcast/v1/region/w/" + "d" * 65,
    "patchcast/v1/region/$w/d",
    "patchcast/v1/region/w/d d",
])
def test_parse_region_refuses_a_malformed_region_topic(topic: str) -> None:
    with pytest.raises(BadTopicError):
        V1.parse_region(topic)


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "$SYS", "x" * 65, "a b", 3, None])
def test_region_topic_ids_are_validated(bad: object) -> None:
    with pytest.raises(BadTopicError):
        V1.region(bad, "cam-01")  # type: ignore[arg-type]
    with pytest.raises(BadTopicError):
        V1.region("worker-1", bad)  # type: ignore[arg-type]
    with pytest.raises(BadTopicError):
        V1.region_filter(bad)  # type: ignore[arg-type]
