"""The cache of model passes: one folder per (edge weights, server weights, data, precision, seed),
one ``.npz`` per product, so a second run (another ``--max-loss``, more plots) costs seconds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def digest(obj: Any) -> str:
    """A short, stable hash of a JSON-able object (cache keys and product names)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(model: Any) -> str:
    """Hash of a model's weights: the cache follows the weights, whatever reference loaded them."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def data_fingerprint(samples: Sequence[Any]) -> str:
    """Hash of sample keys, sizes, labels and a digest of the bytes: cheap even for 50k images."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.key}\0{len(s.data)}\0{s.label}\0".encode())
        h.update(hashlib.blake2b(s.data, digest_size=8).digest())
    return h.hexdigest()[:16]


class Cache:
    """One folder per (edge weights, server weights, data, precision, seed); one npz per product."""

    def __init__(self, root: Path | None, key_parts: dict[str, Any]) -> None:
        self.key = digest(key_parts)
        self.dir = root / self.key if root is not None else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = self.dir / "meta.json"
            if not meta.is_file():
                meta.write_text(json.dumps(key_parts, indent=2, sort_keys=True) + "\n")

    def load(self, name: str) -> dict[str, np.ndarray] | None:
        if self.dir is None or not (self.dir / f"{name}.npz").is_file():
            return None
        try:
            with np.load(self.dir / f"{name}.npz") as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError):  # a truncated file from an interrupted run: recompute
            return None

    def save(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        if self.dir is None:
            return
        tmp = self.dir / f"{name}.tmp.npz"
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(self.dir / f"{name}.npz")  # atomic: readers never see half a file
