"""bench/gpu_worker.py where there is no GPU: a clear refusal, not a traceback (it runs on CUDA only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_worker.py"


def test_gpu_benchmark_refuses_clearly_without_a_gpu() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--requests", "4"], capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "needs a CUDA GPU" in proc.stderr
