"""Snapshot → rich renderable. Pure: the same snapshot always renders the same text, so tests use a
fixed-width capture console. Laid out for an 80×24 terminal (one header line, a six-row figure grid,
the worker table, one broker line)."""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from patchcast.monitor.state import Snapshot, WorkerRow
from patchcast.monitor.stats import duration, human_bytes, ms, num, pct, sparkline

STATE_MARK = {"online": ("●", "green"), "stale": ("◐", "yellow"), "starting": ("◌", "cyan"),
              "offline": ("○", "red")}


def _header(s: Snapshot) -> Text:
    t = Text()
    t.append(f"{s.title}", style="bold")
    t.append(f"  up {duration(s.elapsed_s)}")
    t.append(f"  devices {s.devices_online}")
    t.append(f"  workers {s.workers_online}/{len(s.workers)}")
    t.append(f"  images {s.images_total}")
    if s.timeouts_total or s.errors_total:
        t.append(f"  timeouts {s.timeouts_total} errors {s.errors_total}", style="bold red")
    return t


def _figures(s: Snapshot, spark_width: int) -> Table:
    grid = Table.grid(padding=(0, 2), expand=False)
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)
    saving = s.bytes_saving
    jpeg = human_bytes(s.jpeg_bytes_per_s, "B/s")
    a = s.accuracy
    grid.add_row("requests/s", num(s.requests_per_s), "offload rate", pct(s.offload_rate))
    grid.add_row("patches sent", pct(s.patch_fraction), "edge accuracy", pct(a.edge))
    grid.add_row("sent", human_bytes(s.bytes_per_s, "B/s"), "collab accuracy", pct(a.collaborative))
    grid.add_row("full JPEG", jpeg if saving is None else f"{jpeg} ({'−' if saving >= 0 else '+'}"
                 f"{abs(saving) * 100:.0f} %)",
                 "server accuracy", pct(a.server))
    grid.add_row("latency p50", ms(s.latency_p50_ms), "p95 / p99",
                 f"{ms(s.latency_p95_ms)} / {ms(s.latency_p99_ms)}")
    grid.add_row("p95 trend", Text(sparkline(s.latency_history, spark_width), style="magenta"),
                 "labelled images", str(a.labelled))
    return grid


def short_id(ident: str, width: int = 14) -> str:
    """Ids usually differ at the end (host-PID): keep the head and the tail, elide the middle."""
    if len(ident) <= width:
        return ident
    tail = (width - 1) * 2 // 3
    return f"{ident[: width - 1 - tail]}…{ident[-tail:]}"


def _worker_table(rows: tuple[WorkerRow, ...], max_rows: int) -> RenderableType:
    if not rows:
        return Text.assemble(("workers", "bold"), ("  no workers seen yet", "dim"))
    table = Table(title="workers", title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                  padding=(0, 1), pad_edge=False, show_edge=False, expand=False)
    # With expert routing several pools serve: a pool column takes the place of "oldest" (the
    # queue depth stays), so the table keeps its width. One pool: the table as it always was.
    pools = len({r.model for r in rows if r.model}) > 1
    table.add_column("worker", no_wrap=True, max_width=14 if pools else 16, overflow="ellipsis")
    if pools:
        table.add_column("pool", no_wrap=True, max_width=8, overflow="ellipsis")
    headings = ("batch", "tok/b", "busy", "queue", *(() if pools else ("oldest",)), "rep/s", "p95", "err")
    for heading in headings:
        table.add_column(heading, justify="right", no_wrap=True)
    shown = rows if len(rows) <= max_rows else rows[: max_rows - 1]
    for r in shown:
        mark, colour = STATE_MARK.get(r.state, ("?", "white"))
        name = Text(f"{mark} ", style=colour)
        name.append(short_id(r.worker_id, 12 if pools else 14), style="" if r.state == "online" else "dim")
        queue = "–" if r.queue_depth is None else str(r.queue_depth)
        table.add_row(
            name, *([Text(r.model or "–", style="cyan")] if pools else []),
            num(r.batch_size), num(r.tokens_per_batch, 0), pct(r.busy_fraction, 0), queue,
            *(() if pools else (ms(r.oldest_queued_ms),)),
            num(r.replies_per_s), ms(r.service_p95_ms), Text(str(r.errors), style="red" if r.errors else ""))
    if len(shown) < len(rows):
        table.add_row(Text(f"… +{len(rows) - len(shown)} more", style="dim"))
    return table


def _broker_line(s: Snapshot, width: int) -> Text:
    b = s.broker
    parts = [f"mosquitto {b.version}" if b.version else "",
             f"up {duration(b.uptime_s)}" if b.uptime_s is not None else "",
             f"{'–' if b.clients is None else b.clients} clients",
             f"msg/s in {num(b.msgs_in_per_s, 0)} out {num(b.msgs_out_per_s, 0)}",
             human_bytes(b.bytes_in_per_s, "B/s") + " in" if b.bytes_in_per_s is not None else ""]
    parts = [p for p in parts if p]
    # Least important last: drop from the end until it fits on one line.
    while len(parts) > 1 and len("broker  " + "  ".join(parts)) > width:
        parts.pop()
    t = Text("broker ", style="bold")
    t.append("  ".join(parts))
    return t


def render(s: Snapshot, *, width: int = 80, max_worker_rows: int = 8) -> RenderableType:
    """The whole dashboard for one snapshot."""
    spark_width = max(8, min(len(s.latency_history) or 8, width - 60, 24))
    return Group(_header(s), Text(""), _figures(s, spark_width), Text(""),
                 _worker_table(s.workers, max_worker_rows), _broker_line(s, width))


def render_text(s: Snapshot, *, width: int = 100) -> str:
    """Plain text (no colour, no control codes) of :func:`render`, for ``--once`` and logs."""
    import io

    from rich.console import Console

    console = Console(width=width, file=io.StringIO(), color_system=None, force_terminal=False,
                      record=True, legacy_windows=False)
    console.print(render(s, width=width))
    return console.export_text(styles=False)
