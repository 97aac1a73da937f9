"""Small pure helpers for the dashboard: sparklines, human-readable numbers (percentiles:
:mod:`shared.percentiles`)."""

from __future__ import annotations

from collections.abc import Sequence

SPARK_CHARS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None], width: int) -> str:
    """The last ``width`` values as block characters scaled to their own min..max; gaps as spaces."""
    tail = list(values)[-width:] if width > 0 else []
    present = [v for v in tail if v is not None]
    if not present:
        return " " * len(tail)
    lo, hi = min(present), max(present)
    span = hi - lo
    out = []
    for v in tail:
        if v is None:
            out.append(" ")
        elif span <= 0:
            out.append(SPARK_CHARS[0])
        else:
            out.append(SPARK_CHARS[min(len(SPARK_CHARS) - 1, int((v - lo) / span * len(SPARK_CHARS)))])
    return "".join(out)


def human_bytes(n: float | None, suffix: str = "B") -> str:
    if n is None:
        return "–"
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000 or unit == "G":
            return f"{n:.0f} {unit}{suffix}" if unit == "" else f"{n:.1f} {unit}{suffix}"
        n /= 1000.0
    return f"{n:.1f} G{suffix}"  # pragma: no cover - loop always returns


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100.0 * x:.{digits}f} %"


def ms(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.0f} ms" if x >= 10 else f"{x:.1f} ms"


def num(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def duration(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
