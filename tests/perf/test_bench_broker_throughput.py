"""bench/broker_throughput.py end to end on the zoo's small server model (real Mosquitto, real processes): the
figures it reports come from every request answered. Speeds are not asserted here (docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from inference_worker.service import InferenceWorker
from patchcast.broker import BrokerProcess
from shared.config import load_config
from shared.models import build_model

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "broker_throughput.py"
SMALL = ["--model", "zoo:cifar10-server", "--requests", "40", "--rounds", "1", "--threads", "1", "--in-flight", "8"]

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto not installed")


def run_bench(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *SMALL, *flags, "--json", str(out)], capture_output=True,
                          text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(out.read_text()))


def test_one_worker_in_process_against_the_same_batches(tmp_path: Path) -> None:
    figures = run_bench(tmp_path)
    (round_,) = figures["rounds"]
    assert figures["requests"] == 40 and round_["batches"] >= 1
    assert round_["broker_replies_per_s"] > 0 and round_["in_process_replies_per_s"] > 0
    assert round_["batches"] * round_["batch_size_mean"] == pytest.approx(40), "every request in exactly one batch"
    assert 0 < round_["worker_busy_fraction"] <= 1


@pytest.mark.slow  # ~35 s on 2 cores; engine and decoder processes over Mosquitto are also in the default
# suite, without the benchmark around them (tests/service/test_service_child_processes.py)
def test_a_pool_of_worker_processes_with_engine_and_decoder_processes(tmp_path: Path) -> None:
    figures = run_bench(tmp_path, "--worker-processes", "2", "--load-processes", "2", "--engine-process", "on",
                        "--decode-processes", "1")
    assert figures["worker_processes"] == 2 and figures["engine_process"] is True
    assert sum(figures["replies_per_worker"]) == 40, "every request answered once, by one of the pool"
    assert figures["batches"] >= 1 and figures["in_process_replies_per_s"] > 0
    assert 0 < figures["worker_engine_fraction_of_busy"] <= 1
    assert figures["worker_loop_cpu_ms_per_request"] > 0 and figures["load_cpu_ms_per_request"] > 0


def test_a_worker_process_of_two_frontends_sharing_one_engine(tmp_path: Path) -> None:
    figures = run_bench(tmp_path, "--worker-processes", "1", "--frontends", "2", "--load-processes", "2",
                        "--engine-process", "on")
    assert figures["frontends"] == 2 and figures["exit_codes"] == [0]
    (round_,) = figures["rounds"]
    assert round_["broker_replies_per_s"] > 0, "every request answered (the load generators wait for all)"


def run_load_generator(folder: Path, port: int, payloads: list[bytes], stall_s: float) -> subprocess.Popen[str]:
    """The bench's load-generator child (one device) against the broker on ``port``."""
    folder.mkdir(exist_ok=True)
    (folder / "payloads").write_bytes(msgpack.packb([(f"r{i}", p) for i, p in enumerate(payloads)]))
    (folder / "spec.json").write_text(json.dumps({"port": port, "device": "bench-dev", "model": "bench",
                                                  "in_flight": 2, "stall_s": stall_s}))
    return subprocess.Popen([sys.executable, str(SCRIPT), "--load-generator", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_round_with_no_worker_ends_after_the_stall_limit(tmp_path: Path) -> None:
    with BrokerProcess(port=0) as broker:
        proc = run_load_generator(tmp_path / "load", broker.port, [b"x"] * 3, stall_s=1.0)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (out, err)
    assert "replies stopped: 0 of 3 answered" in err and "Traceback" not in err


def test_a_refused_request_ends_the_round_with_the_workers_error(tmp_path: Path) -> None:
    """Before, an error reply left its in-flight slot taken and the round waited forever."""
    async def round_() -> subprocess.Popen[str]:
        with BrokerProcess(port=0) as broker:
            cfg = load_config(environ={}, overrides={"broker": {"port": broker.port},
                                                     "models": {"server": "zoo:cifar10-server", "model_id": "bench"}})
            worker = InferenceWorker(cfg, build_model("zoo:cifar10-server"), worker_id="bench-worker")
            async with asyncio.TaskGroup() as tg:
                serving = tg.create_task(worker.run(), name="worker")
                await asyncio.wait_for(worker.ready.wait(), 60)
                proc = run_load_generator(tmp_path / "load", broker.port, [b"not msgpack"] * 4, stall_s=60.0)
                await asyncio.wait_for(asyncio.to_thread(proc.wait), 60)
                worker.stop()
                await serving
        return proc

    proc = asyncio.run(round_())
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert proc.returncode == 2, err
    assert "request(s) refused, first: None: malformed" in err, err
    assert "Traceback" not in err
