"""shared.wire_fast against the full validators: it never accepts what they refuse, and what it accepts
ends up exactly as they would leave it.

The full validator is reached by calling the message's ``__post_init__`` body without the fast path: the
fast-path functions are patched to say ``False``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_helpers import make_request

from shared import messages as M
from shared import wire_fast as F
from shared.errors import ProtocolError

EXAMPLES = settings(max_examples=int(os.environ.get("PATCHCAST_FUZZ_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_BASE = make_request("jpeg-mosaic", size=32, patch=8, keep_every=3)
_REQUEST = dict(_BASE.__dict__, grid=list(_BASE.grid), topk_ids=[3, 1, 7], topk_probs=[0.5, 0.25, 0.125],
                codec_params={"q": 90})
_REPLY = {"request_id": "r-1", "label": 3, "topk_ids": [3, 1], "topk_probs": [0.75, 0.125], "queue_ms": 1.5,
          "infer_ms": 2.0, "total_ms": 4.0, "worker_id": "w-1", "batch_size": 8}

# Values a hostile msgpack map (or a careless caller) could put in a field: every wire type, edge values.
ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.sampled_from([2**31, 2**63, -1, 0, 1, 4, 8, 32]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, 0.5, -0.0, 1.0000001]),
    st.text(max_size=70), st.sampled_from(["", "a", "d-1", "a/b", "x" * 64, "x" * 65, "jpeg", "raw", "min_entropy"]),
    st.binary(max_size=12), st.lists(st.integers(-1, 12), max_size=4),
    st.lists(st.one_of(st.floats(-0.5, 1.5), st.just(math.nan)), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(0, 100), max_size=2),
    st.tuples(st.integers(0, 5), st.integers(0, 5)))


def _full(cls: type[M.Message], fields: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    with monkeypatch.context() as m:
        m.setattr(M, "request_fields", lambda f: False)
        m.setattr(M, "reply_fields", lambda f: False)
        return cls(**fields)


def _compare(cls: type[M.Message], fields: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> bool:
    """Build ``cls`` from ``fields`` with and without the fast path: same message, or both refuse.
    True when the fast path itself accepted it."""
    check = F.request_fields if cls is M.PatchRequest else F.reply_fields
    try:
        full = _full(cls, dict(fields), monkeypatch)
    except (ProtocolError, TypeError, ValueError) as exc:
        assert not check(dict(fields)), f"fast path accepts what the validator refuses: {exc}"
        with pytest.raises(type(exc)):
            cls(**fields)
        return False
    fast_fields = dict(fields)
    accepted = check(fast_fields)
    fast = cls(**fields)
    assert fast == full
    for name, value in full.__dict__.items():  # the same types too (tuples, floats), not only equal values
        assert type(getattr(fast, name)) is type(value), name
        if accepted:
            assert type(fast_fields[name]) is type(value), name
    return accepted


def test_the_common_case_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _compare(M.PatchRequest, _REQUEST, monkeypatch)
    assert _compare(M.Reply, _REPLY, monkeypatch)
    assert _compare(M.PatchRequest, dict(_REQUEST, topk_ids=[], topk_probs=[], label=None), monkeypatch)
    # Valid, but left to the full validator: ints standing for floats, a region exchange.
    assert not _compare(M.Reply, dict(_REPLY, queue_ms=0), monkeypatch)
    assert not _compare(M.PatchRequest, dict(_REQUEST, topk_probs=[1, 0, 0]), monkeypatch)


@pytest.mark.parametrize("name, value", [
    ("topk_probs", [0.25, 0.5, 0.125]), ("topk_probs", [math.nan, 0.25, 0.125]), ("topk_ids", [3, 3, 7]),
    ("topk_probs", [0.75, 0.5, 0.125]), ("grid", [4, 5]), ("grid", [4]), ("mask", bytearray(_BASE.mask)),
    ("mask", b"\x00" * len(_BASE.mask)), ("device_id", "a/b"), ("codec", "nope"), ("codec_params", {"z": 1}),
    ("payload", b""), ("deadline", _BASE.sent_at - 1.0), ("uncertainty", math.inf), ("label", True),
    ("uncertainty_kind", "Min"), ("height", 33), ("patch_size", 0), ("sent_at", -1.0), ("sent_at", math.inf),
    ("sent_at", 1), ("label", -1), ("downscale", 2), ("exchange", "x-1"), ("request_id", "x" * 65)])
def test_each_broken_field_is_left_to_the_validator(name: str, value: object,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert not _compare(M.PatchRequest, dict(_REQUEST, **{name: value}), monkeypatch)


@pytest.mark.parametrize("name, value", [
    ("queue_ms", -1.0), ("infer_ms", math.nan), ("total_ms", math.inf), ("label", 2**31), ("batch_size", 0),
    ("batch_size", 1.0), ("worker_id", ""), ("request_id", 7), ("topk_ids", (1, True)), ("topk_probs", [0.5])])
def test_each_broken_reply_field_is_left_to_the_validator(name: str, value: object,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert not _compare(M.Reply, dict(_REPLY, **{name: value}), monkeypatch)


@EXAMPLES
@given(st.sampled_from(sorted(_REQUEST)), ODD, st.sampled_from(sorted(_REQUEST)), ODD)
def test_requests_with_odd_fields(name: str, value: object, other: str, other_value: object) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        _compare(M.PatchRequest, dict(_REQUEST, **{name: value, other: other_value}), monkeypatch)


@EXAMPLES
@given(st.sampled_from(sorted(_REPLY)), ODD, st.sampled_from(sorted(_REPLY)), ODD)
def test_replies_with_odd_fields(name: str, value: object, other: str, other_value: object) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        _compare(M.Reply, dict(_REPLY, **{name: value, other: other_value}), monkeypatch)


@EXAMPLES
@given(st.lists(st.integers(-2, 2**31), max_size=6),
       st.lists(st.one_of(st.floats(-0.1, 1.1), st.just(math.nan)), max_size=6))
def test_topk_lists(ids: list[int], probs: list[float]) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        _compare(M.Reply, dict(_REPLY, topk_ids=ids, topk_probs=probs), monkeypatch)
