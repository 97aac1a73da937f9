"""Prometheus text exposition (format 0.0.4): :class:`Family` values and :func:`render`.

Pure and synchronous; the asyncio HTTP endpoint that serves it is :mod:`shared.metrics_http`.
No client library needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MetricType = Literal["gauge", "counter", "summary", "untyped"]


@dataclass(frozen=True)
class Family:
    name: str
    help: str
    type: MetricType = "gauge"
    samples: tuple[tuple[Mapping[str, str], float], ...] = field(default_factory=tuple)

    def with_sample(self, value: float, **labels: str) -> Family:
        return Family(self.name, self.help, self.type, (*self.samples, (labels, value)))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def process_families() -> list[Family]:
    """The client libraries' standard process metrics this process can report: resident memory (Linux
    ``/proc``) and CPU seconds. A worker's memory is worth watching: see ``shape_buckets`` in
    ``docs/benchmarks.md`` for how a CPU worker's kernel cache once grew it by gigabytes."""
    import os
    import resource

    families: list[Family] = []
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        families.append(Family("process_resident_memory_bytes", "resident memory size in bytes")
                        .with_sample(pages * os.sysconf("SC_PAGE_SIZE")))
    except (OSError, ValueError, IndexError):  # not Linux: leave the family out rather than guess
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF)
    families.append(Family("process_cpu_seconds_total", "user and system CPU time spent in seconds", "counter")
                    .with_sample(round(usage.ru_utime + usage.ru_stime, 6)))
    return families


def render(families: Iterable[Family]) -> str:
    lines: list[str] = []
    for fam in families:
        lines.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.type}")
        for labels, value in fam.samples:
            if labels:
                inner = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in sorted(labels.items()))
                lines.append(f"{fam.name}{{{inner}}} {_value(value)}")
            else:
                lines.append(f"{fam.name} {_value(value)}")
    return "\n".join(lines) + "\n"
