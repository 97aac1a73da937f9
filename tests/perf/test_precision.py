"""``precision = auto``: bf16 only where this CPU measurably runs it faster than fp32."""

from __future__ import annotations

import re

import pytest

from shared.errors import ConfigError
from shared.precision import (
    MIN_BF16_SPEEDUP,
    Bf16Probe,
    cpu_has_native_bf16,
    decide,
    measure_bf16_speedup,
    probe_once,
    resolve,
)
from shared.prepack import prepack_available


def test_auto_takes_bf16_only_with_native_support_and_a_measured_gain() -> None:
    fast = Bf16Probe(fp32_s=0.010, bf16_s=0.002)  # AMX-like: 5×
    slow = Bf16Probe(fp32_s=0.006, bf16_s=0.0087)  # AVX512-BF16 Xeon without AMX: 0.7×
    assert decide(True, fast) == "bf16"
    assert decide(True, slow) == "fp32"
    assert decide(False, fast) == "fp32"  # emulated bf16: never, whatever a probe says
    assert decide(True, None) == "fp32"


def test_the_threshold_is_inclusive_and_just_below_it_is_fp32() -> None:
    at = Bf16Probe(fp32_s=MIN_BF16_SPEEDUP * 0.004, bf16_s=0.004)
    below = Bf16Probe(fp32_s=(MIN_BF16_SPEEDUP - 0.01) * 0.004, bf16_s=0.004)
    assert at.speedup == pytest.approx(MIN_BF16_SPEEDUP)
    assert decide(True, at) == "bf16"
    assert decide(True, below) == "fp32"


def test_probe_times_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Bf16Probe(fp32_s=0.0, bf16_s=0.001)


def test_the_probe_measures_both_precisions_on_this_cpu() -> None:
    probe = measure_bf16_speedup(shape=(32, 64, 128), repeats=2)
    # Real timings: above the 1 ns floor the probe clamps to, and far under a second for this small matmul.
    assert 1e-9 < probe.fp32_s < 1.0 and 1e-9 < probe.bf16_s < 1.0


def test_explicit_settings_pass_through_and_unknown_ones_are_refused() -> None:
    assert resolve("fp32") == "fp32" and resolve("bf16") == "bf16"
    native = cpu_has_native_bf16()
    assert resolve("auto") == decide(native, probe_once()), "auto: this CPU's flags and its (cached) measurement"
    if not native:
        assert resolve("auto") == "fp32", "emulated bf16 is never chosen"
    assert resolve("auto", "cuda:0") == "bf16" and resolve("fp32", "cuda") == "fp32", "auto is bf16 on a GPU"
    with pytest.raises(ConfigError, match="unknown precision"):
        resolve("fp16")
    with pytest.raises(ConfigError, match="unknown precision"):
        resolve("fp16", "cuda")


def test_info_prints_the_measured_bf16_speed_and_the_auto_choice(capsys: pytest.CaptureFixture[str]) -> None:
    from patchcast.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "bf16 matmul speed" in out
    assert re.search(rf"^precision auto\s+{resolve('auto')} ", out, re.MULTILINE)
    want = "available" if prepack_available() else "not available"
    assert re.search(rf"^bf16 weight prepacking\s+{want}", out, re.MULTILINE)
    from shared.packing import varlen_available

    flash = "in this torch" if varlen_available() else "not in this torch"
    assert re.search(rf"^flash varlen attention\s+{flash}", out, re.MULTILINE)
    assert re.search(r"^cuda devices\s+\S", out, re.MULTILINE)
