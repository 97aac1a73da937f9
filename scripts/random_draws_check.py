"""Is the random baseline's lead at the lowest communication costs an artefact of too few random draws?

``patchcast eval`` measures random patch selection as the mean over ``--random-draws`` independent
draws, and its frontier is a maximum over many such noisy points, which favours the noisier curve.
This check redoes the low-cost end with many more draws: for the ``--top`` most uncertain test images
(min-entropy of the edge model: the only images sent at comm cost ≤ top/N), the server classifies each
image's edge-attention top-k patches and ``--draws`` independent random k-subsets, for k in ``--k``.
It then compares the two frontiers (top-k rule, min-entropy gate at every observed η, costs ≤ ``--max-cost``)
with the random one averaged over the first R draws for several R. If the method's deficit shrinks as
R grows, the draws were the cause; if it stays, it is real on this test set.

    python scripts/random_draws_check.py --server zoo:cifar10-server
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from shared import datasets
from shared.attention import edge_forward
from shared.models import build_model
from shared.scores import cls_attention_scores
from shared.subset import embed_all, forward_tokens, gather_tokens


def frontier_at(points: np.ndarray, costs: np.ndarray, floor: float) -> np.ndarray:
    """Best accuracy among ``points`` (cost, accuracy) at cost ≤ each of ``costs``."""
    order = np.argsort(points[:, 0], kind="stable")
    c, best = points[order, 0], np.maximum.accumulate(points[order, 1])
    i = np.searchsorted(c, costs, side="right") - 1
    return np.where(i >= 0, best[np.maximum(i, 0)], floor)


def gate_points(correct: dict[int, np.ndarray], edge_ok_sent: np.ndarray, edge_total: int, n: int,
                num_patches: int) -> np.ndarray:
    """(cost, accuracy) of sending the m most uncertain images (m = 1…top) with k patches each."""
    m = np.arange(1, len(edge_ok_sent) + 1)
    rows = [np.stack([m / n * k / num_patches, (edge_total + np.cumsum(c - edge_ok_sent)) / n], 1)
            for k, c in correct.items()]
    return np.concatenate(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="cifar10/test.tar", help="labelled test images")
    ap.add_argument("--edge", default="zoo:cifar10-edge")
    ap.add_argument("--server", default="zoo:cifar10-server")
    ap.add_argument("--top", type=int, default=1500, help="most uncertain images evaluated")
    ap.add_argument("--draws", type=int, default=40, help="random draws per image and k")
    ap.add_argument("--k", default="8,12,16,20,24,28,32,40,48,56,64", help="patch counts, comma-separated")
    ap.add_argument("--max-cost", type=float, default=0.1, help="compare the frontiers up to this comm cost")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.k.split(",")]
    edge, server = build_model(args.edge, role="edge"), build_model(args.server)
    ds = datasets.load(args.data)
    u, ok, scores, labels, pixels = [], [], [], [], []
    with torch.inference_mode():
        for px, y in datasets.iter_batches(ds, edge.preprocess, 1000):
            out = edge_forward(edge.model, datasets.normalize(px, edge.preprocess))
            p = out.logits.float().softmax(-1)
            u.append(-torch.log2(p.max(-1).values))
            ok.append((p.argmax(-1) == y).numpy())
            scores.append(cls_attention_scores(out.cls_attention).float())
            labels.append(y)
            pixels.append(px)
        edge_ok = np.concatenate(ok)
        n, num_patches = len(edge_ok), scores[0].shape[1]
        sent = torch.argsort(-torch.cat(u), stable=True)[:args.top]
        tokens = embed_all(server.model, datasets.normalize(torch.cat(pixels)[sent], server.preprocess))
        y = torch.cat(labels)[sent]
        score = torch.cat(scores)[sent]
        gen = torch.Generator().manual_seed(args.seed)
        attention: dict[int, np.ndarray] = {}
        random: dict[int, np.ndarray] = {}
        for k in ks:
            pick = score.topk(k, 1).indices
            attention[k] = (forward_tokens(server.model, gather_tokens(tokens, pick)).argmax(-1) == y).numpy()
            if k == num_patches:  # every patch: each draw is the same set as attention's
                random[k] = np.repeat(attention[k][None], args.draws, axis=0)
            else:
                random[k] = np.stack([
                    (forward_tokens(server.model, gather_tokens(
                        tokens, torch.rand(len(y), num_patches, generator=gen).argsort(1)[:, :k])).argmax(-1)
                     == y).numpy()
                    for _ in range(args.draws)])
            print(f"k = {k:2d}: attention {attention[k].mean() * 100:5.1f} %, random {random[k].mean() * 100:5.1f} % "
                  f"(the {args.top} most uncertain images)", flush=True)
    ok_sent = edge_ok[sent.numpy()].astype(float)
    floor = edge_ok.mean()
    method = gate_points({k: v.astype(float) for k, v in attention.items()}, ok_sent, int(edge_ok.sum()), n,
                         num_patches)
    for r in sorted({1, 5, 10, 20, args.draws}):
        if r > args.draws:
            continue
        rand = gate_points({k: v[:r].mean(0) for k, v in random.items()}, ok_sent, int(edge_ok.sum()), n,
                           num_patches)
        costs = np.unique(rand[:, 0][rand[:, 0] <= args.max_cost])
        diff = (frontier_at(method, costs, floor) - frontier_at(rand, costs, floor)) * 100
        low = costs <= 0.03
        print(f"R = {r:2d} draws: method − random at comm cost ≤ {args.max_cost:g}: worst {diff.min():+.3f} points, "
              f"below at {np.mean(diff < 0) * 100:.1f} % of the random frontier's costs; at cost ≤ 0.03 worst "
              f"{diff[low].min():+.3f}, mean {diff[low].mean():+.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
