"""``patchcast monitor --once`` and ``patchcast health`` against a real broker, fed with protocol
messages published the way workers and devices publish them."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import time

from ops_helpers import REPO, child_env, patchcast_cmd

from patchcast.broker import BrokerProcess
from patchcast.monitor.app import run_monitor
from patchcast.monitor.health import check_availability
from shared import protocol
from shared.config import BrokerConfig, load_config
from shared.topics import V1
from shared.transport import Transport


def metrics(worker: str, queue: int) -> protocol.WorkerMetrics:
    return protocol.WorkerMetrics(
        worker_id=worker, model="m", at=time.time(), window_s=1.0, queue_depth=queue, queue_capacity=256,
        oldest_queued_ms=12.0, requests=10, requests_per_s=10.0, batches=4, batch_size_mean=2.5,
        batch_size_max=4, tokens_per_batch_mean=80.0, busy_fraction=0.4, service_ms_p50=8.0,
        service_ms_p95=20.0, service_ms_p99=30.0, errors_by_code={"busy": 2})


def outcome(i: int, status: str) -> protocol.Outcome:
    sent = status != "edge"
    return protocol.Outcome(
        device_id=f"cam-{i % 2:04d}", request_id=f"r{i}", at=time.time(), status=status,  # type: ignore[arg-type]
        patches=20 if sent else 0, num_patches=64, bytes=900 if sent else 0,
        latency_ms=15.0 + i if status == "server" else None, edge_label=i % 10, final_label=(i + sent) % 10,
        ground_truth=(i + 1) % 10)


async def publish_fleet(port: int, *, worker: str = "w-test-1",
                        until: subprocess.Popen[str] | None = None) -> None:
    """Publish availability, metrics and outcomes (5 per 0.25 s) once, or until ``until`` exits."""
    cfg = BrokerConfig(port=port)
    t = Transport(cfg, client_id="test-feeder")
    runner = asyncio.create_task(t.run())
    await t.wait_connected(5)
    for ident, state in ((worker, "online"), ("w-dead", "offline")):
        message = protocol.Availability("worker", ident, state, time.time())  # type: ignore[arg-type]
        await t.publish(V1.availability("worker", ident), protocol.encode(message), retain=True)
    i = 0
    while True:
        await t.publish(V1.metrics("worker", worker), protocol.encode(metrics(worker, queue=3)), retain=True)
        for _ in range(5):
            status = ("edge", "server", "server", "timeout")[i % 4]
            await t.publish(f"{V1.prefix}/outcome/cam-{i % 2:04d}", protocol.encode(outcome(i, status)))
            i += 1
        if until is None or until.poll() is not None:
            break
        await asyncio.sleep(0.25)  # not a wait: pacing a stand-in fleet's messages
    await t.close()
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


def test_monitor_once_json_and_text(broker: BrokerProcess):
    args = ["--broker", broker.address, "--once", "3"]
    proc = subprocess.Popen(patchcast_cmd("monitor", *args, "--json"), cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    asyncio.run(publish_fleet(broker.port, until=proc))  # outcomes are not retained: feed until it exits
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    snap = json.loads(out)
    n = snap["images_total"]  # it joined mid-stream: the 1:2:1 edge/server/timeout mix is ±1 off
    assert n >= 20 and abs(snap["sent_total"] - n * 3 / 4) <= 1 and abs(snap["timeouts_total"] - n / 4) <= 1
    assert abs(snap["offload_rate"] - 0.75) < 0.05
    assert abs(snap["patch_fraction"] - 20 / 64) < 1e-9
    assert snap["accuracy"]["labelled"] == snap["images_total"]
    workers = {w["worker_id"]: w for w in snap["workers"]}
    assert workers["w-test-1"]["state"] == "online" and workers["w-test-1"]["queue_depth"] == 3
    assert workers["w-test-1"]["errors"] == 2 and workers["w-dead"]["state"] == "offline"
    assert snap["latency_p50_ms"] is not None
    # $SYS figures are published every sys_interval and retained: within a 3 s window they may still
    # describe the broker before any client connected, so their values are not asserted here.

    # Plain text, in-process: the retained metrics/availability alone give a worker table.
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cfg = load_config(overrides={"broker": {"port": broker.port}})
        snap_obj = asyncio.run(run_monitor(cfg, once_s=1.0))
    assert snap_obj is not None and "w-test-1" in buf.getvalue() and "requests/s" in buf.getvalue()
    assert "\x1b[" not in buf.getvalue()


def test_health_from_retained_availability(broker: BrokerProcess):
    asyncio.run(publish_fleet(broker.port, worker="box1-4242"))
    cfg = BrokerConfig(port=broker.port)

    def online(ident: str | None = None, prefix: str | None = None) -> set[str]:
        return asyncio.run(check_availability(cfg, role="worker", ident=ident, prefix=prefix, timeout_s=1.5))[0]

    assert online(prefix="box1") == {"box1-4242"}
    assert online(ident="box1-4242") == {"box1-4242"}
    assert online(ident="w-dead") == set()  # retained, but offline
    assert online(prefix="nobody") == set()
    assert online() == {"box1-4242"}
    assert asyncio.run(check_availability(BrokerConfig(port=1), role="worker", timeout_s=1.0)) == (set(), 0)

    # The CLI exit codes (what a container healthcheck sees).
    ok = subprocess.run(patchcast_cmd("health", "--broker", broker.address, "--prefix", "box1"), cwd=REPO,
                        env=child_env(), capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "healthy" in ok.stdout
