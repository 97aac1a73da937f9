"""The scaling decision on synthetic metric traces (pure: no processes, no broker, no clock)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import pytest

from patchcast.scaling.policy import Autoscaler, PolicyState, PoolObservation, WorkerLoad, decide
from shared.config import ScalerConfig

CFG = ScalerConfig(min_workers=1, max_workers=6, up_after_s=2.0, down_after_s=8.0,
                   up_cooldown_s=4.0, down_cooldown_s=15.0, max_step_up=2)


@dataclass
class FluidPool:
    """A fluid queue model of a worker pool: arrivals λ/s shared round-robin, μ/s per worker,
    new workers report after ``warmup_s``. Produces the observations a scaler would see each second."""

    mu: float = 10.0
    warmup_s: float = 3.0
    size: int = 1
    queue: list[float] = field(default_factory=lambda: [0.0])
    born: list[float] = field(default_factory=lambda: [-100.0])

    def resize(self, n: int, t: float) -> None:
        while self.size < n:
            self.size += 1
            self.queue.append(0.0)
            self.born.append(t)
        while self.size > n:  # drained workers hand nothing back in the model; drop the newest
            self.size -= 1
            self.queue.pop()
            self.born.pop()

    def step(self, t: float, lam: float, dt: float = 1.0) -> PoolObservation:
        ready = [i for i in range(self.size) if t - self.born[i] >= self.warmup_s]
        loads = []
        for i in ready:
            arrivals = lam / len(ready) * dt
            served = min(self.queue[i] + arrivals, self.mu * dt)
            busy = served / (self.mu * dt)
            self.queue[i] = self.queue[i] + arrivals - served
            oldest_ms = 1000.0 * self.queue[i] / self.mu if self.queue[i] > 0.5 else 0.0
            loads.append(WorkerLoad(f"w{i}", round(self.queue[i]), oldest_ms, busy, served / dt))
        return PoolObservation(t=t, size=self.size, starting=self.size - len(ready), loads=tuple(loads))


def run_trace(rates: list[float], cfg: ScalerConfig = CFG, pool: FluidPool | None = None):
    pool = pool or FluidPool()
    scaler = Autoscaler(cfg)
    sizes, backlog, decisions = [], [], []
    for t, lam in enumerate(rates):
        obs = pool.step(float(t), lam)
        d = scaler.observe(obs)
        decisions.append(d)
        if d.desired != pool.size:
            pool.resize(d.desired, float(t))
        sizes.append(pool.size)
        backlog.append(sum(pool.queue))
    return sizes, backlog, decisions


def test_load_step_x4_scales_up_and_drains_backlog():
    # 8/s fits one worker (μ=10); ×4 → 32/s needs 4 workers.
    rates = [8.0] * 10 + [32.0] * 60
    sizes, backlog, decisions = run_trace(rates)
    assert sizes[9] == 1, "steady load below capacity must not scale"
    assert max(sizes) >= 4, sizes
    assert max(sizes) <= CFG.max_workers
    peak = max(backlog)
    assert peak > 20  # the step did build a backlog …
    assert backlog[-1] < 2, backlog[-10:]  # … and the grown pool drained it
    ups = [d for d in decisions if d.direction == "up"]
    assert ups and all("overload" in d.reason for d in ups)
    # Scale-ups are separated by at least the up cooldown (and never while a worker is starting).
    up_times = [t for t, d in enumerate(decisions) if d.direction == "up"]
    assert all(b - a >= CFG.up_cooldown_s for a, b in itertools.pairwise(up_times))


def test_no_scale_up_before_hysteresis_window():
    # A 1-second burst whose backlog clears within up_after_s is absorbed without scaling.
    rates = [5.0] * 5 + [15.0] + [5.0] * 20
    sizes, _, _ = run_trace(rates)
    assert set(sizes) == {1}


def test_drain_scales_down_only_after_cooldown_and_window():
    rates = [32.0] * 40 + [2.0] * 80
    sizes, _, decisions = run_trace(rates)
    top = max(sizes)
    assert top >= 4
    first_down = next(t for t, d in enumerate(decisions) if d.direction == "down")
    last_change_before = max(t for t, d in enumerate(decisions[:first_down]) if d.direction != "hold")
    assert first_down >= 40 + CFG.down_after_s - 1
    assert first_down - last_change_before >= CFG.down_cooldown_s
    downs = [t for t, d in enumerate(decisions) if d.direction == "down"]
    assert all(b - a >= CFG.down_cooldown_s for a, b in itertools.pairwise(downs))
    assert sizes[-1] == CFG.min_workers, sizes[-20:]
    # One step at a time on the way down.
    assert all(abs(a - b) <= 1 for a, b in itertools.pairwise(sizes[40:]))


def test_flapping_load_is_suppressed():
    # Load alternating every 3 s between light and ×4 never holds a condition long enough in one
    # direction to flap: at most one scale-up and no scale-down.
    rates = ([5.0] * 3 + [40.0] * 1) * 30
    _, _, decisions = run_trace(rates)
    changes = [d.direction for d in decisions if d.direction != "hold"]
    assert changes.count("down") == 0 or changes.count("up") <= 2, changes
    # Count reversals (up then down or down then up): the hysteresis + cooldown keep them rare.
    reversals = sum(1 for a, b in itertools.pairwise(changes) if a != b)
    assert reversals <= 1, changes


def test_steady_borderline_load_does_not_oscillate():
    # Two workers at ~45 % busy each: one fewer would be at 90 % > busy_high, so it must not shrink.
    pool = FluidPool(size=2, queue=[0.0, 0.0], born=[-100.0, -100.0])
    sizes, _, _ = run_trace([9.0] * 120, pool=pool)
    assert set(sizes) == {2}


def test_bounds_enforced_without_hysteresis():
    obs = PoolObservation(t=0.0, size=0)
    d, st = decide(CFG, PolicyState(), obs)
    assert d.desired == CFG.min_workers and d.direction == "up"
    d, _ = decide(CFG, st, replace(obs, size=9))
    assert d.desired == CFG.max_workers and d.direction == "down"


def test_stale_metrics_ignored_and_no_metrics_holds():
    stale = WorkerLoad("w0", queue_depth=500, oldest_queued_ms=9000, busy_fraction=1.0, age_s=60.0)
    scaler = Autoscaler(CFG)
    for t in range(20):
        d = scaler.observe(PoolObservation(t=float(t), size=1, loads=(stale,)))
        assert d.direction == "hold"
    assert d.reason == "no metrics yet"


def test_step_proportional_to_pressure_and_capped():
    hot = tuple(WorkerLoad(f"w{i}", 80, 3000.0, 1.0) for i in range(2))
    scaler = Autoscaler(CFG)
    d = scaler.observe(PoolObservation(t=0.0, size=2, loads=hot))
    assert d.direction == "hold"  # hysteresis: the condition just started
    d = scaler.observe(PoolObservation(t=CFG.up_after_s, size=2, loads=hot))
    assert d.direction == "up" and d.desired == 2 + CFG.max_step_up


def test_no_scale_up_while_worker_starting():
    hot = (WorkerLoad("w0", 50, 2000.0, 1.0),)
    scaler = Autoscaler(CFG)
    for t in range(10):
        d = scaler.observe(PoolObservation(t=float(t), size=2, starting=1, loads=hot))
        assert d.direction == "hold"
    d = scaler.observe(PoolObservation(t=10.0, size=2, starting=0, loads=hot))
    assert d.direction == "up"


@pytest.mark.parametrize("busy", [0.0, 0.2])
def test_idle_pool_shrinks_to_min(busy):
    idle = tuple(WorkerLoad(f"w{i}", 0, 0.0, busy) for i in range(3))
    scaler = Autoscaler(CFG)
    sizes = []
    size = 3
    for t in range(100):
        d = scaler.observe(PoolObservation(t=float(t), size=size, loads=idle[:size]))
        size = d.desired
        sizes.append(size)
    assert sizes[-1] == 1
    assert math.isclose(sizes.count(3), CFG.down_after_s, abs_tol=1)


def test_backlog_waiting_in_the_broker_scales_up_when_arrival_lateness_counts():
    """The blind spot of queue metrics: a worker whose event loop falls behind keeps a short queue
    while requests wait in the broker. Its arrival lateness (device send → receipt) shows it."""
    behind = tuple(WorkerLoad(f"w{i}", 0, 5.0, 0.5, arrival_ms_p95=2500.0) for i in range(2))
    scaler = Autoscaler(CFG)
    scaler.observe(PoolObservation(t=0.0, size=2, loads=behind))
    d = scaler.observe(PoolObservation(t=CFG.up_after_s, size=2, loads=behind))
    assert d.direction == "up" and d.signals.arrival_ms_p95 == 2500.0
    blind = Autoscaler(replace(CFG, use_arrival_lateness=False))  # clocks not in sync: queue metrics only
    for t in range(10):
        d = blind.observe(PoolObservation(t=float(t), size=2, loads=behind))
        assert d.direction == "hold"
    # and a pool whose requests still arrive late does not shrink
    late_idle = tuple(WorkerLoad(f"w{i}", 0, 0.0, 0.0, arrival_ms_p95=300.0) for i in range(3))
    shrink = Autoscaler(CFG)
    for t in range(40):
        d = shrink.observe(PoolObservation(t=float(t), size=3, loads=late_idle))
        assert d.direction != "down"
