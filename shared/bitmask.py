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
    nbits = 8 * mask_nbytes(num_patches)
    value = 0
    for i in np.asarray(indices, dtype=np.int64).tolist():  # plain Python: see _unpacked
        if not -num_patches <= i < num_patches:  # what indexing an N-element array allows
            raise IndexError(f"patch index {i} is out of bounds for {num_patches} patches")
        value |= 1 << (nbits - 1 - i % num_patches)
    return value.to_bytes(nbits // 8, "big")


def unpack_mask(data: bytes, num_patches: int) -> np.ndarray:
    """Sorted kept indices from a bitmask (int64, **read-only**: shared by every caller that unpacks the
    same mask). Padding bits past ``num_patches`` must be zero.

    A request's mask is unpacked when it is validated, when the worker queues it and when its pixels
    are decoded: the last :data:`_CACHED` distinct masks are kept (a few MB at most, at the largest
    masks the protocol limits allow).
    """
    return _unpacked(bytes(data), num_patches)


def mask_keeps_any(data: bytes, num_patches: int) -> bool:
    """Whether :func:`unpack_mask` accepts ``data`` (bytes) and finds a patch kept, without unpacking it:
    its length, zero padding bits, at least one bit set. Never raises."""
    if len(data) != mask_nbytes(num_patches):
        return False
    padding = 8 * len(data) - num_patches
    return not (padding and data[-1] & ((1 << padding) - 1)) and data.count(0) != len(data)


_CACHED = 256


@lru_cache(maxsize=_CACHED)
def _unpacked(data: bytes, num_patches: int) -> np.ndarray:
    if len(data) != mask_nbytes(num_patches):
        raise ValueError(f"mask has {len(data)} bytes, expected {mask_nbytes(num_patches)}")
    padding = 8 * len(data) - num_patches
    if padding and data[-1] & ((1 << padding) - 1):
        raise ValueError("mask has bits set past the last patch")
    # a byte at a time from a table, in plain Python: on a worker's event loop, between forwards, numpy's
    # unpackbits + flatnonzero cost ~20 µs a request (their code cold); this a few
    kept = np.array([base + offset for base, byte in zip(range(0, 8 * len(data), 8), data, strict=True)
                     for offset in _BIT_OFFSETS[byte]], dtype=np.int64)
    kept.flags.writeable = False
    return kept


_BIT_OFFSETS = tuple(tuple(i for i in range(8) if byte & (0x80 >> i)) for byte in range(256))
"""The set bits of each byte value, MSB first: bit i of a mask's byte j is patch 8·j + i."""
