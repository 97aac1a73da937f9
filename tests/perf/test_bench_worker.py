"""bench/worker.py end to end on the zoo's small server model (real Mosquitto, real processes): the
figures it reports come from every request answered. Speeds are not asserted here (docs/benchmarks.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "worker.py"
SMALL = ["--model", "zoo:cifar10-server", "--requests", "40", "--rounds", "1", "--threads", "1", "--in-flight", "8"]

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto not installed")


def run_bench(tmp_path: Path, *flags: str) -> dict:  # type: ignore[type-arg]
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
    assert round_["ratio"] == pytest.approx(round_["broker_replies_per_s"] / round_["in_process_replies_per_s"])


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
