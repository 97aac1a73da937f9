"""Worker kills and broker restarts over a real Mosquitto: no request is lost, none is answered twice
to the application.

The first test kills one of two worker processes (SIGKILL) mid-run and stops the other with SIGTERM
(it drains). The devices send every image (η = 0) with ``edge.retries = 1``: a request lost with the
killed worker is seen by its device as a timeout and re-sent under the **same** request id; the
survivor answers it (status ``server``, two attempts) or, when the re-send also times out, the
device keeps its edge label (status ``timeout``). Both workers hold requests for up to 300 ms before
batching, so the killed one always has some in hand.

The slow tests run ``bench/faults.py``'s scenarios with the small test models: 10 SIGKILLs at 60 %
of the pool's measured capacity, 3 broker restarts of 3 s, one outage of 30 s.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys

import pytest
from service_helpers import async_test, service_config
from waiting import wait_until_async

from edge_node.fleet import run_fleet
from shared.protocol import Availability, PatchRequest, Reply, decode
from shared.topics import V1
from shared.transport import Incoming, Transport

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "bench"))  # bench/faults.py


def start_worker(port: int, server_path: object, model: str, group: str, worker_id: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "patchcast.cli", "worker", "--broker", f"127.0.0.1:{port}",
           "--server-model", f"file:{server_path}", "--model-id", model, "--group", group, "--worker-id", worker_id,
           "--threads", "1", "--precision", "fp32", "--max-delay-ms", "300", "--max-batch", "64",
           "--log-format", "json", "--log-level", "warning"]
    env = {**os.environ, "PATCHCAST_WORKER__SHUTDOWN_GRACE_S": "5", "PATCHCAST_WORKER__METRICS_INTERVAL_S": "0.5"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.any_broker  # also over rumqttd (other_brokers.py)
@pytest.mark.slow
@async_test(240)
async def test_sigkill_one_worker_loses_nothing_silently_and_sigterm_drains(
        broker, model_files, image_folder, unique) -> None:
    edge_path, server_path = model_files
    model, group = f"tiny-{unique}", f"pool-{unique}"
    cfg = service_config(broker.port, edge_path, server_path, image_folder, models={"model_id": model},
                         gate={"threshold": 0.0},
                         edge={"devices": 4, "limit": 30, "rate_hz": 8.0, "max_in_flight": 8, "retries": 1,
                               "reply_timeout_s": 1.5, "device_prefix": f"{unique}cam"})
    seen: list[Incoming] = []
    spy = Transport(cfg.broker, client_id=f"{unique}-spy", handler=seen.append)
    victim_id, survivor_id = f"{unique}-victim", f"{unique}-survivor"
    procs = {wid: start_worker(broker.port, server_path, model, group, wid) for wid in (victim_id, survivor_id)}
    try:
        async with asyncio.TaskGroup() as tg:
            spy_task = tg.create_task(spy.run())
            await spy.wait_connected()
            for topic_filter in (V1.request_filter(model), "patchcast/v1/reply/+", V1.availability_filter("worker")):
                await spy.subscribe(topic_filter)

            def states(wid: str) -> list[str]:
                return [m.state for m in (decode(x.payload) for x in seen if x.topic == V1.availability("worker", wid))
                        if isinstance(m, Availability)]

            async def wait_state(wid: str, state: str, limit_s: float) -> None:
                def reached() -> bool:
                    assert procs[wid].poll() is None or state == "offline", procs[wid].stdout.read()  # type: ignore[union-attr]
                    return state in states(wid)

                await wait_until_async(reached, limit_s, 0.1, message=f"{wid} {state}")

            await asyncio.gather(wait_state(victim_id, "online", 120), wait_state(survivor_id, "online", 120))
            fleet = tg.create_task(run_fleet(cfg))

            def requests_seen() -> int:
                return sum(1 for x in seen if x.topic.startswith(V1.request_filter(model).removesuffix("+")))

            # Kill while requests are flowing (the victim then holds an open batch: max_delay 300 ms),
            # not on a clock: how long the fleet takes to start depends on the machine.
            await wait_until_async(lambda: requests_seen() >= 10, 60, 0.02, message="ten requests on the wire")
            procs[victim_id].send_signal(signal.SIGKILL)
            result = await fleet
            await wait_state(victim_id, "offline", 10)  # the broker published the victim's last will
            procs[survivor_id].send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(procs[survivor_id].wait, 20) == 0
            await wait_state(survivor_id, "offline", 5)
            spy_task.cancel()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    s = result.summary
    assert s["images"] == 4 * 30 and s["offloaded"] == s["images"]
    statuses = collections.Counter(r.status for r in result.outcomes)
    assert set(statuses) <= {"server", "timeout"}, statuses
    published = collections.Counter(m.request_id for m in (decode(x.payload) for x in seen)
                                    if isinstance(m, PatchRequest))
    replied = {m.request_id for m in (decode(x.payload) for x in seen) if isinstance(m, Reply)}
    resent = {rid for rid, n in published.items() if n > 1}
    assert resent, "the killed worker held requests: their devices must have re-sent them"
    assert all(rid.count(".") == 1 for rid in published), "a re-send carries the first attempt's request id"
    outcome_of = {r.request_id: r for r in result.outcomes}
    assert len(outcome_of) == len(result.outcomes), "one answer per image to the application"
    for rid in resent:
        record = outcome_of[rid]
        assert record.attempts == published[rid]
        # The re-send was answered (by the survivor), or the device kept its edge label at the deadline.
        assert (record.status == "server" and rid in replied) or (
            record.status == "timeout" and record.final_label == record.edge_label), rid
    assert any(outcome_of[rid].status == "server" for rid in resent), "the survivor answers re-sent requests"
    for r in result.outcomes:
        if r.status == "server":
            assert r.request_id in replied
    assert s["replies_foreign"] == 0


def fault_options(model_files, image_folder, **values: object):
    import faults

    edge_path, server_path = model_files
    overrides = {"models": {"edge": f"file:{edge_path}", "server": f"file:{server_path}"},
                 "edge": {"source": str(image_folder)},
                 "broker": {"connect_timeout_s": 5.0, "publish_timeout_s": 5.0}}
    return faults.Options(workers=3, devices=4, load=0.6, worker_args=("--threads", "1", "--precision", "fp32"),
                          overrides=overrides, **values)


def check_row(row) -> None:
    assert row.images > 0 and row.lost == 0 and row.duplicates_to_app == 0, row
    # every image answered by a server, unless its deadline passed
    assert row.answered + row.deadline == row.images and row.refused == 0, row
    assert row.worker_exits == 0, row


@pytest.mark.slow
@async_test(420)
async def test_ten_worker_kills_at_60_percent_of_capacity_lose_nothing(model_files, image_folder) -> None:
    import faults

    options = fault_options(model_files, image_folder, kills=10, kill_every_s=3.0)
    [row] = await faults.run_all(["worker-kills"], options)
    check_row(row)
    assert row.faults == 10 and row.offered_per_s >= 0.5 * row.capacity
    assert row.retries > 0, "the killed workers held requests: their devices re-sent them"
    # a kill costs a reply timeout and a re-send, far less than the deadline
    assert row.deadline == 0, row


@pytest.mark.slow
@async_test(420)
async def test_broker_restarts_of_3_s_and_an_outage_of_30_s_lose_nothing(model_files, image_folder) -> None:
    import faults

    options = fault_options(model_files, image_folder, restarts=(3.0, 3.0, 3.0), outage_s=30.0)
    restarts, outage = await faults.run_all(["broker-restarts", "broker-outage"], options)
    for row in (restarts, outage):
        check_row(row)
        assert row.recover_s is not None and row.recover_s < 10.0, row
    assert restarts.faults == 3 and outage.faults == 1
