"""bench/service_overhead.py end to end on the zoo's small server model (real Mosquitto): its total is the sum
of the stages it prints, and every message of its MQTT round arrived. Speeds are not asserted here
(docs/benchmarks.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "service_overhead.py"

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto not installed")


def test_stages_add_up_and_mosquitto_is_measured(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--requests", "64", "--batch", "16", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    stages = ("decode_validate_us", "pixel_decode_us", "reply_encode_us", "client_us_per_request")
    assert all(figures[s] > 0 for s in stages), {s: figures[s] for s in stages}
    assert figures["outside_model_us_per_request"] == pytest.approx(sum(figures[s] for s in stages))
    assert figures["model_forward_us"] > 0 and figures["messages_per_s"] > 0
    assert figures["mosquitto_us_per_message"] >= 0
    assert figures["payload_bytes"] > 0 and figures["requests"] == 64
