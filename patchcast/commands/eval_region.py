"""``patchcast eval-region``: the region-retransmission mode evaluated offline (see :mod:`patchcast.eval.region`)."""

from __future__ import annotations

import argparse
import shlex
import sys

from shared.errors import ConfigError

DEFAULT_SIDES = "0.25,0.375,0.5,0.625"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval-region", help="evaluate server-driven region retransmission offline (glance, then a window)",
        description="Evaluate the region mode on a labelled dataset: each image is box-downsampled by s (the "
        "glance), the server classifies the upsampled glance and, when its min-entropy is at least η, asks for a "
        "full-resolution window where its own CLS attention sums highest, then fuses (image: the glance with the "
        "window in place, alone; image+probs: that averaged with the glance; probs: the window's patches alone, "
        "averaged with the glance). Every forward runs once per image; η is swept afterwards. Writes "
        "OUT/points.csv, OUT/report.md, OUT/summary.json and accuracy-vs-cost plots (pixels and measured bytes). "
        "The window side is a fraction of the patch grid side; s must divide the model's patch size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="cifar10/test.tar",
                   help="labelled images: ImageFolder tree, tar of one, or a folder with labels.csv "
                   "(relative paths resolve under $PATCHCAST_DATA)")
    p.add_argument("--server", default="zoo:cifar10-server", help="server model (zoo:NAME, timm:NAME, file:PATH)")
    p.add_argument("--pretrained", action="store_true", help="timm: the model loads its official weights")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate a fixed seeded spread of N images (not the first N: a sorted tar starts with "
                   "one class); all images when omitted")
    p.add_argument("--out", default="reports/region-eval", help="results folder")
    p.add_argument("--downscale", action="append", default=argparse.SUPPRESS, metavar="S[,S…]",
                   help="glance downscale factor(s), repeatable or comma-separated (e.g. 2,4); each must divide the "
                   "model's patch size (default: 2)")
    p.add_argument("--side", default=DEFAULT_SIDES, metavar="F[,F…]",
                   help="window side fractions of the grid side, comma-separated")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all free cores, 1 on a busy machine)")
    p.add_argument("--bytes-sample", type=int, default=256,
                   help="images whose glance and windows are actually encoded to measure bytes")
    p.add_argument("--codec", default="jpeg-mosaic", help="codec whose bytes are measured (patchcast codecs)")
    p.add_argument("--quality", type=int, default=90, help="the codec's quality (codec.quality)")
    p.add_argument("--through-codec", action="store_true",
                   help="the server classifies what the codec delivers (each image, glance and window encoded "
                   "and decoded, as in the live exchange) instead of the exact pixels")
    p.add_argument("--max-loss", type=float, default=1.0,
                   help="accuracy points below server-only the report's operating points may lose")
    p.add_argument("--budget", type=float, default=0.5,
                   help="pixel-cost budget of the report's 'best accuracy at cost ≤ budget' column")
    p.add_argument("--seed", type=int, default=0, help="seeds the --limit spread and the byte sample")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(handler=run)


def _numbers(values: list[str], kind: type, what: str) -> tuple:
    """Comma-separated and/or repeated option values as a tuple of ``kind``; ConfigError otherwise."""
    out = []
    for item in values:
        for part in item.split(","):
            if not part.strip():
                continue
            try:
                out.append(kind(part.strip()))
            except ValueError as exc:
                raise ConfigError(f"--{what} {part.strip()!r}: expected {'an integer' if kind is int else 'a number'}"
                                  ) from exc
    if not out:
        raise ConfigError(f"--{what}: no value given")
    return tuple(out)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from patchcast.eval import RegionEvalConfig, run_region_eval
    from patchcast.progress import phase_bars

    cfg = RegionEvalConfig(
        data=args.data, server=args.server, pretrained=args.pretrained, limit=args.limit, out=args.out,
        downscales=_numbers(getattr(args, "downscale", None) or ["2"], int, "downscale"),
        sides=_numbers([args.side], float, "side"),
        threads=args.threads, bytes_sample=args.bytes_sample, codec=args.codec, quality=args.quality,
        through_codec=args.through_codec, max_loss=args.max_loss, budget=args.budget,
        seed=args.seed, plots=not args.no_plots,
        command=shlex.join(["patchcast", *sys.argv[1:]]) if sys.argv[1:2] == ["eval-region"] else "")
    labels = {"passes": "server: full image, glance, windows", "bytes": "encoding glances and windows"}
    with phase_bars(labels) as on_progress:
        result = run_region_eval(cfg, on_progress)
    s = result.summary
    out = Console()
    out.print(f"images {s['images']:,}  server only {s['server']['accuracy'] * 100:.2f} %  "
              f"({s['timings_s']['total_s']:.0f} s, {s['threads']} threads)")
    for f, sc in s["scales"].items():
        g = sc["glance"]
        out.print(f"s = {f}: glance only {g['accuracy'] * 100:.2f} % at pixel cost {g['pixel_frac']:.4f} "
                  f"(bytes {g['bytes_frac']:.3f})")
    best = s["cheapest_within_loss"]
    if best:
        out.print(f"cheapest within {cfg.max_loss:g} pt: s = {best['downscale']}, side {best['side_fraction']:g}, "
                  f"{best['fusion']}, η = {best['eta']}: {best['accuracy'] * 100:.2f} % at pixel cost "
                  f"{best['pixel_frac']:.3f} (bytes {best['bytes_frac']:.3f}, {best['asked_frac'] * 100:.1f} % asked)")
    else:
        out.print(f"no operating point within {cfg.max_loss:g} pt of server-only")
    out.print(f"results in {cfg.out}/ (points.csv, report.md, summary.json, *.png)")
    return 0
