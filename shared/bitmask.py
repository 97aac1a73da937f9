"""The selection bitmask on the wire: bit i (MSB first within each byte) is patch i, row-major.

Numpy only (no torch), so the protocol — and everything that only decodes messages, such as the
monitor and ``patchcast health`` — starts without importing torch.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def mask_nbytes(num_patches: int) -> int:
    """Bytes of a selection bitmask: ceil(N / 8)."""
    return (num_patches + 7) // 8


def pack_mask(indices: np.ndarray | list[int], num_patches: int) -> bytes:
    """Bitmask of kept patches: bit i (MSB first within each byte) is patch i in row-major order."""
    bits = np.zeros(num_patches, dtype=np.uint8)
    bits[np.asarray(indices, dtype=np.int64)] = 1
    return np.packbits(bits, bitorder="big").tobytes()


def unpack_mask(data: bytes, num_patches: int) -> np.ndarray:
    """Sorted kept indices from a bitmask (int64, **read-only**: shared by every caller that unpacks the
    same mask). Padding bits past ``num_patches`` must be zero.

    A request's mask is unpacked when it is validated, when the worker queues it and when its pixels
    are decoded: the last :data:`_CACHED` distinct masks are kept (a few MB at most, at the largest
    masks the protocol limits allow).
    """
    return _unpacked(bytes(data), num_patches)


_CACHED = 256


@lru_cache(maxsize=_CACHED)
def _unpacked(data: bytes, num_patches: int) -> np.ndarray:
    if len(data) != mask_nbytes(num_patches):
        raise ValueError(f"mask has {len(data)} bytes, expected {mask_nbytes(num_patches)}")
    padding = 8 * len(data) - num_patches
    if padding and data[-1] & ((1 << padding) - 1):
        raise ValueError("mask has bits set past the last patch")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="big", count=num_patches)
    kept = np.flatnonzero(bits)
    kept.flags.writeable = False
    return kept
