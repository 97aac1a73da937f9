"""``patchcast eval``: accuracy / communication trade-off curves offline (see :mod:`patchcast.eval.run`)."""

from __future__ import annotations

import argparse
import shlex
import sys

from shared.errors import ConfigError
from shared.precision import PRECISION_SETTINGS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="sweep selection rules, scores, gates and thresholds offline; CSV, plots, tables",
        description="Run the edge and the server model once over a labelled dataset (cached), then sweep "
        "selection rule (top-k, threshold δ, sum-threshold δ_sum) × score (mean attention, rollout, server "
        "attention, random) × gate (min-entropy, Shannon, margin) × threshold η. Writes OUT/points.csv, "
        "plots (paper Figs. 8, 11–14), Tables II–III and OUT/report.md with the cheapest point within "
        "--max-loss of server-only accuracy. ImageNet with DeiT: --edge timm:deit_tiny_patch16_224 "
        "--server timm:deit_base_patch16_224 --pretrained --data /path/to/imagenet/val",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="cifar10/test.tar",
                   help="labelled images: ImageFolder tree, tar of one, or a folder with labels.csv "
                   "(relative paths resolve under $PATCHCAST_DATA)")
    p.add_argument("--edge", default="zoo:cifar10-edge", help="edge model (zoo:NAME, timm:NAME, file:PATH)")
    p.add_argument("--server", default="zoo:cifar10-server",
                   help="server model (zoo:NAME, timm:NAME, file:PATH)")
    p.add_argument("--pretrained", action="store_true", help="timm: models load their official weights")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate a fixed seeded spread of N images (not the first N: a sorted tar starts "
                   "with one class)")
    p.add_argument("--out", default="reports/eval", help="results folder")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: OUT/cache)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--sweep", choices=("full", "quick"), default="full",
                   help="quick: 2–3 values per rule and a coarse η grid (smoke tests)")
    p.add_argument("--no-rollout", action="store_true", help="skip attention rollout scores")
    p.add_argument("--no-server-encoder", action="store_true",
                   help="skip the server-attention selections (Fig. 14)")
    p.add_argument("--precision", choices=PRECISION_SETTINGS, default="fp32",
                   help="model arithmetic; auto = bf16 autocast where a short probe measures it "
                   "≥ 1.25× faster than fp32 on this CPU")
    p.add_argument("--batch-size", type=int, default=64, help="images per full-image forward")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="padded tokens per server forward on selected patches (small forwards are fastest "
                   "on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all free cores, 1 on a busy machine)")
    p.add_argument("--codec", default="jpeg-mosaic",
                   help="patch codec whose bytes are measured (see shared.codecs; default: the service's)")
    p.add_argument("--codec-param", action="append", default=[], metavar="KEY=INT",
                   help="codec parameter, repeatable (e.g. q=90); codec defaults otherwise")
    p.add_argument("--through-codec", action="store_true",
                   help="the server sees every selection's kept patches after the codec's round trip (--codec, "
                   "--codec-param: encoded, then decoded, as a worker receives them) instead of the exact pixels; "
                   "server-only accuracy stays that of the exact full images. Costs one encode, decode and "
                   "patch embedding per image and selection")
    p.add_argument("--spread", type=int, default=0, metavar="C",
                   help="which patches each attention/rollout selection keeps: 0, the highest-scoring (the paper's); "
                   "C ≥ 2, the rule's count spread over C×C cells of the grid, the best of each cell first "
                   "(selection.spread in the service)")
    p.add_argument("--bytes-sample", type=int, default=256,
                   help="images whose selections are actually encoded to measure bytes")
    p.add_argument("--random-draws", type=int, default=1,
                   help="independent draws of the random-patch baseline; its accuracy is their mean (a "
                   "single draw's frontier is biased upwards by lucky draws). Each costs one server pass "
                   "per selection")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N",
                   help="image resamples for the confidence intervals of the acceptance checks (paired "
                   "bootstrap; 0 = none; ~0.1 s each on 10,000 images)")
    p.add_argument("--expert", action="append", default=[], metavar="MODEL",
                   help="a specialist server (patchcast train --classes), repeatable: also evaluate expert routing "
                   "on the δ_sum selections (each sent image to the specialist holding most of the edge's top-5 "
                   "mass, the general server where none does)")
    p.add_argument("--expert-min-share", type=float, default=0.0, metavar="S",
                   help="routing.min_share for the expert-routing rows of points.csv (the report compares several)")
    p.add_argument("--max-loss", type=float, default=1.0,
                   help="accuracy points below server-only the recommended operating point may lose")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the --limit spread, random patches and byte sample")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--publish", metavar="FILE.md", default=None,
                   help="also copy the figures to FILE's img/ folder and rewrite the generated section of "
                   "FILE (e.g. docs/results.md), keeping its hand-written text")
    p.add_argument("--publish-name", default="", metavar="NAME",
                   help="with --publish: rewrite the generated section called NAME (figures img/NAME-*.png), so "
                   "one page holds several datasets' sections (default: the unnamed one)")
    p.set_defaults(handler=run)


def _codec_params(items: list[str]) -> tuple[tuple[str, int], ...]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--codec-param {item!r}: expected KEY=INT")
        try:
            out.append((key.strip(), int(value)))
        except ValueError as exc:
            raise ConfigError(f"--codec-param {item!r}: value must be an integer") from exc
    return tuple(out)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from patchcast.eval import EvalConfig, run_eval
    from patchcast.progress import phase_bars
    from shared.heap import retain_freed_memory

    # As the worker does: freed activations stay mapped (`patchcast eval --limit 500 --no-rollout
    # --no-server-encoder` ran 1.05× faster on an AMX Xeon, two pairs of runs).
    retain_freed_memory()
    cfg = EvalConfig(
        data=args.data, edge=args.edge, server=args.server, pretrained=args.pretrained, limit=args.limit,
        out=args.out, cache_dir=args.cache_dir, use_cache=not args.no_cache, sweep=args.sweep,
        rollout=not args.no_rollout, server_encoder=not args.no_server_encoder, precision=args.precision,
        batch_size=args.batch_size, max_tokens=args.max_tokens, threads=args.threads, codec=args.codec,
        codec_params=_codec_params(args.codec_param), through_codec=args.through_codec,
        spread=args.spread,
        bytes_sample=args.bytes_sample, max_loss=args.max_loss,
        random_draws=args.random_draws, bootstrap=args.bootstrap, experts=tuple(args.expert),
        expert_min_share=args.expert_min_share,
        seed=args.seed, plots=not args.no_plots, publish=args.publish, publish_name=args.publish_name,
        command=shlex.join(["patchcast", *sys.argv[1:]]) if sys.argv[1:2] == ["eval"] else "")
    labels = {"full": "edge + server, full images", "subsets": "server on selected patches",
              "bytes": "encoding selections", "experts": "specialists on selected patches"}
    with phase_bars(labels) as on_progress:
        result = run_eval(cfg, on_progress)
    s = result.summary
    out = Console()
    acc = s["acceptance"]
    out.print(f"images {s['images']:,}  edge {s['edge']['accuracy'] * 100:.2f} %  "
              f"server {s['server']['accuracy'] * 100:.2f} %  ({s['timings_s']['total_s']:.0f} s)")
    if s["paper_point"]:
        pp = s["paper_point"]
        out.print(f"δ_sum 0.97, η 0.8: {pp['accuracy'] * 100:.2f} % at comm cost {pp['comm_cost']:.3f}")
    bp = s["best_point"]
    if bp:
        out.print(f"cheapest within {args.max_loss:g} pt: {bp['description']}: "
                  f"{bp['accuracy'] * 100:.2f} % at comm cost {bp['comm_cost']:.3f} "
                  f"(bytes {bp['bytes_frac']:.3f})")
    else:
        out.print(f"no operating point within {args.max_loss:g} pt of server-only")
    out.print(f"frontier at cost ≤ 0.5: {acc['frontier_accuracy_at_cost_0.5'] * 100:.2f} % on the η grid, "
              f"{acc['exact_eta']['frontier_accuracy_at_cost_0.5'] * 100:.2f} % at every η  "
              f"beats random everywhere: {acc['beats_random_frontier_everywhere']} on the grid, "
              f"{acc['exact_eta']['beats_random_frontier_everywhere']} at every η")
    out.print(f"results in {cfg.out}/ (points.csv, report.md, tables.md, *.png)")
    return 0
