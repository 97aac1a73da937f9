"""How much a busy Python thread slows the worker's other threads: pixel decoding and a small forward.

    .venv/bin/python bench/gil_contention.py

A worker's event loop runs MQTT handling, validation and replies in pure Python. Every call that
releases the GIL (a Pillow decode, a numpy copy, each torch op) has to take it back afterwards, and
while the loop holds it the caller waits, up to Python's switch interval. This measures, on one
machine in one run, pixel decodes/s (real JPEG PatchRequests, ~75 % and ~32 % of 196 patches kept)
and DeiT-Tiny forwards/s on 16 tokens (many small ops, like a GPU forward seen from the host), each
alone and next to a thread that runs Python for a given share of the time ("duty") in 0.2 ms bursts
with short sleeps between them, as an event loop does, at two switch intervals.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import natural_image
from shared.protocol import PatchRequest, build_request, decode_patches


def requests(count: int = 32) -> list[PatchRequest]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        kept = np.sort(rng.choice(196, size=147 if i % 2 else 63, replace=False))
        out.append(build_request(device_id="d", request_id=f"r{i}", pixels=natural_image(224, 224, i % 8), indices=kept,
                                 patch_size=16, codec="jpeg", codec_params={"q": 90}, topk_ids=[0],
                                 topk_probs=[0.5], uncertainty=1.0, sent_at=0.0))
    return out


class BusyThread:
    """A thread holding the GIL ``duty`` of the time, in 0.2 ms bursts of Python."""

    def __init__(self, duty: float) -> None:
        self.duty, self.stop = duty, threading.Event()
        self.thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        burst = 0.0002 * self.duty / (1 - self.duty)
        while not self.stop.is_set():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < burst:
                pass
            time.sleep(0.0002)

    def __enter__(self) -> BusyThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    args = ap.parse_args()
    torch.set_num_threads(1)
    batch = requests()
    import timm

    model = timm.create_model("deit_tiny_patch16_224", img_size=64).eval()  # 16 patches + CLS
    image = torch.randn(1, 3, 64, 64)

    def decode_rate() -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            decode_patches(batch[n % len(batch)])
            n += 1
        return n / (time.perf_counter() - t0)

    def forward_rate() -> float:
        n, t0 = 0, time.perf_counter()
        with torch.inference_mode():
            while time.perf_counter() - t0 < args.seconds:
                model(image)
                n += 1
        return n / (time.perf_counter() - t0)

    tasks = {"pixel decodes/s": decode_rate, "small forwards/s": forward_rate}
    alone = {name: fn() for name, fn in tasks.items()}
    print(f"{'busy thread':<28}" + "".join(f"{name:>20}" for name in tasks))
    print(f"{'none':<28}" + "".join(f"{alone[name]:>20.0f}" for name in tasks))
    default = sys.getswitchinterval()
    for interval in (default, 0.0005):
        sys.setswitchinterval(interval)
        for duty in (0.3, 0.6, 0.9):
            cells = []
            for name, fn in tasks.items():
                with BusyThread(duty):
                    rate = fn()
                cells.append(f"{rate:>11.0f} ({rate / alone[name]:.2f}×)")
            print(f"{f'{duty:.0%} of the time, {interval * 1000:g} ms':<28}" + "".join(f"{c:>20}" for c in cells))
    sys.setswitchinterval(default)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
