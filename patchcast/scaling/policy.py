"""The scaling decision: pure, synchronous, shared by every backend (subprocesses, compose).

:func:`decide` takes the previous :class:`PolicyState` and one :class:`PoolObservation` (the latest
metrics of each worker) and returns a :class:`Decision` and the next state. No clocks, no I/O: the
caller passes the time, so recorded or synthetic metric traces replay exactly in tests.

Signals, from the workers' metrics:

* backlog — mean queue depth per worker and the age of the oldest queued request (the latter is what
  end-to-end latency feels first);
* busy fraction — share of wall time a worker spends in model forwards.

Scale **up** when any signal is high for ``up_after_s`` (hysteresis) and ``up_cooldown_s`` has passed
since the last change, by a step proportional to how far over the threshold the pool is (at most
``max_step_up``); never while a new worker is still starting (it will absorb load once warm).
Scale **down** by one when the backlog is empty, the busy fraction is low *and* would stay under the
scale-up threshold with one worker fewer, for ``down_after_s``, and ``down_cooldown_s`` has passed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from shared.config import ScalerConfig

Direction = Literal["up", "down", "hold"]


@dataclass(frozen=True)
class WorkerLoad:
    """One worker's latest metrics, as the scaler sees them."""

    worker_id: str
    queue_depth: int
    oldest_queued_ms: float
    busy_fraction: float
    requests_per_s: float = 0.0
    age_s: float = 0.0  # seconds since these metrics arrived
    arrival_ms_p95: float = 0.0  # device send → worker receipt: backlog waiting in the broker


@dataclass(frozen=True)
class PoolObservation:
    t: float  # monotonic seconds
    size: int  # workers the backend runs (or was asked to run) now
    starting: int = 0  # of those, workers that have not reported metrics yet
    loads: tuple[WorkerLoad, ...] = ()


@dataclass(frozen=True)
class PoolSignals:
    """The aggregates a decision is based on (also exported as metrics)."""

    reporting: int
    queue_total: int
    queue_per_worker: float
    oldest_queued_ms: float
    busy_mean: float
    requests_per_s: float
    arrival_ms_p95: float = 0.0  # worst worker's; counts like queue age when cfg.use_arrival_lateness


@dataclass(frozen=True)
class Decision:
    desired: int
    direction: Direction
    reason: str
    signals: PoolSignals


@dataclass(frozen=True)
class PolicyState:
    last_change_t: float | None = None
    up_since: float | None = None
    down_since: float | None = None


def signals(cfg: ScalerConfig, loads: Iterable[WorkerLoad]) -> PoolSignals:
    fresh = [w for w in loads if w.age_s <= cfg.metrics_stale_s]
    n = len(fresh)
    queue_total = sum(max(0, w.queue_depth) for w in fresh)
    return PoolSignals(
        reporting=n,
        queue_total=queue_total,
        queue_per_worker=queue_total / n if n else 0.0,
        oldest_queued_ms=max((w.oldest_queued_ms for w in fresh), default=0.0),
        busy_mean=sum(min(1.0, max(0.0, w.busy_fraction)) for w in fresh) / n if n else 0.0,
        requests_per_s=sum(w.requests_per_s for w in fresh),
        arrival_ms_p95=max((w.arrival_ms_p95 for w in fresh), default=0.0),
    )


def _backlog_age_ms(cfg: ScalerConfig, s: PoolSignals) -> float:
    """How long requests wait before a model sees them: in a worker's queue, or (when the worker's
    event loop falls behind and its queue stays short) already in the broker."""
    return max(s.oldest_queued_ms, s.arrival_ms_p95 if cfg.use_arrival_lateness else 0.0)


def _pressure(cfg: ScalerConfig, s: PoolSignals) -> float:
    """How far over the scale-up thresholds the pool is (> 1: over)."""
    return max(s.queue_per_worker / cfg.queue_per_worker_high,
               _backlog_age_ms(cfg, s) / cfg.queue_age_high_ms,
               s.busy_mean / cfg.busy_high)


def _wants_down(cfg: ScalerConfig, s: PoolSignals, size: int) -> bool:
    if size <= 1 or s.reporting == 0:
        return False
    projected_busy = s.busy_mean * size / (size - 1)
    return (s.queue_per_worker <= cfg.queue_per_worker_low
            and _backlog_age_ms(cfg, s) < cfg.queue_age_high_ms / 2
            and s.busy_mean < cfg.busy_low
            and projected_busy < cfg.busy_high)


def decide(cfg: ScalerConfig, state: PolicyState, obs: PoolObservation) -> tuple[Decision, PolicyState]:
    s = signals(cfg, obs.loads)
    size, t = obs.size, obs.t

    def changed(desired: int, direction: Direction, reason: str) -> tuple[Decision, PolicyState]:
        return Decision(desired, direction, reason, s), PolicyState(last_change_t=t)

    def hold(reason: str, st: PolicyState) -> tuple[Decision, PolicyState]:
        return Decision(size, "hold", reason, s), st

    # Bounds first: they are not load decisions and need no hysteresis.
    if size < cfg.min_workers:
        return changed(cfg.min_workers, "up", f"below min_workers={cfg.min_workers}")
    if size > cfg.max_workers:
        return changed(cfg.max_workers, "down", f"above max_workers={cfg.max_workers}")

    since_change = math.inf if state.last_change_t is None else t - state.last_change_t
    pressure = _pressure(cfg, s)
    up = s.reporting > 0 and pressure > 1.0
    down = not up and _wants_down(cfg, s, size)
    st = replace(state,
                 up_since=(state.up_since if state.up_since is not None else t) if up else None,
                 down_since=(state.down_since if state.down_since is not None else t) if down else None)
    detail = (f"queue/worker {s.queue_per_worker:.1f}, oldest {s.oldest_queued_ms:.0f} ms, "
              f"busy {s.busy_mean:.2f}")
    if up:
        assert st.up_since is not None
        if size >= cfg.max_workers:
            return hold(f"at max_workers ({detail})", st)
        if obs.starting > 0:
            return hold(f"{obs.starting} worker(s) still starting ({detail})", st)
        if t - st.up_since < cfg.up_after_s:
            return hold(f"overload for {t - st.up_since:.1f}s < up_after_s ({detail})", st)
        if since_change < cfg.up_cooldown_s:
            return hold(f"up cooldown ({detail})", st)
        step = min(cfg.max_step_up, max(1, math.ceil(size * pressure) - size))
        return changed(min(cfg.max_workers, size + step), "up", f"overload: {detail}")
    if down:
        assert st.down_since is not None
        if size <= cfg.min_workers:
            return hold("idle at min_workers", st)
        if t - st.down_since < cfg.down_after_s:
            return hold(f"idle for {t - st.down_since:.1f}s < down_after_s ({detail})", st)
        if since_change < cfg.down_cooldown_s:
            return hold(f"down cooldown ({detail})", st)
        return changed(size - 1, "down", f"idle: {detail}")
    return hold(f"steady ({detail})" if s.reporting else "no metrics yet", st)


class Autoscaler:
    """Holds the policy state between observations (the only mutable part of the decision logic)."""

    def __init__(self, cfg: ScalerConfig) -> None:
        self.cfg = cfg
        self.state = PolicyState()
        self.last: Decision | None = None

    def observe(self, obs: PoolObservation) -> Decision:
        self.last, self.state = decide(self.cfg, self.state, obs)
        return self.last
