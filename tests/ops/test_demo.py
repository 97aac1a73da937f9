"""Acceptance: ``patchcast demo`` end to end — real broker, autoscaled worker processes, a device
fleet — and its JSON report accounts for every image with no lost request and no orphan process."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from ops_helpers import REPO, alive, child_env, cifar_subset, patchcast_cmd, zoo_or_tiny


@pytest.mark.slow
def test_demo_headless_report(tmp_path: Path):
    edge, server = zoo_or_tiny(tmp_path / "models")
    source = cifar_subset(tmp_path / "images", every=25)  # 400 CIFAR-10 test images, 10 classes
    report_path = tmp_path / "report.json"
    started = time.monotonic()
    proc = subprocess.run(
        patchcast_cmd("demo", "--duration", "20", "--devices", "8", "--headless", "--report", str(report_path),
                      "--edge", edge, "--server", server, "--source", str(source),
                      "--log-dir", str(tmp_path / "logs"), "--max-workers", "2"),
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=400)
    took = time.monotonic() - started
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    r = json.loads(report_path.read_text())

    # Every image accounted for: the fleet's count, the Outcome messages the monitor saw, the split.
    assert r["images"] >= 8 * 20 * 2 * 0.5, r["images"]  # 8 devices × 2 Hz × 20 s, CPU permitting
    assert r["outcomes_received"] == r["images"] and r["unaccounted_images"] == 0
    assert r["offloaded"] == r["replies"] + r["errors"] + r["timeouts"]
    assert r["lost_requests"] == 0 and r["timeouts"] == 0
    assert r["monitor"]["images_total"] == r["images"]

    # The figures the README promises.
    acc = r["accuracy"]
    assert acc["labelled"] == r["images"]
    for key in ("edge_only", "collaborative", "server_only"):
        assert acc[key] is not None and 0.0 <= acc[key] <= 1.0, key
    assert acc["server_only_images"] > 0
    assert 0.0 <= r["offload_rate"] <= 1.0
    if r["offloaded"]:
        assert 0.0 < r["patch_fraction"] <= 1.0 and r["bytes_sent"] > 0 and r["bytes_full_jpeg"] > 0
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
        assert sum(r["workers"]["served_by"].values()) == r["replies"]
    assert 1 <= r["workers"]["peak"] <= 2

    # Clean shutdown: no child outlives the demo.
    time.sleep(0.5)
    pids = [p for group in r["pids"].values() for p in group]
    assert pids and not [p for p in pids if alive(p)]
    print(f"demo took {took:.0f} s; images {r['images']}, p95 {r['latency_ms'] and r['latency_ms']['p95']} ms")
