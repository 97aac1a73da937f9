"""The fleet summary: fractions, accuracy edge-only vs collaborative, latency percentiles."""

from __future__ import annotations

import pytest

from edge_node.outcome import OutcomeRecord
from edge_node.summary import SUMMARY_SCHEMA, edge_metrics, summarize
from shared.errors import BadFieldError
from shared.protocol import Outcome, OutcomeStatus


def record(i: int, status: OutcomeStatus, *, edge: int, final: int, truth: int | None, patches: int = 0,
           nbytes: int = 0, latency: float | None = None, attempts: int = 0, code: str | None = None) -> OutcomeRecord:
    return OutcomeRecord(device_id=f"cam-000{i % 2}", request_id=f"cam-000{i % 2}.{i:06d}", at=1.0,
                         status=status,
                         patches=patches, num_patches=64, bytes=nbytes, latency_ms=latency, edge_label=edge,
                         final_label=final, ground_truth=truth, uncertainty=1.0, error_code=code,
                         attempts=attempts, worker_id="w1" if status == "server" else None)


def test_summary_figures() -> None:
    records = [
        record(0, "edge", edge=1, final=1, truth=1),
        record(1, "edge", edge=2, final=2, truth=3),
        record(2, "server", edge=4, final=5, truth=5, patches=32, nbytes=1000, latency=10.0, attempts=1),
        record(3, "server", edge=6, final=6, truth=7, patches=16, nbytes=600, latency=30.0, attempts=2),
        record(4, "timeout", edge=8, final=8, truth=8, patches=16, nbytes=500, attempts=2, code="timeout"),
    ]
    s = summarize(records, devices=2, wall_s=2.0, model_id="m", ledger_totals={"late": 1})
    assert s["schema"] == SUMMARY_SCHEMA and s["images"] == 5 and s["images_per_s"] == 2.5
    assert s["offloaded"] == 3 and s["sent_fraction"] == 0.6
    assert s["patches_sent"] == 64 and s["patch_fraction"] == round(64 / (3 * 64), 4)
    assert s["patch_fraction_all"] == round(64 / (5 * 64), 4)
    assert s["bytes_sent"] == 2100 and s["replies"] == 2 and s["timeouts"] == 1 and s["errors"] == 0
    assert s["errors_by_code"] == {"timeout": 1} and s["attempts"] == 5 and s["retries"] == 2
    assert s["accuracy"] == {"labelled": 5, "edge_only": 0.4, "collaborative": 0.6}
    assert s["latency_ms"]["p50"] == 20.0 and s["latency_ms"]["max"] == 30.0
    assert s["replies_late"] == 1 and s["workers"] == {"w1": 2}
    assert [d["images"] for d in s["per_device"]] == [3, 2]


def test_summary_without_labels_or_replies() -> None:
    s = summarize([record(0, "edge", edge=1, final=1, truth=None)], devices=1, wall_s=1.0, model_id="m")
    assert s["accuracy"] is None and s["latency_ms"] is None and s["patch_fraction"] is None


def test_edge_metrics_message_is_valid() -> None:
    records = [record(0, "edge", edge=1, final=1, truth=1),
               record(2, "server", edge=4, final=5, truth=5, patches=32, nbytes=1000, latency=10.0, attempts=1)]
    m = edge_metrics("cam-0000", records, 5.0)
    assert (m.images, m.offloaded, m.replies, m.labelled, m.correct) == (2, 1, 1, 2, 2)
    assert m.latency_ms_p50 == 10.0


def test_a_device_record_is_the_protocol_outcome_and_publishes_as_one() -> None:
    rec = record(2, "server", edge=4, final=5, truth=5, patches=32, nbytes=1000, latency=10.0, attempts=1)
    assert isinstance(rec, Outcome)
    message = rec.to_message()
    assert type(message) is Outcome and (message.request_id, message.patches, message.final_label) == (
        "cam-0000.000002", 32, 5)
    with pytest.raises(BadFieldError, match="status 'edge'"):  # the protocol's own check
        record(5, "server", edge=1, final=1, truth=None)  # offloaded, yet nothing sent
    with pytest.raises(BadFieldError, match="attempts"):
        record(6, "edge", edge=1, final=1, truth=None, attempts=-1)
