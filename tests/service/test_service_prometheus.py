"""A real worker's Prometheus snapshot: its counters and queue, copied at the scrape (no broker needed)."""

from __future__ import annotations

from service_helpers import async_test, service_config

from inference_worker.prometheus import worker_families
from inference_worker.service import InferenceWorker
from shared.models import build_model
from shared.prometheus import render


@async_test(60)
async def test_the_snapshot_is_the_worker_s_counts_at_the_scrape(model_files, image_folder) -> None:
    edge_path, server_path = model_files
    cfg = service_config(1883, edge_path, server_path, image_folder)
    worker = InferenceWorker(cfg, build_model(cfg.models.server, role="server"), worker_id="snap-w")
    try:
        for _ in range(3):
            worker.stats.on_request(0.01)
        worker.stats.on_error("busy")
        worker.stats.on_region("asked")
        snap = worker.prometheus_snapshot()
        worker.stats.on_error("busy")  # after the scrape: not in it
    finally:
        worker._infer_pool.shutdown(wait=True)
        worker._decode_pool.shutdown(wait=True)
        worker.engine.close()
    assert (snap.worker_id, snap.requests, snap.replies, snap.queue_depth) == ("snap-w", 3, 0, 0)
    assert snap.queue_capacity == cfg.worker.queue_capacity
    assert snap.errors_by_code == {"busy": 1} and snap.regions == {"asked": 1}
    assert snap.last_metrics is None  # no metrics window has closed yet
    text = render(worker_families(snap))
    assert f'patchcast_worker_requests_total{{model="{worker.model_id}",worker="snap-w"}} 3' in text
    assert "patchcast_worker_busy_fraction" not in text
