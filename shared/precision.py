"""Which arithmetic a CPU should run the models in: bf16 or fp32, decided by measuring.

CPU flags are not enough. AMX-BF16 (Intel Sapphire Rapids and later) makes bf16 matrix products
several times faster than fp32, and AVX512-BF16 on some CPUs (AMD Zen 4) still gains 1.4×; but on
an Intel Xeon with AVX512-BF16 and no AMX the same bf16 products ran at 0.6× fp32 (the
project's worker benchmark: bf16 `torch.matmul` peak 139 GFLOP/s against 228 GFLOP/s fp32). So
``auto`` times one ViT-MLP-shaped product in both precisions (about 0.1–0.3 s, once per process)
and takes bf16 only where it is clearly faster: bf16 moves logits slightly, so it has to pay.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Literal

Precision = Literal["bf16", "fp32"]
"""The arithmetic models run in."""
PrecisionSetting = Literal["auto", "bf16", "fp32"]
"""What a configuration asks for: a precision, or ``auto`` (decided by :func:`resolve`)."""
PRECISION_SETTINGS: tuple[PrecisionSetting, ...] = ("auto", "bf16", "fp32")

# bf16 must be at least this much faster than fp32 for ``auto`` to take it.
MIN_BF16_SPEEDUP = 1.25
# A ViT-Base MLP product (768 → 3072) over 256 tokens: 1.2 GFLOP, 5–30 ms on current CPUs.
PROBE_SHAPE = (256, 768, 3072)
PROBE_REPEATS = 3


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_flags() -> dict[str, bool]:
    flags = cpu_flags()
    return {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "amx_tile": "amx_tile" in flags}


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 (without either, bf16 is emulated and always slower than fp32)."""
    flags = bf16_flags()
    return flags["avx512_bf16"] or flags["amx_bf16"]


@dataclass(frozen=True)
class Bf16Probe:
    """Best-of-N seconds of the probe product in each precision."""

    fp32_s: float
    bf16_s: float

    def __post_init__(self) -> None:
        if not (self.fp32_s > 0 and self.bf16_s > 0):
            raise ValueError("probe times must be positive")

    @property
    def speedup(self) -> float:
        """How many times faster bf16 ran than fp32 (< 1: slower)."""
        return self.fp32_s / self.bf16_s


def decide(native_bf16: bool, probe: Bf16Probe | None) -> Precision:
    """The ``auto`` rule: bf16 only with native bf16 *and* a measured speedup of MIN_BF16_SPEEDUP."""
    if not native_bf16 or probe is None:
        return "fp32"
    return "bf16" if probe.speedup >= MIN_BF16_SPEEDUP else "fp32"


def measure_bf16_speedup(shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = PROBE_REPEATS) -> Bf16Probe:
    """Time ``F.linear`` (tokens × in → out) in fp32 and in bf16, interleaved, best of ``repeats``."""
    import torch
    import torch.nn.functional as F

    rows, d_in, d_out = shape
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(rows, d_in, generator=gen)
    w32 = torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5
    x16, w16 = x32.to(torch.bfloat16), w32.to(torch.bfloat16)
    best = {"fp32": float("inf"), "bf16": float("inf")}
    with torch.inference_mode():
        F.linear(x32, w32)  # warm-up: kernel selection, oneDNN primitive creation
        F.linear(x16, w16)
        for _ in range(repeats):
            for name, (x, w) in (("fp32", (x32, w32)), ("bf16", (x16, w16))):
                t0 = time.perf_counter()
                F.linear(x, w)
                best[name] = min(best[name], time.perf_counter() - t0)
    return Bf16Probe(fp32_s=max(best["fp32"], 1e-9), bf16_s=max(best["bf16"], 1e-9))


@functools.cache
def probe_once() -> Bf16Probe | None:
    """The probe, measured once per process; None where bf16 is emulated (no point timing it)."""
    return measure_bf16_speedup() if cpu_has_native_bf16() else None


def resolve(setting: str, device: str = "cpu") -> Precision:
    """The one resolver of a precision setting, for every model runner (worker, eval, training).

    ``bf16`` / ``fp32`` as given. ``auto`` on a CPU by :func:`decide` over a once-per-process probe;
    on any other device (CUDA) bf16: tensor cores, and flash attention needs it. An unknown setting is
    a :class:`~shared.errors.ConfigError`."""
    from shared.errors import ConfigError

    if setting == "auto":
        if device.split(":", 1)[0] != "cpu":
            return "bf16"
        return decide(cpu_has_native_bf16(), probe_once())
    if setting in ("bf16", "fp32"):
        return setting  # type: ignore[return-value]
    raise ConfigError(f"unknown precision {setting!r}; expected one of {', '.join(PRECISION_SETTINGS)}")
