"""Expert routing: specialists (``patchcast train --classes``) answering the images the edge's top-k
points to, compared with the general server on the same selections and gate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from patchcast.eval.arrays import FloatArray, IntArray
from patchcast.eval.frontier import exact_frontier, frontier_at, send_masks
from patchcast.eval.grid import PAPER_ETA, PAPER_SUM_THRESHOLD, SelectionSpec

if TYPE_CHECKING:
    from patchcast.eval.config import EvalConfig
    from patchcast.eval.passes import Arrays


EXPERT_TOPK = 5  # the edge top-k a request carries, over which routing weighs probability mass
EXPERT_MIN_SHARES = (0.0, 0.9, 0.95, 0.99)  # routing.min_share values the report compares
EXPERT_COSTS = (0.1, 0.2, 0.3, 0.5, 0.75)


def load_expert(ref: str, server_m: Any) -> Any:
    """A specialist for the expert-routing comparison: a checkpoint that names the global class ids
    of its outputs (``patchcast train --classes``) and sees the server's image and patch grid."""
    from shared.errors import ModelError
    from shared.models import build_model, check_server_layout

    expert = build_model(ref, role="server")
    check_server_layout(expert, ref)
    if not expert.class_ids:
        raise ModelError(f"{ref}: not a specialist (its checkpoint names no class ids; train one with "
                         "'patchcast train --classes')")
    if max(expert.class_ids) >= server_m.num_classes:
        raise ModelError(f"{ref}: class ids {expert.class_ids} exceed the server's {server_m.num_classes} classes")
    if (expert.grid, expert.patch_size, expert.preprocess.input_size) != (
            server_m.grid, server_m.patch_size, server_m.preprocess.input_size):
        raise ModelError(f"{ref}: another image size or patch grid than the server's")
    return expert


def expert_specs(specs: Sequence[SelectionSpec]) -> list[SelectionSpec]:
    """The selections expert routing is compared on: edge attention under the paper's δ_sum rule."""
    return [sp for sp in specs if sp.encoder == "edge" and sp.score == "attention" and sp.rule == "sum_threshold"]


def route_images(edge_logits: FloatArray, experts: Sequence[Any], top_k: int = EXPERT_TOPK,
                 min_share: float = 0.0) -> IntArray:
    """Per image, the index of the expert :class:`shared.routing.ExpertRouter` picks from the edge's
    top-k softmax (as a device does), or -1 for the general server."""
    import torch

    from shared.routing import Expert, ExpertRouter

    router = ExpertRouter(tuple(Expert(f"e{i}", frozenset(m.class_ids)) for i, m in enumerate(experts)),
                          fallback="general", top_k=top_k, min_share=min_share)
    probs = torch.softmax(torch.from_numpy(np.asarray(edge_logits, dtype=np.float32)), dim=-1)
    top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    picks = [router.route(i.tolist(), p.tolist()) for i, p in zip(top_i, top_p, strict=True)]
    return np.array([-1 if m == "general" else int(m[1:]) for m in picks], dtype=np.int64)


def routed_predictions(route: IntArray, expert_preds: IntArray, general: IntArray) -> IntArray:
    """Each image's answer under ``route``: its expert's row of ``expert_preds`` (E, B), else ``general``."""
    out = np.asarray(general, dtype=np.int64).copy()
    rows = np.flatnonzero(route >= 0)
    out[rows] = expert_preds[route[rows], rows]
    return out


def summarise_experts(cfg: EvalConfig, data: Arrays, experts: Sequence[Any], all_experts: dict[str, IntArray],
                      gate_u: dict[str, FloatArray], n_patches: int) -> dict[str, Any]:
    """Expert routing against the general server on the same δ_sum selections and min-entropy gate,
    for several ``min_share`` settings: where images went, how often their true class was among the
    routed expert's, and accuracy at the paper's point and along both exact frontiers."""
    labels = data.labels
    edge_correct = data.edge_logits.argmax(1) == labels
    u = gate_u["min_entropy"]
    sids = list(all_experts)

    def frontier(preds: dict[str, IntArray]) -> tuple[FloatArray, FloatArray]:
        return exact_frontier(u, "min_entropy", edge_correct,
                               [(preds[sid] == labels, data.counts[sid]) for sid in sids], n_patches)

    def at_paper(preds: dict[str, IntArray]) -> float | None:
        sid = next((x for x in sids if x.endswith(f"-sum_threshold-{PAPER_SUM_THRESHOLD:g}")), None)
        if sid is None:
            return None
        send = send_masks(u, "min_entropy", [PAPER_ETA])[0]
        return float(np.where(send, preds[sid] == labels, edge_correct).mean())

    general_preds = {sid: data.server_pred[sid] for sid in sids}
    general = frontier(general_preds)
    settings = []
    for share in sorted({*EXPERT_MIN_SHARES, cfg.expert_min_share}):
        route = route_images(data.edge_logits, experts, min_share=share)
        preds = {sid: routed_predictions(route, all_experts[sid], data.server_pred[sid]) for sid in sids}
        routed = frontier(preds)
        covered = np.array([r >= 0 and int(y) in experts[r].class_ids for r, y in zip(route, labels, strict=True)])
        settings.append({
            "min_share": share,
            "routed_share": [float(np.mean(route == i)) for i in range(len(experts))],
            "general_share": float(np.mean(route < 0)),
            "true_class_covered_when_routed": float(covered.sum() / max(1, int(np.sum(route >= 0)))),
            "paper_point": at_paper(preds),
            "frontier": [frontier_at(*routed, c) for c in EXPERT_COSTS],
        })
    return {
        "models": [{"ref": ref, "classes": m.class_ids} for ref, m in zip(cfg.experts, experts, strict=True)],
        "costs": list(EXPERT_COSTS),
        "general": {"paper_point": at_paper(general_preds),
                    "frontier": [frontier_at(*general, c) for c in EXPERT_COSTS]},
        "settings": settings,
    }
