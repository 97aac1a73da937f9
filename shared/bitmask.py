"""The selection bitmask on the wire: bit i (MSB first within each byte) is patch i, row-major.

Numpy only (no torch), so the protocol — and everything that only decodes messages, such as the
monitor and ``patchcast health`` — starts without importing torch.
"""

from __future__ import annotations

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
    """Sorted kept indices from a bitmask. Padding bits past ``num_patches`` must be zero."""
    if len(data) != mask_nbytes(num_patches):
        raise ValueError(f"mask has {len(data)} bytes, expected {mask_nbytes(num_patches)}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="big")
    if bits[num_patches:].any():
        raise ValueError("mask has bits set past the last patch")
    return np.flatnonzero(bits[:num_patches]).astype(np.int64, copy=False)  # a fresh array either way
