"""The report of a ``patchcast eval-region`` run (``report.md``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from patchcast.eval.bytes import REFERENCE_JPEG_QUALITY
from patchcast.eval.tables import pct

if TYPE_CHECKING:
    from patchcast.eval.region import RegionEvalConfig


def _eta(x: Any) -> str:
    return "∞" if x == "inf" or (isinstance(x, float) and math.isinf(x)) else f"{x:g}"


def report_markdown(cfg: RegionEvalConfig, summary: dict[str, Any]) -> str:
    srv = summary["server"]
    lines = ["# Region retransmission: offline evaluation", "",
             f"{summary['images']:,} images of `{cfg.data}`, server `{cfg.server}`; bytes measured on "
             f"{summary['bytes_sample']} images with `{cfg.codec}` q{cfg.quality} ÷ the same images as full-image "
             f"JPEG q{REFERENCE_JPEG_QUALITY} payloads. Pixel cost: pixels sent ÷ full-image pixels (glance 1/s² "
             "for every image, + the window's share for the images asked). The server classified "
             + (f"every image, glance and window after a `{cfg.codec}` q{cfg.quality} round trip, as live."
                if cfg.through_codec else "the exact pixels (the codec's loss not applied)."), ""]
    if cfg.command:
        lines += [f"Command: `{cfg.command}` ({summary['timings_s']['total_s']:.0f} s, "
                  f"{summary['threads']} torch threads).", ""]
    lines += [f"- Server only (full image): **{pct(srv['accuracy'])}** (bytes {srv['bytes_frac']:.3f} through "
              f"`{cfg.codec}`)"]
    for s, sc in summary["scales"].items():
        g = sc["glance"]
        lines.append(f"- Glance only, s = {s}: **{pct(g['accuracy'])}** at pixel cost {g['pixel_frac']:.4f}, "
                     f"bytes {g['bytes_frac']:.3f} (mean glance min-entropy {sc['u_mean']:.2f} bits)")
    best = summary["cheapest_within_loss"]
    if best:
        lines.append(f"- Cheapest point within {cfg.max_loss:g} pt of server-only: s = {best['downscale']}, "
                     f"side {best['side_fraction']:g}, fusion `{best['fusion']}`, η = {_eta(best['eta'])}: "
                     f"{pct(best['accuracy'])}, {100 * best['asked_frac']:.1f} % asked, pixel cost "
                     f"{best['pixel_frac']:.3f}, bytes {best['bytes_frac']:.3f}")
    else:
        lines.append(f"- No operating point within {cfg.max_loss:g} pt of server-only.")
    for s, sc in summary["scales"].items():
        lines += ["", f"## Downscale s = {s}", "",
                  f"| fusion | side | window | always ask: accuracy (pixels, bytes) | best at pixel cost ≤ "
                  f"{cfg.budget:g}: accuracy (η, asked) | cheapest within {cfg.max_loss:g} pt of server-only: "
                  "η, accuracy, asked, pixels, bytes |",
                  "|---|---|---|---|---|---|"]
        for r in sc["rows"]:
            a, b, w = r["always_ask"], r["at_budget"], r["within_loss"]
            at = (f"{pct(b['accuracy'])} (η {_eta(b['eta'])}, {100 * b['asked_frac']:.1f} %)" if b else "–")
            wl = (f"η {_eta(w['eta'])}: {pct(w['accuracy'])}, {100 * w['asked_frac']:.1f} %, "
                  f"{w['pixel_frac']:.3f}, {w['bytes_frac']:.3f}" if w else "none")
            lines.append(f"| {r['fusion']} | {r['side_fraction']:g} | {r['window_side']}×{r['window_side']} "
                         f"({100 * r['window_fraction']:.1f} %) | {pct(a['accuracy'])} ({a['pixel_frac']:.3f}, "
                         f"{a['bytes_frac']:.3f}) | {at} | {wl} |")
        lines += ["", "Where the window goes (`image` fusion, every image asked): the server's attention against a "
                  "fixed window in the middle of the image.", "",
                  "| side | window | attention | centre |", "|---|---|---|---|"]
        for c in sc["window_choice"]:
            lines.append(f"| {c['side_fraction']:g} | {c['window_side']}×{c['window_side']} | "
                         f"{pct(c['attention'])} | {pct(c['centre'])} |")
    return "\n".join(lines) + "\n"
