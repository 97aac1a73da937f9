"""Can the edge gate better with more of its own compute? Two extensions of the min-entropy gate.

Both leave the patches, the server and the cost metric as they are (the eval's cached selections and
server passes, as ``scripts/frontier_losses.py`` reads them) and change only which images the edge
sends, and the label it keeps for the rest:

* **a flip-averaged edge**: the edge also classifies the mirrored image (a second forward on the
  device) and gates, and answers, on the mean of the two probability vectors;
* **a learned gate on the edge's features**: the logistic models of ``frontier_losses.py``'s learned
  gate ("sending helps" − "sending hurts", 2-fold cross-validated over seeded splits), fed the edge's
  pre-logit CLS features as well as its logits.

Each is scored as the eval scores its frontier (every η, every edge-attention rule, thresholds chosen on
the same images), at a comm-cost budget; the flip-averaged gate also with the server's top-up.

``--mirror-server RULE …`` (or ``all``: every cached rule, and then the top-up too, with that server on
both rounds) adds the same on the server's side, which costs no communication: the server also classifies
the mirrored photo (and, for each named rule, the mirrored selection: the same patches, mirrored, at
mirrored positions) and answers on the mean of the two probability vectors. Its one-round
frontier over those rules, with the plain and the flip-averaged edge, is set against *its own* accuracy
on whole photos (mirror-averaged too): server-side averaging raises both sides.

    python scripts/edge_gate_views.py reports/eval-imagenette --data imagenette2/val.tar \\
        --edge zoo:imagenette-edge

The edge's plain logits are recomputed and checked against the eval's cache first (same images, same
order), so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from frontier_losses import (
    FULL,
    Passes,
    auroc,
    best_gate,
    edge_uncertainty,
    find_cache,
    learned_gate,
    load,
    min_entropy,
    selection_logits,
    selection_masks,
    server_tops_up,
    top_up_held_out,
    top_up_pairs,
    top_up_rules,
)

from patchcast.eval.passes import server_on_masks
from patchcast.progress import phase_bars
from shared import datasets
from shared.errors import PatchCastError
from shared.models import build_model
from shared.subset import embed_all

CHECK_ATOL = 1e-3
"""The recomputed plain logits against the cached ones (same fp32 model, same pixels; batch sizes
may differ, so not bit-exact in general)."""


def mirror_masks(masks: np.ndarray, cols: int) -> np.ndarray:
    """Kept-patch masks (B, N) of the mirrored images: patch (r, c) becomes (r, cols − 1 − c)."""
    b, n = masks.shape
    return masks.reshape(b, n // cols, cols)[:, :, ::-1].reshape(b, n)


def model_views(data: str, edge_ref: str, batch: int, server_ref: str | None = None,
                masks: dict[str, np.ndarray] | None = None, max_tokens: int = 16384) -> dict[str, np.ndarray]:
    """One pass over the photos (each decoded and cropped once, the edge's crop, as the eval's): the edge's
    logits on each photo (``plain``) and on its mirror image (``flip``), its pre-logit CLS features
    (``features``); with ``server_ref``, the server's logits on each whole photo (``server_plain``), on its
    mirror image (``server_mirrored``) and on each rule's mirrored selection (``masks``' rules)."""
    ds = datasets.load(data)
    edge = build_model(edge_ref, role="edge")
    model, pre = edge.model.eval(), edge.preprocess
    server = None if server_ref is None else build_model(server_ref, role="server")
    if server is not None:
        server.model.eval()
    rules = dict(masks or {}) if server is not None else {}
    keys = ["plain", "flip", "features"] + (["server_plain", "server_mirrored", *rules] if server else [])
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    title = "edge, plain and mirrored" + ("; server, mirrored photos and selections" if server else "")
    with torch.inference_mode(), phase_bars({"views": title}) as report:
        for s in range(0, len(ds), batch):
            pixels, _ = datasets.to_tensor_batch(ds.samples[s:s + batch], pre)
            x = datasets.normalize(pixels, pre)
            tokens = model.forward_features(x)
            parts["plain"].append(model.forward_head(tokens).float().numpy())
            parts["features"].append(model.forward_head(tokens, pre_logits=True).float().numpy())
            parts["flip"].append(model(torch.flip(x, dims=[3])).float().numpy())
            if server is not None:
                sm = server.model
                parts["server_plain"].append(sm(datasets.normalize(pixels, server.preprocess)).float().numpy())
                # (B, H, W, 3): W is the mirror's axis
                mirrored = datasets.normalize(torch.flip(pixels, dims=[2]), server.preprocess)
                parts["server_mirrored"].append(sm(mirrored).float().numpy())
                patch_tokens = embed_all(sm, mirrored)
                cols = int(sm.patch_embed.grid_size[1])
                for rule, m in rules.items():
                    parts[rule].append(server_on_masks(sm, patch_tokens, mirror_masks(m[s:s + batch], cols),
                                                        max_tokens, False))
            report("views", min(s + batch, len(ds)), len(ds), "")
    return {k: np.concatenate(v) for k, v in parts.items()}


def with_edge(passes: Passes, logits: np.ndarray) -> Passes:
    """``passes`` with another edge answer (its logits or log-probabilities) on every image."""
    return replace(passes, edge_logits=logits, edge_ok=logits.argmax(1) == passes.labels)


def flip_averaged(plain: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """log of the mean of the two softmax vectors."""
    probs = torch.softmax(torch.from_numpy(plain), 1) + torch.softmax(torch.from_numpy(flip), 1)
    return torch.log(probs / 2).numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_dir", type=Path, help="a patchcast eval --out folder, its cache/ or one cache folder")
    ap.add_argument("--data", default="imagenette2/val.tar", help="the images that eval ran on")
    ap.add_argument("--edge", default="zoo:imagenette-edge", help="the edge model that eval ran")
    ap.add_argument("--budget", type=float, default=0.35, help="communication cost budget (default 0.35)")
    ap.add_argument("--splits", type=int, default=5, help="seeded 2-fold splits of the learned gate")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16384, help="server tokens per padded group (--mirror-server)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--server", default="zoo:imagenette-server", help="the server model that eval ran")
    ap.add_argument("--mirror-server", nargs="+", metavar="RULE", default=[],
                    help="also average the server over the mirrored photo, on whole photos and on these cached "
                    "rules' selections (e.g. sum_threshold-0.97 topk-75 topk-50; one server pass per rule; "
                    "'all': every cached rule, and the top-up with that server too)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if not 0.0 < args.budget <= 1.0 or args.splits < 1 or args.batch < 1 or args.threads < 1:
        ap.error("--budget must be in (0, 1]; --splits, --batch and --threads ≥ 1")
    torch.set_num_threads(args.threads)
    cache = find_cache(args.eval_dir)
    passes = load(cache)
    masks: dict[str, np.ndarray] = {}
    if args.mirror_server:  # refuse a rule the cache lacks before any model runs
        selected = selection_logits(cache)
        if args.mirror_server == ["all"]:
            args.mirror_server = sorted(r for r in selected if r in passes.selections)
        missing = [r for r in args.mirror_server if r not in passes.selections or r not in selected]
        if missing:
            raise SystemExit(f"--mirror-server: no cached selection {missing} (cached: {sorted(passes.selections)})")
        masks = {rule: selection_masks(cache, rule, passes.num_patches) for rule in args.mirror_server}
    views = model_views(args.data, args.edge, args.batch, args.server if masks else None, masks, args.max_tokens)
    views["flip_averaged"] = flip_averaged(views["plain"], views["flip"])
    if views["plain"].shape != passes.edge_logits.shape:
        raise SystemExit(f"{args.data} gives {len(views['plain'])} images, the cache {len(passes.labels)}")
    drift = float(np.abs(views["plain"] - passes.edge_logits).max())
    if drift > CHECK_ATOL:
        raise SystemExit(f"the edge's logits differ from the cache's by {drift:.2e}: not the eval's edge or data")
    server = float(passes.server_ok.mean())

    def pts(acc: float) -> str:
        return f"{acc * 100:.2f} % ({(acc - server) * 100:+.2f} points)"

    figures: dict[str, Any] = {"images": len(passes.labels), "budget": args.budget, "server_accuracy": server,
                               "check_max_abs_logit_difference": drift}
    print(f"{len(passes.labels):,} images, server on whole images {server * 100:.2f} %, budget comm cost ≤ "
          f"{args.budget} (recomputed edge logits within {drift:.1e} of the cache)")
    rules = top_up_rules(cache, passes)
    for name, variant in (("plain", passes), ("flip_averaged", with_edge(passes, views["flip_averaged"]))):
        point = best_gate(variant, "min_entropy", args.budget)
        errors = auroc(edge_uncertainty(variant, "min_entropy").astype(np.float64), ~variant.edge_ok)
        top_up = server_tops_up(rules, variant, args.budget, top_up_pairs(rules))
        held = top_up_held_out(rules, variant, args.budget, splits=args.splits)
        medians = {k: float(np.median([loss for loss, _ in v])) for k, v in held.items()}
        figures[name] = {"edge_accuracy": float(variant.edge_ok.mean()), "one_round": asdict(point),
                         "auroc_edge_errors": errors, "top_up": asdict(top_up), "held_out": held,
                         "held_out_median_points": medians}
        print(f"  {name}: edge {variant.edge_ok.mean() * 100:.2f} %, min-entropy AUROC of its errors {errors:.3f}\n"
              f"    one round, every η: {pts(point.accuracy)} at cost {point.cost:.3f}, {point.sent:.1%} sent, "
              f"{point.rule}; held out (2-fold, {args.splits} splits) median {medians['one_round']:+.2f} points\n"
              f"    with the top-up: {pts(top_up.accuracy)} at cost {top_up.cost:.3f}, {top_up.first} → "
              f"{top_up.second}; held out median {medians['top_up']:+.2f} points")
    logp = torch.log_softmax(torch.from_numpy(passes.edge_logits), 1).numpy()
    features = np.concatenate([views["features"], -np.sort(-logp, axis=1)], axis=1)
    point, per_split = learned_gate(passes, args.budget, splits=args.splits, features=features)
    figures["learned_gate_on_features"] = {**asdict(point), "splits": per_split}
    print(f"  learned gate on the edge's {views['features'].shape[1]} CLS features + sorted log-probabilities "
          f"(2-fold, median of {args.splits} splits): {pts(point.accuracy)} at cost {point.cost:.3f}, {point.rule} "
          f"(splits: {', '.join(f'{(a - server) * 100:+.2f}' for a in sorted(per_split))})")
    if args.mirror_server:
        figures["mirrored_server"] = mirrored_server(args, cache, passes, views)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def mirrored_server(args: argparse.Namespace, cache: Path, passes: Passes,
                    views: dict[str, np.ndarray]) -> dict[str, Any]:
    """The one-round frontier over ``args.mirror_server``'s rules with the server plain and mirror-averaged,
    the edge plain and flip-averaged; each against its own server's accuracy on whole photos."""
    selected = selection_logits(cache)
    with np.load(cache / "full.npz") as full:
        cached_whole = full["server_logits"].astype(np.float32)
    drift = float(np.abs(views["server_plain"] - cached_whole).max())
    if drift > CHECK_ATOL:
        raise SystemExit(f"the server's logits differ from the cache's by {drift:.2e}: not the eval's server or data")
    labels = passes.labels
    servers = {
        "plain": (passes.server_ok, {r: passes.selections[r] for r in args.mirror_server}),
        "mirror_averaged": (flip_averaged(cached_whole, views["server_mirrored"]).argmax(1) == labels,
                            {r: (flip_averaged(selected[r].astype(np.float32), views[r]).argmax(1) == labels,
                                 passes.selections[r][1]) for r in args.mirror_server})}
    edges = {"plain": passes.edge_logits, "flip_averaged": views["flip_averaged"]}
    out: dict[str, Any] = {"rules": args.mirror_server, "check_max_abs_logit_difference": drift}
    print(f"  the server averaged over the mirrored photo too (rules {', '.join(args.mirror_server)}; "
          f"recomputed server logits within {drift:.1e} of the cache):")
    for server_name, (server_ok, selections) in servers.items():
        for edge_name, logits in edges.items():
            variant = replace(with_edge(passes, logits), server_ok=server_ok, selections=selections)
            point = best_gate(variant, "min_entropy", args.budget)
            own = float(server_ok.mean())
            out[f"{server_name}_server_{edge_name}_edge"] = {**asdict(point), "server_accuracy": own}
            print(f"    {server_name} server ({own * 100:.2f} % on whole photos), {edge_name} edge: "
                  f"{point.accuracy * 100:.2f} % ({(point.accuracy - own) * 100:+.2f} points against that server) "
                  f"at cost {point.cost:.3f}, {point.rule}")
    if set(args.mirror_server) >= set(selected):  # every cached rule mirrored: the top-up can use that server
        out["top_up"] = mirrored_top_up(args, cache, passes, views, cached_whole, selected, edges)
    return out


def mirrored_top_up(args: argparse.Namespace, cache: Path, passes: Passes, views: dict[str, np.ndarray],
                    cached_whole: np.ndarray, selected: dict[str, np.ndarray],
                    edges: dict[str, np.ndarray]) -> dict[str, Any]:
    """The top-up with the mirror-averaged server on both rounds (its answer and its own min-entropy), the
    edge plain and flip-averaged, in-sample and held out; against that server's accuracy on whole photos."""
    plain = top_up_rules(cache, passes)
    mirrored: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for rule, (masks, _, _) in plain.items():
        logits = (flip_averaged(cached_whole, views["server_mirrored"]) if rule == FULL
                  else flip_averaged(selected[rule].astype(np.float32), views[rule]))
        mirrored[rule] = (masks, logits.argmax(1) == passes.labels, min_entropy(logits))
    server_ok = mirrored[FULL][1]
    own = float(server_ok.mean())
    pairs = top_up_pairs(mirrored)
    out: dict[str, Any] = {"server_accuracy": own}
    print(f"  the top-up with the mirror-averaged server ({own * 100:.2f} % on whole photos; "
          f"{len(pairs)} pairs of rules):")
    fixed_rule = "sum_threshold-0.97" if "sum_threshold-0.97" in mirrored else None  # the paper's rule
    for edge_name, logits in edges.items():
        variant = replace(with_edge(passes, logits), server_ok=server_ok)
        point = server_tops_up(mirrored, variant, args.budget, pairs)
        held = top_up_held_out(mirrored, variant, args.budget, splits=args.splits)
        fixed = top_up_held_out(mirrored, variant, args.budget, splits=args.splits, pair=(point.first, point.second),
                                rule=fixed_rule)
        medians = {f"{k}{suffix}": float(np.median([loss for loss, _ in v]))
                   for suffix, h in (("", held), ("_pair_fixed", fixed)) for k, v in h.items()}
        out[f"{edge_name}_edge"] = {**asdict(point), "held_out": held, "held_out_pair_fixed": fixed,
                                    "held_out_median_points": medians}
        print(f"    {edge_name} edge: {point.accuracy * 100:.2f} % ({(point.accuracy - own) * 100:+.2f} points) "
              f"at cost {point.cost:.3f}, {point.sent:.1%} sent with {point.first}, {point.asked:.1%} topped up "
              f"to {point.second}; held out (2-fold, {args.splits} splits) median {medians['top_up']:+.2f} "
              f"(one round {medians['one_round']:+.2f}); the pair fixed {medians['top_up_pair_fixed']:+.2f} "
              f"(one round, {fixed_rule or 'any rule'}, {medians['one_round_pair_fixed']:+.2f})")
    return out


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PatchCastError as exc:  # an unknown model or codec, a missing data file: said, not a traceback
        sys.exit(f"error: {exc.message}")
