"""Helpers for the protocol tests: deterministic images and valid messages of every kind.

(A plain module, not a conftest: test folders share one import namespace, and several have a conftest.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from shared import protocol as P
from shared.errors import ProtocolError

sys.path.append(str(Path(__file__).resolve().parents[2]))  # the checkout: its bench/ is not installed
from bench.common import natural_image  # the benchmarks' photo-like image, shared with these tests

__all__ = ["code_of", "make_request", "natural_image", "pack", "sample_messages", "wire"]


def wire(message: P.Message) -> dict[str, Any]:
    """A message as the map on the wire."""
    return msgpack.unpackb(P.encode(message), raw=False)


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def code_of(data: bytes, decoder: Any = P.decode, **kw: Any) -> str:
    """The error code ``decoder`` refuses ``data`` with (it must refuse it)."""
    with pytest.raises(ProtocolError) as info:
        decoder(data, **kw)
    return info.value.code


def make_request(codec: str = "jpeg", *, size: int = 64, patch: int = 16, keep_every: int = 2,
                 seed: int = 0, **overrides: object) -> P.PatchRequest:
    pixels = natural_image(size, size, seed)
    n = (size // patch) ** 2
    indices = np.arange(0, n, keep_every)
    kwargs: dict[str, object] = dict(
        device_id="cam-01", request_id="r-000042", pixels=pixels, indices=indices, patch_size=patch,
        codec=codec, scores=np.linspace(1.0, 0.0, indices.size), topk_ids=[7, 3, 1],
        topk_probs=[0.6, 0.25, 0.1], uncertainty=1.25, uncertainty_kind="min_entropy",
        sent_at=1_763_800_000.5, label=7, deadline=1_763_800_002.5)
    kwargs.update(overrides)
    return P.build_request(**kwargs)  # type: ignore[arg-type]


def sample_messages() -> list[P.Message]:
    return [
        make_request(),
        make_request("raw", label=None, deadline=None),
        P.Reply("r-000042", 7, (7, 3), (0.9, 0.05), 1.5, 20.25, 23.0, "worker-1", 8),
        P.ErrorReply("r-000042", "bad_mask", "mask keeps no patch", "worker-1"),
        P.ErrorReply(None, "malformed", "not msgpack", "worker-1"),
        P.WorkerMetrics("worker-1", "deit_base", 1_763_800_000.0, 5.0, 3, 256, 12.5, 100, 20.0, 14, 7.1, 16,
                        480.0, 0.82, 40.0, 95.5, 130.0, {"bad_mask": 2, "busy": 1}, 35.5),
        P.Outcome("cam-01", "r-000042", 1_763_800_001.0, "server", 63, 196, 7000, 41.5, 3, 7, 7, 1.25),
        P.Outcome("cam-01", "r-000045", 1_763_800_001.0, "server", 63, 196, 7000, 41.5, 3, 7, 7, 1.25, None, 17_900),
        P.Outcome("cam-01", "r-000043", 1_763_800_001.0, "edge", 0, 196, 0, None, 3, 3),
        P.Outcome("cam-01", "r-000044", 1_763_800_001.0, "timeout", 63, 196, 7000, None, 3, 3, None, 1.5,
                  "timeout"),
        P.EdgeMetrics("cam-01", 1_763_800_000.0, 5.0, 100, 40, 37, 2, 1, 280_000, 2_500, 35.0, 80.0, 120.0,
                      100, 91),
        P.Availability("worker", "worker-1", "online", 1_763_800_000.0),
    ]
