"""``patchcast eval``: the paper's accuracy / communication trade-off, reproduced offline on real images.

The run: load both models and the data, run (or load from the cache) every model pass
(:mod:`patchcast.eval.passes`), measure bytes (:mod:`patchcast.eval.bytes`), sweep every selection ×
gate × η (:mod:`patchcast.eval.sweep`, pure numpy), then write ``points.csv``, ``summary.json``, the
tables, the report and the plots.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchcast.eval.arrays import FloatArray, IntArray
from patchcast.eval.bytes import measure_selection_bytes
from patchcast.eval.cache import Cache, data_fingerprint, weights_fingerprint
from patchcast.eval.config import EvalConfig
from patchcast.eval.csvio import write_points
from patchcast.eval.experts import expert_specs, load_expert, route_images, routed_predictions, summarise_experts
from patchcast.eval.grid import SelectionSpec, build_specs
from patchcast.eval.passes import Arrays, compute_passes, default_threads, expert_passes
from patchcast.eval.plots import plot_all
from patchcast.eval.points import Point
from patchcast.eval.report import publish, report_markdown
from patchcast.eval.summary import summarise
from patchcast.eval.sweep import sweep
from patchcast.eval.tables import table_expected_patches, table_sent_fraction
from patchcast.progress import ProgressFn


@dataclass
class EvalResult:
    points: list[Point]
    summary: dict[str, Any]
    files: list[Path]


def run_eval(cfg: EvalConfig, progress: ProgressFn | None = None) -> EvalResult:
    """Run (or load from cache) every pass, sweep, and write CSV, tables, plots and a report."""
    import torch

    from shared import datasets
    from shared.codecs import get_codec
    from shared.errors import ConfigError, ModelError
    from shared.models import build_model, check_server_layout
    from shared.precision import resolve

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    # Fail on a bad codec name or parameter now, not after the model passes.
    codec_params = get_codec(cfg.codec).resolve_params(dict(cfg.codec_params))
    threads = cfg.threads or default_threads()
    torch.set_num_threads(threads)
    report = progress or (lambda *_: None)
    bf16 = resolve(cfg.precision) == "bf16"
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    edge_m = build_model(cfg.edge, pretrained=cfg.pretrained, role="edge")
    # Built unfused too: the server's own attention map is the "server as semantic encoder" score.
    server_m = build_model(cfg.server, pretrained=cfg.pretrained, role="edge")
    check_server_layout(server_m, cfg.server)
    if edge_m.grid != server_m.grid or edge_m.patch_size != server_m.patch_size:
        raise ModelError(f"edge grid {edge_m.grid}×{edge_m.patch_size}px and server grid "
                         f"{server_m.grid}×{server_m.patch_size}px differ: patches cannot be shared")
    if edge_m.preprocess.input_size != server_m.preprocess.input_size:
        raise ModelError("edge and server expect different input sizes")
    n_patches = edge_m.num_patches
    experts = [load_expert(ref, server_m) for ref in cfg.experts]
    ds = datasets.load(cfg.data).spread(cfg.limit, seed=cfg.seed)
    if len(ds) == 0:
        raise ConfigError(f"{cfg.data}: no images")
    if any(s.label is None for s in ds.samples):
        raise ConfigError(f"{cfg.data}: accuracy needs labels (an ImageFolder tree, a tar of one, "
                          "or labels.csv)")
    timings["load_s"] = time.perf_counter() - t_start

    key_parts = {"edge": weights_fingerprint(edge_m.model), "server": weights_fingerprint(server_m.model),
                 "data": data_fingerprint(ds.samples), "images": len(ds), "bf16": bf16, "seed": cfg.seed,
                 "edge_pre": edge_m.preprocess.to_json(), "server_pre": server_m.preprocess.to_json(),
                 "format": 1}
    if cfg.spread >= 2:  # which patches every selection keeps
        key_parts["spread"] = cfg.spread
    if cfg.through_codec:  # the selections' server passes depend on the codec's loss
        key_parts["wire"] = {"codec": cfg.codec, "params": codec_params}
    cache_root = None if not cfg.use_cache else Path(cfg.cache_dir) if cfg.cache_dir else out_dir / "cache"
    cache = Cache(cache_root, key_parts)
    specs = build_specs(cfg.grid, n_patches, rollout=cfg.rollout, server_encoder=cfg.server_encoder,
                        random_draws=cfg.random_draws)

    t0 = time.perf_counter()
    with torch.inference_mode():
        data = compute_passes(cfg, ds, edge_m, server_m, specs, cache, bf16, report)
    timings["passes_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sample, full_bytes, sel_bytes, file_bytes = measure_selection_bytes(
        cfg, ds, edge_m.preprocess, edge_m.patch_size, data, [sp for sp in specs if not sp.draw], cache, report)
    timings["bytes_s"] = time.perf_counter() - t0

    all_experts: dict[str, IntArray] | None = None
    expert_preds: dict[str, IntArray] | None = None
    if experts:
        t0 = time.perf_counter()
        with torch.inference_mode():
            all_experts = expert_passes(cfg, ds, experts, data, expert_specs(specs), cache, bf16, report)
        route = route_images(data.edge_logits, experts, min_share=cfg.expert_min_share)
        expert_preds = {sid: routed_predictions(route, preds, data.server_pred[sid])
                        for sid, preds in all_experts.items()}
        timings["experts_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    points, gate_u = sweep(cfg, data, specs, n_patches, server_m, sample, full_bytes, sel_bytes, expert_preds)
    timings["sweep_s"] = time.perf_counter() - t0

    summary = summarise(cfg, data, points, n_patches, edge_m, server_m, gate_u, specs, len(sample))
    if all_experts is not None:
        summary["experts"] = summarise_experts(cfg, data, experts, all_experts, gate_u, n_patches)
    summary["bytes"] = {"sample": len(sample), "codec": cfg.codec, "codec_params": dict(cfg.codec_params),
                        "reference_mean_bytes": float(np.mean(full_bytes)),
                        "jpeg_file_mean_bytes": file_bytes}
    summary["spread"] = cfg.spread
    summary["patch_pixels"] = f"{cfg.codec} {codec_params} round trip" if cfg.through_codec else "exact"
    summary["threads"] = threads
    summary["compute_s"] = round(data.compute_seconds, 1)
    summary["precision"] = "bf16" if bf16 else "fp32"
    summary["cache"] = str(cache.dir) if cache.dir else None
    timings["total_s"] = time.perf_counter() - t_start  # up to the sweep; writing outputs is extra
    summary["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    files = write_outputs(cfg, out_dir, points, summary, data, specs, n_patches, gate_u)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return EvalResult(points=points, summary=summary, files=[out_dir / "summary.json", *files])


def write_outputs(cfg: EvalConfig, out_dir: Path, points: list[Point], summary: dict[str, Any],
                  data: Arrays, specs: Sequence[SelectionSpec], n_patches: int,
                  gate_u: dict[str, FloatArray]) -> list[Path]:
    files = [out_dir / "points.csv", out_dir / "tables.md", out_dir / "report.md"]
    write_points(files[0], Point, points, short=("value", "eta"))
    t2 = table_expected_patches(data, specs, n_patches, points)
    t3 = table_sent_fraction(points, gate_u, cfg.grid, data)
    files[1].write_text("## Table II: expected patches per δ_sum\n\n" + t2 +
                        "\n\n## Table III: images sent per η (min-entropy)\n\n" + t3 + "\n")
    files[2].write_text(report_markdown(summary, t2, t3, img_prefix="" if cfg.plots else None))
    if cfg.plots:
        files += plot_all(points, out_dir, summary)
    if cfg.publish:
        publish(Path(cfg.publish), out_dir, summary, t2, t3, cfg.publish_name)
        files.append(Path(cfg.publish))
    return files
