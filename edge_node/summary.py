"""Aggregate outcome records: per-device EdgeMetrics messages and the fleet's JSON summary."""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_node.outcome import OutcomeRecord
from shared.percentiles import percentiles
from shared.protocol import EdgeMetrics

SUMMARY_SCHEMA = "patchcast.edge_summary/1"


def _latency_figures(values: Sequence[float]) -> dict[str, float] | None:
    pct = percentiles(values, (50, 95, 99))
    if pct is None:
        return None
    p50, p95, p99 = pct
    return {"p50": round(p50, 3), "p95": round(p95, 3), "p99": round(p99, 3),
            "mean": round(float(np.mean(values)), 3), "max": round(float(max(values)), 3)}


def edge_metrics(device_id: str, records: Sequence[OutcomeRecord], window_s: float) -> EdgeMetrics:
    latencies = [r.latency_ms for r in records if r.latency_ms is not None]
    pct = _latency_figures(latencies)
    labelled = [r for r in records if r.ground_truth is not None]
    return EdgeMetrics(
        device_id=device_id, at=time.time(), window_s=max(window_s, 0.0), images=len(records),
        offloaded=sum(r.status != "edge" for r in records), replies=sum(r.status == "server" for r in records),
        timeouts=sum(r.status == "timeout" for r in records), errors=sum(r.status == "error" for r in records),
        bytes_sent=sum(r.bytes for r in records), patches_sent=sum(r.patches for r in records),
        latency_ms_p50=pct["p50"] if pct else None, latency_ms_p95=pct["p95"] if pct else None,
        latency_ms_p99=pct["p99"] if pct else None, labelled=len(labelled),
        correct=sum(r.final_label == r.ground_truth for r in labelled))


def summarize(records: Sequence[OutcomeRecord], *, devices: int, wall_s: float, model_id: str,
              ledger_totals: dict[str, int] | None = None, per_device: bool = True) -> dict[str, Any]:
    """The fleet's summary (schema ``patchcast.edge_summary/1``; see ``docs/service.md``)."""
    images = len(records)
    offloaded = [r for r in records if r.status != "edge"]
    num_patches = records[0].num_patches if records else 0
    patches_sent = sum(r.patches for r in offloaded)
    bytes_sent = sum(r.bytes for r in records)
    labelled = [r for r in records if r.ground_truth is not None]
    errors = collections.Counter(r.error_code or "unknown" for r in records if r.status in ("timeout", "error"))
    summary: dict[str, Any] = {
        "schema": SUMMARY_SCHEMA,
        "model": model_id,
        "devices": devices,
        "wall_s": round(wall_s, 3),
        "images": images,
        "images_per_s": round(images / wall_s, 3) if wall_s > 0 else None,
        "offloaded": len(offloaded),
        "sent_fraction": round(len(offloaded) / images, 4) if images else None,
        "patches_sent": patches_sent,
        # Of the offloaded images' patches, the share that was sent (the selection's keep rate).
        "patch_fraction": round(patches_sent / (len(offloaded) * num_patches), 4) if offloaded else None,
        # Of all images' patches, the share that crossed the network (gate × selection).
        "patch_fraction_all": round(patches_sent / (images * num_patches), 4) if images else None,
        "bytes_sent": bytes_sent,
        "bytes_per_image": round(bytes_sent / images, 1) if images else None,
        "bytes_per_offloaded": round(bytes_sent / len(offloaded), 1) if offloaded else None,
        "replies": sum(r.status == "server" for r in records),
        "timeouts": sum(r.status == "timeout" for r in records),
        "errors": sum(r.status == "error" for r in records),
        "errors_by_code": dict(sorted(errors.items())),
        # offloaded images whose device kept the edge label (no server answer by the deadline, or a refusal)
        "fallbacks": sum(r.status in ("timeout", "error") for r in records),
        "attempts": sum(r.attempts for r in records),
        "retries": sum(max(r.attempts - 1, 0) for r in records),
        # region offload: images whose worker asked for, and got, a full-resolution region
        "regions_sent": sum(r.region for r in records),
        "accuracy": None,
        "latency_ms": _latency_figures([r.latency_ms for r in records if r.latency_ms is not None]),
        "edge_ms_per_image": round(float(np.mean([r.edge_ms for r in records])), 3) if records else None,
        "workers": dict(sorted(collections.Counter(r.worker_id for r in records if r.worker_id).items())),
    }
    if labelled:
        summary["accuracy"] = {
            "labelled": len(labelled),
            "edge_only": round(sum(r.edge_label == r.ground_truth for r in labelled) / len(labelled), 4),
            "collaborative": round(sum(r.final_label == r.ground_truth for r in labelled) / len(labelled), 4),
        }
    if ledger_totals is not None:
        summary["replies_late"] = ledger_totals.get("late", 0)
        summary["replies_foreign"] = ledger_totals.get("foreign", 0)
        summary["replies_malformed"] = ledger_totals.get("malformed", 0)
        summary["replies_duplicate"] = ledger_totals.get("duplicate", 0)
    if per_device:
        by_device: dict[str, list[OutcomeRecord]] = collections.defaultdict(list)
        for r in records:
            by_device[r.device_id].append(r)
        summary["per_device"] = [
            {"device_id": d, "images": len(rs), "offloaded": sum(r.status != "edge" for r in rs),
             "replies": sum(r.status == "server" for r in rs), "timeouts": sum(r.status == "timeout" for r in rs),
             "errors": sum(r.status == "error" for r in rs)}
            for d, rs in sorted(by_device.items())]
    return summary
