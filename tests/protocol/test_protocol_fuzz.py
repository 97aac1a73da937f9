"""Hypothesis fuzzing: hostile bytes never crash the decoder, and valid messages round-trip.

"Never crash" means: the only exceptions are ProtocolError subclasses (with a known code). A request
that survives decoding is also pushed through ``decode_patches``, where the codecs parse the payload.
"""

from __future__ import annotations

import os
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_helpers import make_request, natural_image, sample_messages

from shared import codecs as C
from shared import protocol as P
from shared.errors import ProtocolError

# 200 examples keep the folder under a minute; a nightly job can fuzz longer with PATCHCAST_FUZZ_EXAMPLES.
FUZZ = settings(max_examples=int(os.environ.get("PATCHCAST_FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
CODES = {"too_large", "malformed", "bad_version", "bad_field", "bad_geometry", "bad_mask", "unknown_codec",
         "bad_payload"}
LIMITS = P.ProtocolLimits(max_message_bytes=64 * 1024)
# Small valid seeds of every kind (and every codec) to mutate.
SEEDS = [P.encode(m) for m in sample_messages()] + [
    P.encode(make_request(c.name, size=32, patch=8, keep_every=3)) for c in C.list_codecs()]


def decode_fully(data: bytes) -> None:
    """Decode like a worker would; fail the test on anything but a ProtocolError with a known code."""
    try:
        message = P.decode(data, limits=LIMITS)
        if isinstance(message, P.PatchRequest):
            patches = P.decode_patches(message)
            assert patches.shape == (message.kept, message.patch_size, message.patch_size, 3)
            assert patches.dtype == np.uint8
    except ProtocolError as exc:
        assert exc.code in CODES, exc.code


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    decode_fully(data)


@FUZZ
@given(st.sampled_from(SEEDS), st.data())
def test_mutated_bytes(seed: bytes, data: st.DataObject) -> None:
    buf = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[pos] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and buf:
            del buf[pos:pos + data.draw(st.integers(1, 16))]
        elif op == "truncate":
            del buf[pos:]
    decode_fully(bytes(buf))


# Values msgpack can carry, including the awkward ones (bools, huge ints, NaN, nested containers).
wire_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True)
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=10)


@FUZZ
@given(st.sampled_from(SEEDS), st.data())
def test_mutated_fields(seed: bytes, data: st.DataObject) -> None:
    body: dict[str, Any] = msgpack.unpackb(seed, raw=False)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from([*body.keys(), "zz"]))
        if data.draw(st.booleans()) and key in body:
            del body[key]
        else:
            body[key] = data.draw(wire_values)
    decode_fully(msgpack.packb(body, use_bin_type=True))


@FUZZ
@given(st.sampled_from(C.list_codecs()), st.binary(max_size=4096),
       st.sampled_from([(32, 8), (64, 16), (32, 4)]), st.integers(1, 16))
def test_codecs_on_random_payloads(codec: C.Codec, payload: bytes, geometry: tuple[int, int], k: int) -> None:
    side, patch = geometry
    indices = np.arange(min(k, (side // patch) ** 2))
    try:
        out = codec.decode(payload, (side, side), indices, patch)
        assert out.shape == (indices.size, patch, patch, 3)
    except ProtocolError as exc:
        assert exc.code in CODES


ids = st.text(alphabet="abcXYZ019_.:-", min_size=1, max_size=64)
unit = st.floats(0.0, 1.0)


@st.composite
def topk(draw: st.DrawFn) -> tuple[list[int], list[float]]:
    classes = draw(st.lists(st.integers(0, 2**31 - 1), unique=True, max_size=10))
    probs = sorted(draw(st.lists(unit, min_size=len(classes), max_size=len(classes))), reverse=True)
    total = sum(probs)
    return classes, [p / total for p in probs] if total > 1 else probs


@FUZZ
@given(ids, ids, st.sampled_from([(32, 4), (32, 8), (64, 16), (48, 16)]), st.sampled_from(C.list_codecs()),
       st.data(), topk(), st.floats(0, 2e9), st.none() | st.integers(0, 999))
def test_valid_requests_round_trip(device: str, request_id: str, geometry: tuple[int, int], codec: C.Codec,
                                   data: st.DataObject, top: tuple[list[int], list[float]], sent_at: float,
                                   label: int | None) -> None:
    side, patch = geometry
    n = (side // patch) ** 2
    indices = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))
    request = P.build_request(
        device_id=device, request_id=request_id, pixels=natural_image(side, side, seed=len(indices)),
        indices=indices, patch_size=patch, codec=codec.name, scores=np.arange(len(indices), dtype=float),
        topk_ids=top[0], topk_probs=top[1], uncertainty=0.5, sent_at=sent_at, label=label)
    decoded = P.decode_request(P.encode(request))
    assert decoded == request
    patches = P.decode_patches(decoded)
    if codec.lossless:
        assert np.array_equal(patches, C.extract_patches(natural_image(side, side, seed=len(indices)),
                                                         np.array(indices), patch))


@FUZZ
@given(ids, st.integers(0, 2**31 - 1), topk(), st.floats(0, 1e6), st.floats(0, 1e6), st.floats(0, 1e6), ids,
       st.integers(1, 4096))
def test_valid_replies_round_trip(request_id: str, label: int, top: tuple[list[int], list[float]], q: float,
                                  i: float, t: float, worker: str, batch: int) -> None:
    reply = P.Reply(request_id, label, tuple(top[0]), tuple(top[1]), q, i, t, worker, batch)
    assert P.decode_reply(P.encode(reply)) == reply
