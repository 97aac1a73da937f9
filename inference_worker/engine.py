"""The server model side of a worker: decoded patch sets in, logits out. Synchronous, torch only.

Runs in the worker's single inference thread. Each call embeds every patch of the batch in one
matrix product (the patch-embed conv is a linear map of one patch's pixels), splits the tokens
per request and runs them through the blocks under the configured batching policy:

* ``packed``: :func:`shared.packing.forward_token_sets` — all real tokens in one (T, D) matrix,
  attention per request; no padding at all.
* ``padded``: requests grouped by similar length with :func:`shared.packing.plan_batches`
  (``pad_to_max``: the padded cost is what counts against ``max_tokens``), each group padded to its
  longest set with a key-padding mask (the reference path of :mod:`shared.subset`).
* ``sequential``: one request at a time (the baseline the others are measured against).

Precision: ``bf16`` runs under CPU autocast (matrix products in bf16 on AMX/AVX512-BF16; norms and
softmax stay float32) on a copy whose matrix weights are stored in bf16 (bit-identical to autocast
over the fp32 weights, without the per-call weight casts), ``fp32`` plainly; ``auto`` picks bf16
only where a start-up probe measures it clearly faster than fp32 (:mod:`shared.precision`: on
some CPUs with AVX512-BF16 and no AMX it is slower). With ``prepack`` (``worker.prepack_weights``)
a bf16 engine also keeps the blocks' Linear weights in oneDNN's blocked layout
(:mod:`shared.prepack`), where this torch supports it. Everything runs under ``torch.inference_mode``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from shared.config import BatchingConfig
from shared.datasets import normalize
from shared.errors import InferenceError, ModelError
from shared.models import LoadedModel
from shared.packing import (
    AttentionImpl,
    autocast_ready_copy,
    bucket_rows,
    forward_packed,
    forward_token_sets,
    plan_batches,
    varlen_available,
)
from shared.precision import Precision
from shared.prepack import prepack_available, prepack_linears
from shared.subset import embed_patches

__all__ = ["PatchSet", "Precision", "ServerEngine", "configure_threads", "resolve_attention", "resolve_device"]


def resolve_device(setting: str) -> torch.device:
    """``worker.device`` as a torch device, refusing CUDA where there is none (at start-up, not at the
    first request)."""
    try:
        device = torch.device(setting)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {setting!r}: {exc}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"worker.device is {setting!r} but this torch sees no CUDA GPU "
                             f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(f"worker.device is {setting!r} but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    elif device.type != "cpu":
        raise ModelError(f"worker.device must be cpu or cuda[:N], got {setting!r}")
    return device


def resolve_attention(setting: str, device: torch.device, precision: Precision) -> AttentionImpl:
    """``batching.attention`` for this device. ``auto``: on the CPU one SDPA call per set (fastest
    measured there); on CUDA one flash-attention call per block (``varlen``) in bf16 where torch has
    it, else one masked call over padded Q/K/V: a GPU launches per call, and a call per set ran
    25× slower than one per block on an H100 (docs/benchmarks.md)."""
    flash_ok = device.type == "cuda" and precision == "bf16" and varlen_available()
    if setting == "auto":
        if device.type == "cpu":
            return "sdpa"
        return "varlen" if flash_ok else "padded"
    if setting == "varlen" and not flash_ok:
        raise ModelError("batching.attention = 'varlen' needs a CUDA device, bf16 and a torch with "
                         "torch.nn.attention.varlen (2.10 or later); use auto or sdpa")
    if setting not in ("sdpa", "padded", "varlen"):
        raise ModelError(f"unknown attention {setting!r}; expected auto, sdpa, padded or varlen")
    return cast(AttentionImpl, setting)


def configure_threads(threads: int) -> int:
    """Set torch's intra-op threads deliberately (0: one per core); returns the number in use."""
    import os

    # The cores this process may run on (a container's cpuset), not the host's count.
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = threads if threads > 0 else available
    torch.set_num_threads(wanted)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel work
        torch.set_num_interop_threads(1)
    return torch.get_num_threads()


@dataclass(frozen=True)
class PatchSet:
    """One request's kept patches (K, p, p, 3) uint8 and their grid indices (K,) int64, sorted."""

    patches: np.ndarray
    indices: np.ndarray

    def __post_init__(self) -> None:
        if self.patches.ndim != 4 or self.patches.shape[-1] != 3 or self.patches.dtype != np.uint8:
            raise ValueError(f"patches must be (K, p, p, 3) uint8, got {self.patches.shape} "
                             f"{self.patches.dtype}")
        if self.indices.shape != (self.patches.shape[0],):
            raise ValueError(f"{self.indices.shape[0]} indices for {self.patches.shape[0]} patches")

    @property
    def tokens(self) -> int:
        """Tokens this set costs in a batch: its patches plus CLS."""
        return int(self.patches.shape[0]) + 1


class ServerEngine:
    """A loaded server ViT plus the policy and precision it serves with."""

    def __init__(self, loaded: LoadedModel, batching: BatchingConfig, precision: Precision = "fp32", *,
                 prepack: bool = False, device: str = "cpu") -> None:
        self.loaded = loaded
        self.batching = batching
        self.precision = precision
        self.device = resolve_device(device)
        self.attention = resolve_attention(batching.attention, self.device, precision)
        # bf16: matrix weights stored in bf16 once (same results as autocast over fp32 weights, without
        # re-casting ~all parameters at every forward); the loaded fp32 model is left untouched.
        model = loaded.model.eval()
        if precision == "bf16":
            model = autocast_ready_copy(model)
        elif self.device.type != "cpu":
            model = copy.deepcopy(model)
        self.model = model.to(self.device)
        # … and, with prepack, laid out once for oneDNN instead of at every product (CPU only).
        self.prepacked = self.device.type == "cpu" and precision == "bf16" and prepack and prepack_available()
        if self.prepacked:
            prepack_linears(self.model)
        self.restarts = 0  # never: it lives in the worker's process (EngineProcess counts its children)
        self.pin_host_memory = True  # GPU only: see _pixels_on_device (a benchmark turns it off to compare)
        self.patch_size = loaded.patch_size
        self.num_patches = loaded.num_patches
        self.input_size = loaded.preprocess.input_size
        from shared.packing import UnsupportedModelError, check_packable

        try:
            check_packable(self.model)
            # Attention maps (region exchanges choose their window by them) come from the packed forward.
            self.maps_available = True
        except UnsupportedModelError:
            if batching.policy == "packed":
                raise  # fail at start-up, not at the first request
            self.maps_available = False

    @contextlib.contextmanager
    def _mode(self) -> Iterator[None]:
        with torch.inference_mode():
            if self.precision == "bf16":
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    yield
            else:
                yield

    def _pixels_on_device(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """The batch's patch pixels, concatenated, on the engine's device as uint8 (a quarter of the
        float bytes; normalised there). For a GPU they are gathered straight into page-locked memory
        (torch's caching host allocator reuses it) and copied asynchronously, which skips the
        driver's own staging copy of pageable memory."""
        if self.device.type == "cpu":
            return torch.from_numpy(np.concatenate(arrays, axis=0))
        if not self.pin_host_memory:
            return torch.from_numpy(np.concatenate(arrays, axis=0)).to(self.device)
        rows = sum(int(a.shape[0]) for a in arrays)
        staging = torch.empty((rows, *arrays[0].shape[1:]), dtype=torch.uint8, pin_memory=True)
        np.concatenate(arrays, axis=0, out=staging.numpy())
        return staging.to(self.device, non_blocking=True)

    def _token_sets(self, sets: Sequence[PatchSet]) -> list[torch.Tensor]:
        pre = self.loaded.preprocess
        pixels = self._pixels_on_device([s.patches for s in sets])  # (ΣK, p, p, 3) uint8
        patches = normalize(pixels, pre)  # (ΣK, 3, p, p) float32
        indices = torch.from_numpy(np.concatenate([s.indices for s in sets]).astype(np.int64)).to(self.device)
        total = int(indices.shape[0])
        spare = bucket_rows(total) - total if self.batching.shape_buckets and total else 0
        if spare:  # the embedding product is a matrix product too: same shape buckets as the blocks
            patches = torch.cat([patches, patches.new_zeros(spare, *patches.shape[1:])])
            indices = torch.cat([indices, indices.new_zeros(spare)])
        embedded = embed_patches(self.model, patches.unsqueeze(0), indices.unsqueeze(0))[0, :total]
        return list(torch.split(embedded, [int(s.patches.shape[0]) for s in sets], dim=0))

    def logits(self, sets: Sequence[PatchSet], cls_attention: list[np.ndarray] | None = None) -> torch.Tensor:
        """Float32 logits (B, C) for B patch sets, in input order. With a ``cls_attention`` list, each
        set's last-block CLS attention over its patches (float32 (K_i,), summing to 1) is appended to it;
        that batch then runs packed whatever the policy (packing is exact, see shared.packing)."""
        if not sets:
            return torch.zeros(0, self.loaded.num_classes)
        policy = self.batching.policy
        with self._mode():
            tokens = self._token_sets(sets)
            if cls_attention is not None:
                maps: list[torch.Tensor] = []
                out = forward_packed(self.model, tokens, attention=self.attention,
                                     cls_only_last=self.batching.cls_only_last,
                                     shape_buckets=self.batching.shape_buckets, cls_attention=maps).float().cpu()
                cls_attention.extend(m.cpu().numpy() for m in maps)
                return out
            if policy != "padded":
                return forward_token_sets(self.model, tokens, policy, attention=self.attention,
                                          cls_only_last=self.batching.cls_only_last,
                                          shape_buckets=self.batching.shape_buckets).float().cpu()
            out = torch.empty(len(sets), self.loaded.num_classes)
            groups = plan_batches([t.shape[0] for t in tokens], self.batching.max_batch,
                                  self.batching.max_tokens, pad_to_max=True)
            for group in groups:
                out[group] = forward_token_sets(self.model, [tokens[i] for i in group], "padded").float().cpu()
            return out

    def close(self) -> None:
        """Nothing to release (the interface :class:`~inference_worker.engine_process.EngineProcess` shares)."""

    def logits_checked(self, sets: Sequence[PatchSet], cls_attention: list[np.ndarray] | None = None
                       ) -> torch.Tensor:
        """:meth:`logits`, with any failure (shape, memory, NaN output) as :class:`InferenceError`."""
        try:
            out = self.logits(sets, cls_attention)
        except Exception as exc:
            raise InferenceError(f"server forward failed on a batch of {len(sets)}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        if not bool(torch.isfinite(out).all()):
            raise InferenceError("server model produced non-finite logits")
        if cls_attention is not None and not all(np.isfinite(m).all() for m in cls_attention):
            raise InferenceError("server model produced non-finite attention maps")
        return out
