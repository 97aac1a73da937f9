"""Monitor: aggregator → snapshot → rendering, with a fixed-width capture console (no broker)."""

from __future__ import annotations

import dataclasses
import io

import pytest
from rich.console import Console

from patchcast.monitor.render import render, render_text, short_id
from patchcast.monitor.state import Aggregator, Snapshot, WorkerSample
from patchcast.monitor.stats import sparkline
from shared.config import MonitorConfig
from shared.percentiles import percentile
from shared.protocol import Outcome, OutcomeStatus


def capture(snapshot: Snapshot, width: int = 80) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(render(snapshot, width=width))
    return console.export_text()


def outcome(i: int, *, sent: bool, latency: float | None = None, correct_edge: bool = True,
            correct_final: bool = True, sent_bytes: int = 1000, full_bytes: int = 4000) -> Outcome:
    truth = i % 10
    return Outcome(
        device_id=f"cam-{i % 4:04d}", request_id=f"cam-{i % 4:04d}.{i:06d}", at=1.0,
        status="server" if sent else "edge", patches=16 if sent else 0, num_patches=64,
        bytes=sent_bytes if sent else 0, full_bytes=full_bytes if sent else None,
        latency_ms=latency if sent else None, edge_label=truth if correct_edge else (truth + 1) % 10,
        final_label=truth if correct_final else (truth + 1) % 10, ground_truth=truth)


@pytest.fixture
def busy_aggregator() -> Aggregator:
    agg = Aggregator(MonitorConfig(window_s=10.0), started_at=0.0)
    # 40 images over 10 s: half offloaded (latency 10..100 ms), edge right on 50 %, collab on 75 %.
    for i in range(40):
        sent = i % 2 == 0
        agg.add_outcome(outcome(i, sent=sent, latency=10.0 + (i // 2) * (90 / 19),
                                correct_edge=i % 4 < 2, correct_final=i % 4 < 3), now=i * 0.25)
    for w in range(2):
        agg.add_worker_metrics(f"w{w}", WorkerSample(
            queue_depth=3 * w, oldest_queued_ms=40.0 * w, batch_size_mean=2.5, tokens_per_batch_mean=41,
            busy_fraction=0.5, requests_per_s=1.0, replies_per_s=1.0, service_p95_ms=22.0,
            errors_by_code={"busy": w}), now=9.5)
    agg.set_availability("edge", "cam-0000", True, 1.0)
    agg.set_availability("edge", "cam-0001", True, 1.0)
    agg.add_sys("$SYS/broker/clients/connected", "7", 5.0)
    agg.add_sys("$SYS/broker/messages/received", "100", 5.0)
    agg.add_sys("$SYS/broker/messages/received", "350", 10.0)
    return agg


def test_snapshot_figures(busy_aggregator: Aggregator):
    s = busy_aggregator.snapshot(10.0)
    assert s.images_total == 40 and s.sent_total == 20
    assert s.requests_per_s == pytest.approx(40 / 10.0)
    assert s.offload_rate == pytest.approx(0.5)
    assert s.patch_fraction == pytest.approx(0.25)
    assert s.bytes_per_s == pytest.approx(20 * 1000 / 10.0)
    assert s.jpeg_bytes_per_s == pytest.approx(20 * 4000 / 10.0)
    assert s.bytes_saving == pytest.approx(0.75)
    assert s.accuracy.edge == pytest.approx(0.5) and s.accuracy.collaborative == pytest.approx(0.75)
    assert s.accuracy.server is None
    assert s.latency_p50_ms == pytest.approx(55.0) and s.latency_p99_ms == pytest.approx(99.1, abs=0.1)
    assert s.devices_online == 2 and s.workers_online == 2
    assert [w.errors for w in s.workers] == [0, 1]
    assert s.broker.clients == 7 and s.broker.msgs_in_per_s == pytest.approx(50.0)
    assert dataclasses.is_dataclass(s) and type(s).__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_window_slides_but_totals_stay(busy_aggregator: Aggregator):
    s = busy_aggregator.snapshot(100.0)
    assert s.requests_per_s == 0 and s.offload_rate is None and s.latency_p95_ms is None
    assert s.images_total == 40 and s.accuracy.labelled == 40
    assert [w.state for w in s.workers] == ["stale", "stale"] and s.workers_online == 0


def test_render_80x24_shows_every_figure(busy_aggregator: Aggregator):
    for t in (2.0, 4.0, 6.0, 8.0, 10.0):
        s = busy_aggregator.snapshot(t)
    text = capture(s)
    lines = text.splitlines()
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 80
    for needle in ("devices 2", "workers 2/2", "requests/s", "4.0", "offload rate", "50.0 %",
                   "patches sent", "25.0 %", "2.0 kB/s", "8.0 kB/s (−75 %)", "edge accuracy",
                   "collab accuracy", "75.0 %", "server accuracy", "latency p50", "55 ms", "p95 trend",
                   "7 clients", "msg/s in 50", "w0", "w1", "2.5", "50 %", "22 ms"):
        assert needle in text, (needle, text)
    assert any(ch in text for ch in "▁▂▃▄▅▆▇█")


def test_render_empty_snapshot_is_readable():
    agg = Aggregator(MonitorConfig(), started_at=0.0)
    text = capture(agg.snapshot(0.5))
    assert "no workers seen yet" in text and "–" in text
    assert len(text.splitlines()) <= 24


def test_many_workers_fold_into_more_row():
    agg = Aggregator(MonitorConfig(), started_at=0.0)
    for w in range(12):
        agg.add_worker_metrics(f"worker-{w:02d}", WorkerSample(busy_fraction=0.1), now=1.0)
    text = capture(agg.snapshot(1.5))
    assert "+5 more" in text
    assert len(text.splitlines()) <= 24


def test_worker_states_and_server_accuracy():
    agg = Aggregator(MonitorConfig(worker_stale_s=2.0), started_at=0.0)
    agg.add_worker_metrics("fresh", WorkerSample(), now=9.0)
    agg.add_worker_metrics("silent", WorkerSample(), now=1.0)
    agg.set_availability("worker", "gone", False, 9.0)
    agg.set_availability("worker", "booting", True, 9.0)
    agg.add_outcome(outcome(3, sent=True, latency=5.0), now=9.0)
    agg.set_server_reference(1.0, 500)  # the server-only accuracy, measured elsewhere (the demo's reference run)
    s = agg.snapshot(10.0)
    assert {w.worker_id: w.state for w in s.workers} == {
        "booting": "starting", "fresh": "online", "gone": "offline", "silent": "stale"}
    assert s.accuracy.server == 1.0 and s.accuracy.server_labelled == 500
    text = render_text(s, width=80)
    assert "\x1b[" not in text and "gone" in text


def test_helpers():
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert sparkline([1, 2, 3, None, 8], 5) == "▁▂▃ █"
    assert sparkline([5, 5], 4) == "▁▁"
    assert short_id("worker-hostname-1234567") == "worke…-1234567"
    assert short_id("w1") == "w1"


def test_render_more_bytes_than_full_jpeg_is_a_plus():
    agg = Aggregator(MonitorConfig(), started_at=0.0)
    agg.add_outcome(outcome(1, sent=True, latency=5.0, sent_bytes=1500, full_bytes=1000), now=0.5)
    text = capture(agg.snapshot(1.0))
    assert "(+50 %)" in text and "−-" not in text


def test_expert_pools_get_a_column_only_when_there_are_several():
    agg = Aggregator(MonitorConfig(), started_at=0.0)
    agg.add_worker_metrics("w-general", WorkerSample(model="tiny"), now=1.0)
    assert "pool" not in capture(agg.snapshot(1.5))  # one pool: the table stays as it was
    agg.add_worker_metrics("w-vehicles", WorkerSample(model="vehicles"), now=1.0)
    agg.add_worker_metrics("w-animals", WorkerSample(model="animals"), now=1.0)
    text = capture(agg.snapshot(1.5))
    header = next(ln for ln in text.splitlines() if ln.split()[:1] == ["worker"])
    assert "pool" in header and "oldest" not in header and "…" not in header  # still fits 80 columns
    lines = {ln.split()[1]: ln for ln in text.splitlines() if ln.strip().startswith("●") and len(ln.split()) > 2}
    assert "vehicles" in lines["w-vehicles"] and "animals" in lines["w-animals"] and "tiny" in lines["w-general"]


def test_timeouts_and_errors_come_from_the_outcome_status():
    agg = Aggregator(MonitorConfig(), started_at=0.0)
    statuses: tuple[OutcomeStatus, ...] = ("timeout", "error", "server")
    for i, status in enumerate(statuses):
        agg.add_outcome(dataclasses.replace(outcome(i, sent=True, latency=7.0), status=status,
                                            error_code="busy" if status == "error" else None), now=0.5)
    s = agg.snapshot(1.0)
    assert (s.sent_total, s.timeouts_total, s.errors_total) == (3, 1, 1)
    assert s.latency_p50_ms == 7.0  # only the answered image's latency counts
