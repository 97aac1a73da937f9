"""shared.messages.construct, the decoder's way to build a message without the dataclass's generated
``__init__``, against ``cls(**fields)``: the same message field for field, or the same refusal."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_helpers import make_request
from test_wire_fast import _REPLY, _REQUEST, ODD

from shared import messages as M
from shared import protocol as P
from shared.errors import ProtocolError

EXAMPLES = settings(max_examples=int(os.environ.get("PATCHCAST_FUZZ_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

_OPTIONAL_REQUEST = {"label": 4, "deadline": 2e9, "downscale": 2, "exchange": "x-1", "offer": b"\xff"}


def _same(cls: type[M.Message], fields: dict[str, Any]) -> None:
    try:
        expected = cls(**dict(fields))
    except (ProtocolError, TypeError, ValueError) as exc:
        with pytest.raises(type(exc)) as caught:
            M.construct(cls, dict(fields))
        assert str(caught.value) == str(exc)
        return
    built = M.construct(cls, dict(fields))
    assert type(built) is cls and built.__dict__ == expected.__dict__
    assert {k: type(v) for k, v in built.__dict__.items()} == {k: type(v) for k, v in expected.__dict__.items()}
    assert sorted(built.__dict__) == sorted(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.label = 1  # type: ignore[attr-defined]


def test_every_message_kind_builds_as_its_constructor_does() -> None:
    request = make_request("jpeg-mosaic", size=32, patch=8, keep_every=3)
    reply = P.Reply(**_REPLY)
    for message in (request, reply):
        fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
        _same(type(message), fields)
        required = {k: v for k, v in fields.items() if v is not None}
        _same(type(message), required)  # optional fields left out: their defaults
    for name, value in _OPTIONAL_REQUEST.items():  # each optional field set alone: valid or refused alike
        _same(M.PatchRequest, dict(_REQUEST, **{name: value}))


def test_a_class_with_a_default_factory_goes_through_its_constructor() -> None:
    metrics = P.WorkerMetrics(
        worker_id="w-1", model="m", at=1.7e9, window_s=1.0, queue_depth=7, queue_capacity=256,
        oldest_queued_ms=250.0, requests=40, requests_per_s=12.5, batches=5, batch_size_mean=2.5,
        batch_size_max=4, tokens_per_batch_mean=120.0, busy_fraction=0.6, service_ms_p50=10.0,
        service_ms_p95=40.0, service_ms_p99=80.0)
    assert M._defaults(P.WorkerMetrics) is None
    fields = {f.name: getattr(metrics, f.name) for f in dataclasses.fields(metrics) if f.name != "errors_by_code"}
    built = M.construct(P.WorkerMetrics, fields)
    assert built == metrics and built.errors_by_code == {}
    assert M.construct(P.WorkerMetrics, dict(fields)).errors_by_code is not built.errors_by_code  # a dict each


@EXAMPLES
@given(st.sampled_from(sorted(_REQUEST)), ODD, st.sampled_from(sorted(_REQUEST)), ODD)
def test_requests_with_odd_fields(name: str, value: object, other: str, other_value: object) -> None:
    _same(M.PatchRequest, dict(_REQUEST, **{name: value, other: other_value}))


@EXAMPLES
@given(st.sampled_from(sorted(_REPLY)), ODD, st.sampled_from(sorted(_REPLY)), ODD)
def test_replies_with_odd_fields(name: str, value: object, other: str, other_value: object) -> None:
    _same(M.Reply, dict(_REPLY, **{name: value, other: other_value}))
