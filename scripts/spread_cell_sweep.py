"""Which patch order to compare with random, chosen on the *training* photos, not on the test set.

``selection.spread`` (:func:`shared.selection.spread_order`) needs a cell side c: the grid is cut into
c×c-patch cells and every cell's best patch comes first. This script measures, without a gate, every
order it is asked for against uniformly random k-subsets on one set of photos (default
``imagenette2/train.tar``, the only photos the zoo's choices may be made on):

- ``topk``: the paper's order, the edge's attention descending;
- ``spread<c>``: the spread order over c×c-patch cells, for each ``--cells`` value;
- ``hybrid<c>``: every c×c cell's best patch first (by attention), then all the others by attention
  alone: the spread order's first round, then the paper's.

Random is the mean of ``--draws`` uniformly random k-subsets per photo. The order chosen here is then
measured once on the val photos by ``attention_vs_random.py --spread C``.

    python scripts/spread_cell_sweep.py --cells 2,3,4,5 --json reports/spread_cell_sweep.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import numpy as np
import torch
from attention_vs_random import photo_passes, server_correct

from shared import datasets
from shared.errors import PatchCastError
from shared.models import build_model
from shared.selection import spread_order


def hybrid_order(scores: np.ndarray, cell: int) -> np.ndarray:
    """(B, N) → (B, N): the best patch of every ``cell``×``cell`` cell first, then the rest, each part by score
    descending (ties → lower index)."""
    spread = spread_order(scores, cell)
    cells = (-(-math.isqrt(scores.shape[1]) // cell)) ** 2  # spread_order checked the grid is square
    later = np.ones(scores.shape, dtype=np.int8)
    np.put_along_axis(later, spread[:, :cells], 0, axis=1)
    return np.lexsort((-scores, later), axis=-1).astype(np.int64, copy=False)


def orders(scores: np.ndarray, cells: list[int]) -> dict[str, np.ndarray]:
    """Every order measured, by name, each (B, N)."""
    out = {"topk": np.lexsort((-scores,), axis=-1).astype(np.int64, copy=False)}
    for c in cells:
        out[f"spread{c}"] = spread_order(scores, c)
        out[f"hybrid{c}"] = hybrid_order(scores, c)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="imagenette2/train.tar", help="the photos to choose on (not the test set)")
    ap.add_argument("--edge", default="zoo:imagenette-edge", help="the edge model (its attention ranks the patches)")
    ap.add_argument("--server", default="zoo:imagenette-server", help="the server model (it classifies the subsets)")
    ap.add_argument("--cells", default="2,3,4,5", help="cell sides c to try (patches)")
    ap.add_argument("--fractions", default="0.25,0.5", help="kept fractions (k = round(f·N))")
    ap.add_argument("--draws", type=int, default=3, help="random draws per photo and k")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    try:
        cells = [int(c) for c in args.cells.split(",")]
        fractions = [float(v) for v in args.fractions.split(",")]
    except ValueError as exc:
        ap.error(f"--cells and --fractions take comma-separated numbers: {exc}")
    if not all(0 < f <= 1 for f in fractions):
        ap.error("--fractions: every fraction must be in (0, 1]")
    if args.draws < 1:
        ap.error("--draws must be ≥ 1")
    if any(c < 2 for c in cells):
        ap.error("--cells: every cell side must be ≥ 2 (1 is the top-k order, always measured)")
    torch.set_num_threads(args.threads)
    edge = build_model(args.edge, role="edge")
    server = build_model(args.server, role="server")
    ds = datasets.load(args.data)
    started = time.monotonic()
    with torch.inference_mode():
        score, _, y, tok = photo_passes(edge, server, ds)
        n, num_patches = score.shape
        ranked = orders(score.double().numpy(), cells)
        full = float(server_correct(server.model, tok, torch.arange(num_patches).expand(n, -1), y).mean())
        gen = torch.Generator().manual_seed(args.seed)
        rows: list[dict[str, Any]] = []
        for f in fractions:
            k = max(1, round(f * num_patches))
            rnd = float(np.mean([server_correct(server.model, tok, torch.rand(n, num_patches, generator=gen)
                                                .argsort(1)[:, :k], y).mean() for _ in range(args.draws)]))
            row: dict[str, Any] = {"fraction": f, "k": k, "random": rnd, "orders": {}}
            for name, order in ranked.items():
                acc = float(server_correct(server.model, tok, torch.from_numpy(order[:, :k].copy()), y).mean())
                row["orders"][name] = {"accuracy": acc, "over_random_points": 100 * (acc - rnd)}
            rows.append(row)
            print(f"k = {k:3d} of {num_patches} ({f:.0%}): random {rnd:.2%}; over random, points: "
                  + ", ".join(f"{name} {o['over_random_points']:+.2f}" for name, o in row["orders"].items()))
    best = max(ranked, key=lambda name: min(r["orders"][name]["over_random_points"] for r in rows))
    print(f"server on full photos: {full:.2%} ({n} photos, {time.monotonic() - started:.0f} s); the order whose "
          f"smallest lead over random is largest: {best}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"data": args.data, "images": n, "num_patches": num_patches, "server_full": full,
                       "draws": args.draws, "rows": rows, "best": best}, fh, indent=1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PatchCastError as exc:  # an unknown model, a missing data file: said, not a traceback
        sys.exit(f"error: {exc.message}")
