"""Topic names: versioned, validated ids, parse ∘ build = id."""

from __future__ import annotations

import pytest

from shared.errors import BadTopicError
from shared.topics import V1, Topics, validate_id


def test_v1_topic_layout() -> None:
    assert V1.request("deit_base", "cam-01") == "patchcast/v1/req/deit_base/cam-01"
    assert V1.request_filter("deit_base") == "patchcast/v1/req/deit_base/+"
    assert V1.worker_subscription("pool-a", "deit_base") == "$share/pool-a/patchcast/v1/req/deit_base/+"
    assert V1.reply("cam-01") == "patchcast/v1/reply/cam-01"
    assert V1.metrics("worker", "w1") == "patchcast/v1/metrics/worker/w1"
    assert V1.metrics_filter() == "patchcast/v1/metrics/+/+"
    assert V1.metrics_filter("edge") == "patchcast/v1/metrics/edge/+"
    assert V1.availability("edge", "cam-01") == "patchcast/v1/availability/edge/cam-01"
    assert V1.availability_filter() == "patchcast/v1/availability/+/+"
    assert V1.errors("worker", "w1") == "patchcast/v1/errors/worker/w1"
    assert V1.errors_filter() == "patchcast/v1/errors/+/+"


def test_parse_round_trips() -> None:
    assert V1.parse_request(V1.request("m.1", "dev:7")) == ("m.1", "dev:7")
    assert V1.parse_role_id(V1.metrics("worker", "w-2"), "metrics") == ("worker", "w-2")
    assert V1.parse_role_id(V1.availability("edge", "cam"), "availability") == ("edge", "cam")
    bad_topics = ["patchcast/v2/req/m/d", "patchcast/v1/req/m", "patchcast/v1/req/m/d/x",
                  "patchcast/v1/req/m/+"]
    for bad in bad_topics:
        with pytest.raises(BadTopicError):
            V1.parse_request(bad)
    with pytest.raises(BadTopicError):
        V1.parse_role_id("patchcast/v1/metrics/robot/x", "metrics")


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "$SYS", "a b", "x" * 65, "é", "a\x00b", 3, None])
def test_ids_are_validated(bad: object) -> None:
    with pytest.raises(BadTopicError):
        validate_id(bad)
    with pytest.raises(BadTopicError):
        V1.reply(bad)  # type: ignore[arg-type]


def test_roles_and_prefixes_are_validated() -> None:
    with pytest.raises(BadTopicError):
        V1.metrics("robot", "x")
    assert Topics("test/ns").reply("d") == "test/ns/reply/d"
    for bad in ["", "a/", "/a", "a/+/b", "a//b"]:
        with pytest.raises(BadTopicError):
            Topics(bad)
    assert validate_id("x" * 64) == "x" * 64
