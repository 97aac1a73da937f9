"""shared.heap: the worker's malloc settings (glibc), and the fallback elsewhere."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from shared.heap import describe_support, retain_freed_memory

ROOT = Path(__file__).resolve().parents[2]
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")


@glibc
def test_settings_apply_once_and_say_what_they_did() -> None:
    first = retain_freed_memory()
    assert first.applied, first.reason
    assert "32 MiB" in first.reason
    assert retain_freed_memory() is first  # idempotent: the first call decides


_BATCH_LIKE_ROUNDS = """
import json, resource, sys, threading
import torch
from shared.heap import describe_support, retain_freed_memory
if sys.argv[1] == "retained":
    retain_freed_memory()
faults = []
def rounds():
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for size in (3 << 20, 12 << 20, 6 << 20, 12 << 20, 3 << 20):
            blocks = [torch.empty(size, dtype=torch.uint8).fill_(1) for _ in range(2)]
            del blocks
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=rounds, name="infer-like")
thread.start()
thread.join()
print(json.dumps(faults))
"""


def _faults_per_round(heap: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", _BATCH_LIKE_ROUNDS, heap], capture_output=True, text=True,
                          check=True, cwd=ROOT, timeout=120)
    faults: list[int] = json.loads(done.stdout.strip().splitlines()[-1])
    return faults


@glibc
def test_activations_freed_on_a_worker_thread_are_reused_without_page_faults() -> None:
    """Batch-like allocations (several MiB, freed together) on a thread of their own, as on the
    worker's inference thread, in a fresh process that applied the settings at start-up as the
    worker does: after warm-up the blocks come back from the heap already mapped. With glibc's
    defaults the same pattern re-faults ≥ 24 MiB (6,000+ pages of 4 KiB) every round."""
    default, retained = _faults_per_round("default"), _faults_per_round("retained")
    assert max(retained[-4:]) < 500, f"retained heap, minor page faults per round: {retained}"
    # The pattern is a fair test: without the settings it does fault (a re-faulted block is ≥ 768 pages).
    assert min(default[-4:]) > 3000, f"glibc defaults, minor page faults per round: {default}"


def test_another_c_library_is_left_alone_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    settings = retain_freed_memory.__wrapped__()  # bypass the per-process cache
    assert not settings.applied
    assert "not glibc" in settings.reason
    assert "not glibc" in describe_support()


@glibc
def test_info_says_what_the_worker_does_with_malloc(capsys: pytest.CaptureFixture[str]) -> None:
    from patchcast.cli import main

    assert main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("malloc"))
    assert "glibc" in line and "worker.retain_heap" in line
