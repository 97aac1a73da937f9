"""Acceptance: ``patchcast demo`` end to end — real broker, autoscaled worker processes, a device
fleet — and its JSON report accounts for every image with no lost request and no orphan process."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from ops_helpers import REPO, alive, child_env, cifar_subset, patchcast_cmd, tar_subset, zoo_or_tiny
from waiting import wait_until


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
    assert acc["edge_only"] is not None and acc["collaborative"] is not None and acc["server_only"] is not None
    # Only the offloaded images can take another label than the edge's own.
    assert abs(acc["collaborative"] - acc["edge_only"]) <= r["offloaded"] / acc["labelled"] + 1e-4
    assert acc["server_only_images"] > 0
    server_correct = acc["server_only"] * acc["server_only_images"]  # a count of full images
    assert server_correct == pytest.approx(round(server_correct), abs=1e-6)
    assert r["offload_rate"] == pytest.approx(r["offloaded"] / r["images"], abs=1e-4)
    if r["offloaded"]:
        assert 0.0 < r["patch_fraction"] <= 1.0 and r["bytes_sent"] > 0 and r["bytes_full_jpeg"] > 0
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
        assert sum(r["workers"]["served_by"].values()) == r["replies"]
    assert 1 <= r["workers"]["peak"] <= 2

    # Clean shutdown: no child outlives the demo (one that is ending is given a few seconds).
    pids = [p for group in r["pids"].values() for p in group]
    assert pids
    wait_until(lambda: not [p for p in pids if alive(p)], 5, message=f"the demo's processes {pids} to end")
    print(f"demo took {took:.0f} s; images {r['images']}, p95 {r['latency_ms'] and r['latency_ms']['p95']} ms")


def test_default_profile_is_the_imagenette_zoo_at_its_operating_point(tmp_path: Path) -> None:
    """`make demo` runs the Imagenette zoo on the val photos, the devices at the measured operating point;
    CIFAR-10 is one flag away."""
    from patchcast.demo import IMAGENETTE_POINT, DemoOptions, edge_argv, profile_defaults
    from shared.config import load_config
    from shared.models import zoo_names

    cfg = load_config(REPO / "config" / "default.toml")
    assert cfg.demo.profile == "imagenette"
    prof = profile_defaults(cfg, cfg.demo.profile)
    assert (prof.edge, prof.server, prof.source) == ("zoo:imagenette-edge", "zoo:imagenette-server",
                                                     "imagenette2/val.tar")
    assert {"imagenette-edge", "imagenette-server"} <= set(zoo_names())
    assert profile_defaults(cfg, "cifar10").edge == "zoo:cifar10-edge"
    assert profile_defaults(cfg, "deit").source == "imagenette2/val.tar"
    opts = DemoOptions(profile="imagenette", edge=prof.edge, server=prof.server, source=prof.source, devices=2,
                       rate_hz=1.0, duration_s=5.0, selection=prof.selection)
    argv = edge_argv(opts, "127.0.0.1:1883", tmp_path / "summary.json")
    rule, value, eta = IMAGENETTE_POINT
    assert argv[argv.index("--rule") + 1] == rule and float(argv[argv.index("--value") + 1]) == value
    assert float(argv[argv.index("--threshold") + 1]) == eta
    assert "--rule" not in edge_argv(replace(opts, selection=None), "127.0.0.1:1883", tmp_path / "s.json")


def test_top_up_runs_the_profile_point_on_devices_and_workers(tmp_path: Path) -> None:
    """`patchcast demo --top-up`: the devices offload with an offer at the profile's measured point, the
    workers ask for more at its η₂; without the profile's models, the config's settings."""
    from patchcast.demo import IMAGENETTE_TOP_UP, DemoOptions, edge_argv, profile_defaults, worker_argv
    from shared.config import load_config

    prof = profile_defaults(load_config(REPO / "config" / "default.toml"), "imagenette")
    assert prof.top_up == IMAGENETTE_TOP_UP
    opts = DemoOptions(profile="imagenette", edge=prof.edge, server=prof.server, source=prof.source, devices=2,
                       rate_hz=1.0, duration_s=5.0, selection=prof.selection, top_up=True, top_up_point=prof.top_up)
    argv = edge_argv(opts, "127.0.0.1:1883", tmp_path / "summary.json")

    def flag(args: list[str], name: str) -> str:
        assert args.count(name) == 1, name
        return args[args.index(name) + 1]

    p = IMAGENETTE_TOP_UP
    assert flag(argv, "--offload") == "top_up" and flag(argv, "--rule") == p.rule
    assert float(flag(argv, "--value")) == p.value and float(flag(argv, "--threshold")) == p.threshold
    assert flag(argv, "--offer-rule") == p.offer_rule and float(flag(argv, "--offer-value")) == p.offer_value
    assert float(flag(worker_argv(opts), "--top-up-threshold")) == p.top_up_threshold
    plain = replace(opts, top_up=False)
    assert "--offload" not in edge_argv(plain, "127.0.0.1:1883", tmp_path / "s.json")
    assert "--top-up-threshold" not in worker_argv(plain)
    own = replace(opts, top_up_point=None, selection=None)  # other models: the config's settings
    argv = edge_argv(own, "127.0.0.1:1883", tmp_path / "s.json")
    assert flag(argv, "--offload") == "top_up" and "--rule" not in argv and "--offer-rule" not in argv
    assert "--top-up-threshold" not in worker_argv(own)


def test_summary_shows_bytes_against_full_jpeg_for_offloaded_and_all_images() -> None:
    from rich.console import Console

    from patchcast.demo import summary_table

    report = {"images": 100, "devices": 2, "sending_s": 10.0, "interrupted": False, "outcomes_received": 100,
              "offload_rate": 0.4, "patch_fraction": 0.5, "bytes_sent": 40_000, "bytes_full_jpeg": 160_000,
              "bytes_vs_full_jpeg": 0.25, "bytes_full_jpeg_all": 400_000, "bytes_vs_full_jpeg_all": 0.1,
              "accuracy": {"edge_only": 0.6, "collaborative": 0.75, "server_only": 0.77, "server_only_images": 256},
              "latency_ms": {"p50": 10.0, "p95": 20.0, "p99": 30.0}, "lost_requests": 0, "unaccounted_images": 0,
              "workers": {"peak": 1, "min": 1, "max": 2, "served_by": {"w": 40}, "scale_events": []}}
    console = Console(width=200, record=True)
    console.print(summary_table(report))
    text = console.export_text()
    assert "40,000 B vs 160,000 B for the offloaded images as full-image JPEG requests (25.0 %)" in text
    assert "40,000 B vs 400,000 B for every image as a full-image JPEG request (10.0 %)" in text
    for line in ("accuracy edge-only", "accuracy collaborative", "accuracy server-only"):
        assert line in text


def imagenette_subset(folder: Path, every: int = 20) -> Path:
    """An ImageFolder of every N-th Imagenette val photo (all 10 classes)."""
    return tar_subset(folder, "imagenette2/val.tar", every)


@pytest.mark.slow
def test_demo_default_profile_sends_fewer_bytes_than_full_jpeg(tmp_path: Path) -> None:
    source = imagenette_subset(tmp_path / "images")  # ~196 val photos
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        patchcast_cmd("demo", "--duration", "15", "--devices", "4", "--headless", "--report", str(report_path),
                      "--source", str(source), "--log-dir", str(tmp_path / "logs"), "--max-workers", "2",
                      "--server-eval", "64"),
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    r = json.loads(report_path.read_text())
    assert r["models"] == {"edge": "zoo:imagenette-edge", "server": "zoo:imagenette-server"}
    assert r["lost_requests"] == 0 and r["unaccounted_images"] == 0 and r["offloaded"] > 0
    assert r["bytes_vs_full_jpeg"] < 1.0 and r["bytes_vs_full_jpeg_all"] < r["bytes_vs_full_jpeg"]
    for key in ("edge_only", "collaborative", "server_only"):
        assert r["accuracy"][key] is not None, key
