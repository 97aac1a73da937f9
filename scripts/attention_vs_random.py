"""Attention-chosen against random patches without a gate: every test image sent with k of its N patches.

For each k (default: 25 / 50 / 75 % of the patches), the server classifies every image from the edge's
top-k patches by last-block CLS attention, and from ``--draws`` independent uniformly random k-subsets
(random accuracy = the mean over draws, its expected value). The difference comes with a paired
bootstrap over images (both sides recomputed on each resample) and its 95 % interval.

    python scripts/attention_vs_random.py --data imagenette2/val.tar --edge zoo:imagenette-edge \\
        --server zoo:imagenette-server

``--oracle`` adds a third ranking: the *server's own* last-block CLS attention on the full image. No
deployment has it (the device does not run the server), so it bounds what any attention ranking could
gain over random at this grid, on these photos, with this server.

``--spread C`` adds the spread order (``selection.spread``, :func:`shared.selection.spread_order`): the same k
patches by the edge's attention, but spread over C×C cells of the grid, the best of each cell first. Its
control is the same order on uniformly random scores (one random patch per cell first: stratified random,
mean over the draws), so the gain splits into what spreading gives and what attention adds to it. With
``--oracle`` too, the server's own attention is also taken in the spread order: what an edge that looked
where the server looks would pick in that order.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch

from patchcast.progress import phase_bars
from shared import datasets
from shared.attention import edge_forward
from shared.models import LoadedModel, build_model
from shared.scores import cls_attention_scores
from shared.selection import spread_order
from shared.subset import embed_all, forward_tokens, gather_tokens


def photo_passes(edge: LoadedModel, server: LoadedModel, ds: datasets.Dataset, *, oracle: bool = False,
                 batch: int = 500) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One pass over the photos (progress on stderr): the edge's CLS attention scores (B, N), the server's
    own ones when ``oracle`` (its model built with its attention readable), the labels, and the server's
    patch-embedded tokens (CLS + N, for :func:`shared.subset.gather_tokens`)."""
    scores, oracle_scores, labels, tokens = [], [], [], []
    batches = -(-len(ds) // batch)
    with phase_bars({"embed": "edge attention and server embeddings"}) as report:
        for i, (px, y) in enumerate(datasets.iter_batches(ds, edge.preprocess, batch)):
            out = edge_forward(edge.model, datasets.normalize(px, edge.preprocess))
            scores.append(cls_attention_scores(out.cls_attention).float())
            labels.append(y)
            tokens.append(embed_all(server.model, datasets.normalize(px, server.preprocess)))
            if oracle:
                sout = edge_forward(server.model, datasets.normalize(px, server.preprocess))
                oracle_scores.append(cls_attention_scores(sout.cls_attention).float())
            report("embed", i + 1, batches, "")
    return (torch.cat(scores), torch.cat(oracle_scores) if oracle_scores else None, torch.cat(labels),
            torch.cat(tokens))


def server_correct(server: torch.nn.Module, tokens: torch.Tensor, kept: torch.Tensor, labels: torch.Tensor,
                   batch: int = 500) -> np.ndarray:
    """Per image: whether the server, on CLS + the kept patch tokens (B, K), is right."""
    out = []
    for s in range(0, len(labels), batch):
        logits = forward_tokens(server, gather_tokens(tokens[s:s + batch], kept[s:s + batch]))  # type: ignore[arg-type]
        out.append((logits.argmax(-1) == labels[s:s + batch]).numpy())
    return np.concatenate(out)


def bootstrap_points(diff: np.ndarray, rng: np.random.Generator, resamples: int) -> list[float]:
    """95 % interval (points) of the mean of a per-image difference, over image resamples."""
    n = len(diff)
    boot = np.array([diff[idx].mean() for idx in (rng.integers(0, n, n) for _ in range(resamples))])
    return [100 * float(np.quantile(boot, q)) for q in (0.025, 0.975)]


def spread_rows(r: dict[str, Any], server: torch.nn.Module, tok: torch.Tensor, score: torch.Tensor,
                y: torch.Tensor, k: int, cell: int, rnd: np.ndarray, draws: int, gen: torch.Generator,
                rng: np.random.Generator, resamples: int) -> None:
    """The spread order's k patches by attention, and by random scores (stratified random), into row ``r``."""
    def kept(s: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(spread_order(s.double().numpy(), cell)[:, :k].copy())

    n, num_patches = score.shape
    spr = server_correct(server, tok, kept(score), y)
    strat = np.mean([server_correct(server, tok, kept(torch.rand(n, num_patches, generator=gen)), y)
                     for _ in range(draws)], axis=0)
    over_random, over_strat = spr.astype(np.float64) - rnd, spr.astype(np.float64) - strat
    r.update(spread=float(spr.mean()), stratified_random=float(strat.mean()),
             spread_diff_points=100 * float(over_random.mean()),
             spread_ci95_points=bootstrap_points(over_random, rng, resamples),
             spread_over_stratified_points=100 * float(over_strat.mean()),
             spread_over_stratified_ci95_points=bootstrap_points(over_strat, rng, resamples))
    lo, hi = r["spread_ci95_points"]
    slo, shi = r["spread_over_stratified_ci95_points"]
    print(f"    spread over {cell}×{cell} cells by attention: {r['spread']:.2%}, {r['spread_diff_points']:+.2f} "
          f"points over random [{lo:+.2f}, {hi:+.2f}]; stratified random (one random patch per cell first) "
          f"{r['stratified_random']:.2%}, attention adds {r['spread_over_stratified_points']:+.2f} "
          f"[{slo:+.2f}, {shi:+.2f}]")


def oracle_spread_row(r: dict[str, Any], server: torch.nn.Module, tok: torch.Tensor, oracle: torch.Tensor,
                      y: torch.Tensor, k: int, cell: int, rnd: np.ndarray, rng: np.random.Generator,
                      resamples: int) -> None:
    """The spread order's k patches by the server's own attention (an edge that looked where the server
    looks), into row ``r``."""
    kept = torch.from_numpy(spread_order(oracle.double().numpy(), cell)[:, :k].copy())
    ospr = server_correct(server, tok, kept, y)
    diff = ospr.astype(np.float64) - rnd
    r.update(oracle_spread=float(ospr.mean()), oracle_spread_diff_points=100 * float(diff.mean()),
             oracle_spread_ci95_points=bootstrap_points(diff, rng, resamples))
    lo, hi = r["oracle_spread_ci95_points"]
    print(f"    spread by the server's own attention (oracle): {r['oracle_spread']:.2%}, "
          f"{r['oracle_spread_diff_points']:+.2f} points over random [{lo:+.2f}, {hi:+.2f}]")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="imagenette2/val.tar", help="labelled test images")
    ap.add_argument("--edge", default="zoo:imagenette-edge")
    ap.add_argument("--server", default="zoo:imagenette-server")
    ap.add_argument("--fractions", default="0.25,0.5,0.75", help="kept fractions (k = round(f·N))")
    ap.add_argument("--draws", type=int, default=10, help="random draws per image and k")
    ap.add_argument("--bootstrap", type=int, default=1000, help="image resamples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--oracle", action="store_true",
                    help="also rank by the server's own attention on the full image (an upper bound, not deployable)")
    ap.add_argument("--spread", type=int, default=0, metavar="C",
                    help="also the spread order over C×C cells (attention, and stratified random as its control)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    edge = build_model(args.edge, role="edge")
    server = build_model(args.server, role="edge" if args.oracle else "server")  # "edge": its attention readable
    ds = datasets.load(args.data)
    with torch.inference_mode():
        score, oracle, y, tok = photo_passes(edge, server, ds, oracle=args.oracle)
        n, num_patches = len(y), score.shape[1]
        full = server_correct(server.model, tok, torch.arange(num_patches).expand(n, -1), y)
        gen = torch.Generator().manual_seed(args.seed)
        rng = np.random.default_rng(args.seed)
        # the spread rows draw from their own generators: the plain rows stay those of a run without them
        spread_gen, spread_rng = torch.Generator().manual_seed(args.seed + 1), np.random.default_rng(args.seed + 1)
        oracle_spread_rng = np.random.default_rng(args.seed + 2)  # likewise: the spread rows stay as without --oracle
        rows: list[dict[str, Any]] = []
        for f in (float(v) for v in args.fractions.split(",")):
            k = max(1, round(f * num_patches))
            att = server_correct(server.model, tok, score.topk(k, dim=1).indices, y)
            rnd = np.mean([server_correct(server.model, tok, torch.rand(n, num_patches, generator=gen)
                                          .argsort(1)[:, :k], y) for _ in range(args.draws)], axis=0)
            diff = att.astype(np.float64) - rnd
            lo, hi = bootstrap_points(diff, rng, args.bootstrap)
            rows.append({"fraction": f, "k": k, "attention": float(att.mean()), "random": float(rnd.mean()),
                         "diff_points": 100 * float(diff.mean()), "ci95_points": [lo, hi]})
            r = rows[-1]
            print(f"k = {k:3d} of {num_patches} ({f:.0%}): attention {r['attention']:.2%}, random {r['random']:.2%} "
                  f"(mean of {args.draws} draws), difference {r['diff_points']:+.2f} points, 95 % bootstrap "
                  f"[{r['ci95_points'][0]:+.2f}, {r['ci95_points'][1]:+.2f}]")
            if oracle is not None:
                top = server_correct(server.model, tok, oracle.topk(k, dim=1).indices, y)
                odiff = top.astype(np.float64) - rnd
                olo, ohi = bootstrap_points(odiff, rng, args.bootstrap)
                r.update(oracle=float(top.mean()), oracle_diff_points=100 * float(odiff.mean()),
                         oracle_ci95_points=[olo, ohi])
                print(f"    the server's own attention (oracle): {r['oracle']:.2%}, "
                      f"{r['oracle_diff_points']:+.2f} points over random [{olo:+.2f}, {ohi:+.2f}]")
            if args.spread >= 2:
                spread_rows(r, server.model, tok, score, y, k, args.spread, rnd, args.draws, spread_gen, spread_rng,
                            args.bootstrap)
                if oracle is not None:
                    oracle_spread_row(r, server.model, tok, oracle, y, k, args.spread, rnd, oracle_spread_rng,
                                      args.bootstrap)
    print(f"server on full images: {full.mean():.2%} ({n} images)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"images": n, "num_patches": num_patches, "server_full": float(full.mean()), "rows": rows,
                       "draws": args.draws, "bootstrap": args.bootstrap}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
