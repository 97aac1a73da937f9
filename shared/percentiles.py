"""The project's one percentile helper: linear interpolation between closest ranks (numpy's default).

Used for every latency and service-time figure: the worker's metrics windows, the edge fleet
summary and the monitor's dashboard, so one p95 means the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def percentiles(values: Iterable[float], qs: Sequence[float]) -> list[float] | None:
    """The ``qs`` percentiles (each in 0..100) of ``values`` (any order); ``None`` when there are none."""
    arr = np.fromiter(values, dtype=np.float64)
    if arr.size == 0:
        return None
    if any(not 0.0 <= q <= 100.0 for q in qs):
        raise ValueError(f"percentiles must be in 0..100, got {list(qs)}")
    return [float(v) for v in np.percentile(arr, list(qs))]


def percentile(values: Iterable[float], q: float) -> float | None:
    """One percentile (``q`` in 0..100) of ``values``; ``None`` when there are none."""
    result = percentiles(values, (q,))
    return None if result is None else result[0]
