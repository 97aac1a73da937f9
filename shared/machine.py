"""What a run was measured on, in one place: the CPU's model name, its cores, the Python, platform and
torch versions (benchmark reports, model cards, ``patchcast info``)."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any


def cpu_name() -> str:
    """The CPU's model name (lscpu, else /proc/cpuinfo, else what :mod:`platform` knows)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(*, torch: bool = True) -> dict[str, Any]:
    """``cpu`` (model name), ``cores``, ``python``, ``platform`` and, with ``torch``, torch's version."""
    info: dict[str, Any] = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    if torch:
        import torch as torch_module

        info["torch"] = torch_module.__version__
    return info
