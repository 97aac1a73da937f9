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


def test_edge_stages_add_up_for_both_zoo_edges(tmp_path: Path) -> None:
    """``--edge`` on the zoo's two edge models (synthetic images, small counts): every stage of the device's
    path was measured, the total outside the forward is their sum, and its ratio is to the 1 ms target."""
    out = tmp_path / "edge.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--edge", "zoo:cifar10-edge", "--edge", "zoo:imagenette-edge",
                           "--edge-source", "synthetic", "--images", "12", "--requests", "40", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())["edge"]
    assert [f["model"] for f in figures] == ["zoo:cifar10-edge", "zoo:imagenette-edge"]
    for f in figures:
        stages, outside = f["stages"], f["outside_stages"]
        assert {"source_decode_us", "resize_crop_us", "edge_forward_us", "select_us", "codec_encode_us",
                "request_encode_us", "mqtt_request_reply_us"} <= set(stages)
        assert set(outside) == set(stages) - {"edge_forward_us"}
        assert all(f[s] > 0 for s in stages), {s: f[s] for s in stages}
        assert f["outside_forward_us"] == pytest.approx(sum(f[s] for s in outside))
        assert f["ratio_to_limit"] == pytest.approx(f["outside_forward_us"] / 1000.0)
        assert f["images"] == 12 and f["source"] == "synthetic" and f["engine_run_us"] > 0
        assert 1 <= f["kept_mean"] <= f["num_patches"] and f["request_bytes"] > 0
        assert 0.0 <= f["gate_send_share"] <= 1.0
        # through the configured gate: every image pays the stages up to the gate and its outcome, only a
        # sent one the offload's (its MQTT round counted at the share sent); the total is their sum
        at_gate = f["at_gate"]
        assert all(at_gate[s] > 0 for s in ("source_decode_us", "resize_crop_us", "normalize_us", "edge_forward_us",
                                            "gate_topk_us", "outcome_encode_us", "outcome_publish_us"))
        offload = ("scores_us", "select_us", "codec_encode_us", "request_encode_us", "reply_decode_us")
        assert all((at_gate[s] > 0) == (f["gate_send_share"] > 0) for s in offload), at_gate
        assert at_gate["mqtt_request_reply_us"] == pytest.approx(f["gate_send_share"] * f["mqtt_request_reply_us"])
        assert f["at_gate_outside_forward_us"] == pytest.approx(sum(at_gate[s] for s in outside))
    assert figures[1]["input_size"] == 160 and figures[1]["patch_size"] == 16


@pytest.mark.slow  # ~40 s on 2 cores: two whole-worker runs; the default suite keeps the in-process checks
def test_end_to_end_against_another_checkout_interleaves_the_two(tmp_path: Path) -> None:
    """``--end-to-end 1 --against DIR`` (here DIR is this checkout itself): one run of each, both medians
    and their ratio in the JSON; a DIR without the benchmark is refused before anything runs."""
    out = tmp_path / "figures.json"
    root = SCRIPT.parents[1]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--requests", "64", "--batch", "16", "--end-to-end", "1",
                           "--against", str(root), "--json", str(out)],
                          capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    e2e = json.loads(out.read_text())["end_to_end"]
    for side in ("against", "this_checkout"):
        assert e2e[side]["median_us"]["worker_outside_engine_cpu_ms_per_request"] > 0
        assert len(e2e[side]["samples_ms"]["worker_loop_cpu_ms_per_request"]) == 1
    after = e2e["this_checkout"]["median_us"]["worker_outside_engine_cpu_ms_per_request"]
    before = e2e["against"]["median_us"]["worker_outside_engine_cpu_ms_per_request"]
    assert e2e["change"] == pytest.approx(after / before - 1.0) and e2e["against"]["checkout"] == str(root)
    assert "run 1/1" in proc.stderr and "this checkout ÷" in proc.stdout
    refused = subprocess.run([sys.executable, str(SCRIPT), "--requests", "8", "--end-to-end", "1",
                              "--against", str(tmp_path)], capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 2 and "no bench/broker_throughput.py there" in refused.stderr
