"""The patch-method sweep (pure numpy): every selection × (no gate, each gate × each η) becomes one
operating point. An image takes the server's answer on its selection when the gate sends it and the
edge's answer otherwise; the CSV samples η on the grid of :func:`patchcast.eval.grid.gate_thresholds`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from patchcast.eval.arrays import BoolArray, FloatArray, IntArray
from patchcast.eval.bytes import bytes_fraction
from patchcast.eval.frontier import Selection, send_masks, sweep_gate
from patchcast.eval.grid import GATES, Encoder, ScoreName, SelectionSpec, gate_thresholds
from patchcast.eval.points import Point

if TYPE_CHECKING:
    from patchcast.eval.config import EvalConfig
    from patchcast.eval.passes import Arrays


def spec_correctness(data: Arrays, specs: Sequence[SelectionSpec]) -> Iterator[tuple[SelectionSpec, FloatArray]]:
    """Each selection with the server's per-image correctness on it; a random selection's draws are
    averaged into its draw 0 (its expected correctness, in [0, 1])."""
    draws: dict[str, list[str]] = {}  # a random spec's id → the ids of all its draws
    for sp in specs:
        draws.setdefault(replace(sp, draw=0).id, []).append(sp.id)
    for sp in specs:
        if not sp.draw:
            yield sp, np.mean([data.server_pred[i] == data.labels for i in draws[sp.id]], axis=0)


def selections_of(data: Arrays, specs: Sequence[SelectionSpec], *, score: ScoreName,
                  encoder: Encoder = "edge") -> list[Selection]:
    """Per-image correctness and patch counts of one score's selections, every rule and value."""
    return [(correct, data.counts[sp.id]) for sp, correct in spec_correctness(data, specs)
            if sp.encoder == encoder and sp.score == score]


def sweep(cfg: EvalConfig, data: Arrays, specs: Sequence[SelectionSpec], n_patches: int, server_m: Any,
          sample: IntArray, full_bytes: IntArray, sel_bytes: dict[str, IntArray],
          expert_preds: dict[str, IntArray] | None = None) -> tuple[list[Point], dict[str, FloatArray]]:
    """Every operating point: baselines, then each selection × (no gate, each gate × each η); with
    ``expert_preds``, the same selections answered by expert routing (score ``experts``)."""
    import torch

    from shared.costs import communication_cost, model_flops
    from shared.gates import uncertainty

    n = len(data.labels)
    edge_correct = data.edge_logits.argmax(1) == data.labels
    server_correct = data.server_logits.argmax(1) == data.labels
    macs = np.array([model_flops(server_m, k + 1) for k in range(n_patches + 1)]) / 1e9
    logits_t = torch.from_numpy(np.ascontiguousarray(data.edge_logits))
    gate_u: dict[str, FloatArray] = {g: uncertainty(logits_t, g).numpy() for g in GATES}
    gate_eta = {g: gate_thresholds(gate_u[g], g, cfg.grid) for g in GATES}
    points: list[Point] = []

    def add(encoder: str, score: str, rule: str, value: float | None, gate: str, etas: Sequence[float | None],
            send: BoolArray, correct: BoolArray | FloatArray, counts: IntArray, sbytes: IntArray) -> None:
        gs = sweep_gate(edge_correct, correct, counts, send)
        bf = bytes_fraction(send[:, sample], sbytes, full_bytes)
        for t, eta in enumerate(etas):
            k, p = int(gs.images_sent[t]), int(gs.patches_sent[t])
            cost = communication_cost(k, n, p, k * n_patches)
            points.append(Point(
                encoder=encoder, score=score, rule=rule, value=value, gate=gate, eta=eta,
                images_sent_frac=k / n, patch_frac=p / (k * n_patches) if k else 0.0, comm_cost=cost,
                bytes_frac=float(bf[t]), accuracy=float(gs.accuracy[t]),
                mean_patches_sent=p / k if k else 0.0,
                server_gmacs_per_image=float(send[t].astype(np.float64) @ macs[counts]) / n))

    all_send = np.ones((1, n), dtype=bool)
    none_send = np.zeros((1, n), dtype=bool)
    full_counts = np.full(n, n_patches, dtype=np.int64)
    add("", "", "none", None, "none", [None], none_send, server_correct, full_counts, full_bytes)
    add("", "", "full", None, "none", [None], all_send, server_correct, full_counts, full_bytes)
    for g in GATES:
        add("", "", "full", None, g, gate_eta[g], send_masks(gate_u[g], g, gate_eta[g]), server_correct,
            full_counts, full_bytes)
    for sp, correct in spec_correctness(data, specs):
        counts = data.counts[sp.id]
        sb = sel_bytes[sp.id]
        add(sp.encoder, sp.score, sp.rule, sp.value, "none", [None], all_send, correct, counts, sb)
        for g in GATES:
            add(sp.encoder, sp.score, sp.rule, sp.value, g, gate_eta[g],
                send_masks(gate_u[g], g, gate_eta[g]), correct, counts, sb)
    for sid, pred in (expert_preds or {}).items():
        sp = next(x for x in specs if x.id == sid)
        correct = pred == data.labels
        counts, sb = data.counts[sid], sel_bytes[sid]
        add(sp.encoder, "experts", sp.rule, sp.value, "none", [None], all_send, correct, counts, sb)
        add(sp.encoder, "experts", sp.rule, sp.value, "min_entropy", gate_eta["min_entropy"],
            send_masks(gate_u["min_entropy"], "min_entropy", gate_eta["min_entropy"]), correct, counts, sb)
    return points, gate_u
