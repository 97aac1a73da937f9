"""The report of a ``patchcast eval`` run (``report.md``) and ``--publish``: the same report as a
generated section of a documentation page, between markers, with the figures copied next to it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from patchcast.eval.bytes import REFERENCE_JPEG_QUALITY
from patchcast.eval.frontier import thin_frontier
from patchcast.eval.grid import PAPER_ETA, PAPER_SUM_THRESHOLD
from patchcast.eval.tables import pct

FIGURES = (("fig8_tradeoff.png", "Accuracy vs communication cost with the Pareto frontier (paper Fig. 8)"),
           ("fig12_rules.png", "Selection rules (paper Fig. 12)"),
           ("fig11_scores.png", "Mean attention vs rollout (paper Fig. 11)"),
           ("fig13_gates.png", "Min-entropy vs Shannon entropy vs margin gate (paper Fig. 13)"),
           ("fig14_encoder.png", "Edge vs server as semantic encoder (paper Fig. 14)"),
           ("fig_bytes.png", "Accuracy vs measured bytes"))


def report_markdown(summary: dict[str, Any], table2: str, table3: str, *, img_prefix: str | None = "",
                    level: int = 1, title: str = "PatchCast evaluation") -> str:
    """The run's report. ``img_prefix`` is prepended to figure file names (None: no figures);
    ``level`` is the heading depth of the title, so the report can sit inside another document."""
    h = "#" * level
    acc = summary["acceptance"]
    e, s = summary["edge"], summary["server"]
    t = summary.get("timings_s", {})
    lines = [
        f"{h} {title}", "",
        f"- Command: `{summary['config'].get('command') or 'patchcast eval'}`",
        f"- Images: {summary['images']:,} ({summary['config']['data']}), "
        f"{summary['num_patches']} patches per image; {summary.get('precision', '')}, "
        f"{summary.get('threads', '?')} thread(s); model passes {summary.get('compute_s', 0):.0f} s "
        f"(when computed; this run {t.get('total_s', 0):.0f} s with the cache)",
        f"- Edge `{e['ref']}`: **{pct(e['accuracy'])}** ({e['gmacs']:.3f} GMACs/image); server "
        f"`{s['ref']}` on full images: **{pct(s['accuracy'])}** ({s['gmacs']:.3f} GMACs/image)",
    ]
    pp = summary["paper_point"]
    if pp:
        lines.append(f"- Paper setting (mean attention, δ_sum = {PAPER_SUM_THRESHOLD}, min-entropy "
                     f"η = {PAPER_ETA}): {pct(pp['accuracy'])} at comm cost {pp['comm_cost']:.3f} "
                     f"({100 * (1 - pp['comm_cost']):.0f} % less communication), "
                     f"{100 * pp['images_sent_frac']:.1f} % of images sent, "
                     f"bytes {pp['bytes_frac']:.3f} of full JPEG")
    for key, what in (("best_point", "Cheapest deployable point (any edge score, rule and gate)"),
                      ("best_point_paper_rule", "Cheapest with the paper's rule (δ_sum, min-entropy)"),
                      ("best_point_by_bytes", "Fewest bytes (any edge score, rule and gate)")):
        bp = summary[key]
        found = (f"{bp['description']}: {pct(bp['accuracy'])} at comm cost {bp['comm_cost']:.3f}, "
                 f"bytes {bp['bytes_frac']:.3f}" if bp else "none")
        lines.append(f"- {what} within {summary['max_loss_points']:g} point(s) of server-only "
                     f"(≥ {pct(summary['target_accuracy'])}): {found}")
    if summary.get("spread", 0) >= 2:
        c = summary["spread"]
        lines.append(f"- Order: every attention and rollout selection keeps its rule's count of patches spread over "
                     f"{c}×{c} cells of the grid, the best of each cell first (`--spread {c}`; the paper keeps the "
                     "highest-scoring); random selections match the counts")
    if summary.get("patch_pixels", "exact") != "exact":
        lines.append(f"- Patches: the server sees each selection's kept patches after the codec's round trip "
                     f"({summary['patch_pixels']}), as a worker decodes them; server-only is on the exact full images")
    b = summary.get("bytes")
    if b:
        lines.append(f"- Bytes: `{b['codec']}` codec {b['codec_params'] or '(defaults)'} on the actual "
                     f"selections of {b['sample']} images; reference = the same images as full-image "
                     f"table-less JPEG q{REFERENCE_JPEG_QUALITY}, mean {b['reference_mean_bytes']:.0f} B "
                     f"(as standalone JPEG files with headers: {b['jpeg_file_mean_bytes']:.0f} B)")
    lines += [
        "", f"{h}# Acceptance", "",
        f"- Method frontier (edge mean attention, any rule, min-entropy gate) at comm cost ≤ 0.5: "
        f"{pct(acc['frontier_accuracy_at_cost_0.5'])}, {acc['loss_at_cost_0.5_points']:.2f} points below "
        f"server-only → {'PASS' if acc['within_1_point_at_cost_0.5'] else 'MISS'} (≤ 1 point)",
        f"- Versus random patches (matched counts{_draws_note(summary)}), frontier against frontier: at the "
        f"{len(acc['random_frontier_costs'])} costs of the random frontier, method minus random is at "
        f"worst {acc['min_margin_over_random_frontier_points']:+.2f} points → "
        f"{'PASS' if acc['beats_random_frontier_everywhere'] else 'MISS'} (≥ 0 everywhere)",
        *_exact_lines(acc.get("exact_eta")),
        f"- Point by point (same selection rule and value, same gate and η, so the same images and the "
        f"same patch counts): method ≥ random at {acc['matched_points_method_not_worse']} of "
        f"{acc['matched_points']} points; method minus random: mean "
        f"{acc['matched_points_mean_margin_points']:+.2f} points, worst "
        f"{acc['matched_points_min_margin_points']:+.2f}",
    ]
    lines += _expert_lines(summary.get("experts"), h)
    geometry = summary.get("selection_geometry") or {}
    if geometry:
        lines += ["", f"{h}# Where attention looks", "",
                  "Top N/4 patches by each model's last-block CLS attention, against uniform random picks "
                  "(an attention sink shows as kept corners; an object as a central share above random).", "",
                  "| score | k | kept patches in the central half of the grid | images keeping both bottom "
                  "corners |", "|---|---|---|---|"]
        for name, geo in geometry.items():
            lines.append(f"| {name} | {geo['k']} | {pct(geo['central_share'])} (random "
                         f"{pct(geo['central_share_random'])}) | {pct(geo['bottom_corners'])} (random "
                         f"{pct(geo['bottom_corners_random'])}) |")
    if img_prefix is not None:
        lines += ["", f"{h}# Figures", ""]
        for name, caption in FIGURES:
            lines += [f"![{caption}]({img_prefix}{name})", "", f"*{caption}.*", ""]
    lines += [
        "", f"{h}# Expected patches per δ_sum (paper Table II)", "", table2,
        "", f"{h}# Images sent per η, min-entropy gate (paper Table III)", "", table3,
        "", f"{h}# Frontier (method)", "",
        "Every 0.05 of communication cost, the first frontier point at or above it "
        "(all points: `points.csv`, `summary.json`).", "",
        "| comm cost | accuracy | bytes | operating point |", "|---|---|---|---|",
    ]
    for p in thin_frontier(summary["frontier"], 0.05):
        lines.append(f"| {p['comm_cost']:.3f} | {pct(p['accuracy'])} | {p['bytes_frac']:.3f} | "
                     f"{p['description']} |")
    return "\n".join(lines) + "\n"


def _exact_lines(x: dict[str, Any] | None) -> list[str]:
    """The acceptance checks again with η at every observed value (summaries from before lack them)."""
    if not x:
        return []
    lines = [f"- With η at every observed uncertainty value (the exact curves the η grid samples): method "
             f"frontier at comm cost ≤ 0.5 {pct(x['frontier_accuracy_at_cost_0.5'])}, "
             f"{x['loss_at_cost_0.5_points']:.2f} points below server-only → "
             f"{'PASS' if x['within_1_point_at_cost_0.5'] else 'MISS'}"]
    if x["random_frontier_points"]:
        lines.append(f"  - against random, frontier against frontier: method at or above random at "
                     f"{x['random_frontier_points_beaten_or_tied']:,} of the random frontier's "
                     f"{x['random_frontier_points']:,} costs, worst "
                     f"{x['min_margin_over_random_frontier_points']:+.2f} points → "
                     f"{'PASS' if x['beats_random_frontier_everywhere'] else 'MISS'}"
                     + (f" (below it only at comm cost ≤ {max(x['costs_below_random']):.3f})"
                        if x.get("costs_below_random") else ""))
    boot = x.get("bootstrap")
    if boot:
        loss = boot["loss_at_cost_0.5"]
        lines += [
            f"  - sampling noise, a paired bootstrap over the test images ({boot['resamples']} resamples, "
            f"both frontiers and server-only recomputed on each): server-only minus the method's frontier "
            f"at comm cost ≤ 0.5 {loss['mean']:.2f} points, 95 % interval [{loss['lo']:.2f}, {loss['hi']:.2f}], "
            f"over 1 point in {100 * loss['p_over_1_point']:.0f} % of resamples; method minus random:", "",
            "  | comm cost | method − random, points | 95 % interval | resamples with method below |",
            "  |---|---|---|---|",
            *(f"  | {g['cost']:g} | {g['mean']:+.2f} | [{g['lo']:+.2f}, {g['hi']:+.2f}] | "
              f"{100 * g['p_below']:.0f} % |" for g in boot["method_minus_baseline"]),
            "",
        ]
    return lines


def _draws_note(summary: dict[str, Any]) -> str:
    n = int(summary.get("config", {}).get("random_draws", 1))
    return f"; accuracy averaged over {n} independent draws" if n > 1 else "; one draw"


def _expert_lines(x: dict[str, Any] | None, h: str) -> list[str]:
    if not x:
        return []
    lines = ["", f"{h}# Expert routing", "",
             "Each sent image goes to the specialist whose classes hold the most of the edge's top-5 probability "
             "mass (`shared.routing`), on the same δ_sum selections and min-entropy gate as the general server; "
             "with `min_share` > 0 only when that specialist holds at least that share of the mass, else to the "
             "general server. Accuracy: the paper's point (δ_sum "
             f"{PAPER_SUM_THRESHOLD}, η {PAPER_ETA}) and the δ_sum frontier at every η up to each comm cost.", ""]
    lines += [f"- `{m['ref']}`: classes {m['classes']}" for m in x["models"]]
    costs = x["costs"]
    lines += ["", "| routing | to experts | true class covered | paper point | "
              + " | ".join(f"cost ≤ {c:g}" for c in costs) + " |",
              "|---|---|---|---|" + "---|" * len(costs)]
    g = x["general"]
    lines.append("| general server only | 0 % | | " + pct(g["paper_point"]) + " | "
                 + " | ".join(pct(a) for a in g["frontier"]) + " |")
    for st in x["settings"]:
        diffs = [f"{pct(a)} ({100 * (a - b):+.2f})" for a, b in zip(st["frontier"], g["frontier"], strict=True)]
        pp, gp = st["paper_point"], g["paper_point"]
        paper = f"{pct(pp)} ({100 * (pp - gp):+.2f})" if pp is not None and gp is not None else "–"
        lines.append(f"| experts, min_share {st['min_share']:g} | {100 * (1 - st['general_share']):.1f} % | "
                     f"{100 * st['true_class_covered_when_routed']:.1f} % | {paper} | " + " | ".join(diffs) + " |")
    return lines


PUBLISH_BEGIN = "<!-- patchcast eval: generated section, rewritten by `patchcast eval --publish` -->"
PUBLISH_END = "<!-- patchcast eval: end of generated section -->"


def publish_markers(name: str = "") -> tuple[str, str]:
    """The comments around a generated section: one unnamed section, or one per ``--publish-name``."""
    if not name:
        return PUBLISH_BEGIN, PUBLISH_END
    return (f"<!-- patchcast eval {name}: generated section, rewritten by `patchcast eval --publish "
            f"--publish-name {name}` -->", f"<!-- patchcast eval {name}: end of generated section -->")


def publish(doc: Path, out_dir: Path, summary: dict[str, Any], table2: str, table3: str, name: str = "") -> None:
    """Copy the figures next to ``doc`` (``img/``, named ``NAME-fig….png`` for a named section) and
    rewrite only the generated section of ``doc`` (the one called ``name``), keeping the hand-written
    text and the other sections around it."""
    img = doc.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    prefix = f"{name}-" if name else ""
    for fig, _ in FIGURES:
        if (out_dir / fig).is_file():
            shutil.copyfile(out_dir / fig, img / f"{prefix}{fig}")
    begin, end = publish_markers(name)
    report = report_markdown(summary, table2, table3, img_prefix=f"img/{prefix}", level=2,
                             title=f"PatchCast evaluation: {name}" if name else "PatchCast evaluation")
    block = f"{begin}\n\n{report}\n{end}"
    text = doc.read_text() if doc.is_file() else ""
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text else "") + block + "\n"
    doc.write_text(text)
