"""Bytes on the wire, measured, not modelled: the actual selections (or glances and windows) of a
fixed, seeded subsample of images are encoded with the chosen codec (:mod:`shared.codecs`) and
divided by the bytes of the same images as full-image JPEG (quality 90) payloads."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from patchcast.eval.arrays import BoolArray, FloatArray, IntArray
from patchcast.eval.cache import Cache, digest
from patchcast.eval.grid import SelectionSpec
from patchcast.progress import ProgressFn

if TYPE_CHECKING:
    from patchcast.eval.config import EvalConfig
    from patchcast.eval.passes import Arrays
    from patchcast.eval.region import RegionEvalConfig
    from patchcast.eval.region_passes import RegionPasses

REFERENCE_JPEG_QUALITY = 90


def reference_bytes(pixels: np.ndarray, patch_size: int) -> int:
    """The full image as PatchCast would send it: the ``jpeg`` codec (table-less baseline JPEG,
    quality 90, 4:2:0) with every patch kept. Table-less on both sides keeps the ratio honest: the
    ~610 header bytes a JPEG *file* would add are not on the wire for either."""
    from shared.codecs import full_image_payload_bytes

    return full_image_payload_bytes(pixels, patch_size, REFERENCE_JPEG_QUALITY)


def jpeg_file_bytes(pixels: np.ndarray, quality: int = REFERENCE_JPEG_QUALITY) -> int:
    """Size of the same image as a standalone JPEG file (Pillow, headers included), for reference."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.tell()


def byte_sample(n: int, size: int, seed: int) -> IntArray:
    """The images whose payloads are encoded: a seeded subsample of ``size`` of the ``n`` images
    (both evaluations draw it this way, so one seed measures the same images)."""
    return np.sort(np.random.default_rng([seed, 7]).permutation(n)[:min(size, n)])


def bytes_fraction(send: BoolArray, sel_bytes: IntArray, full_bytes: IntArray) -> FloatArray:
    """Bytes on the link ÷ bytes of sending every image as full JPEG, over the bytes subsample.

    ``send`` (T, S) are the gate decisions of the S subsampled images, ``sel_bytes`` (S,) the encoded
    size of each one's actual selection and ``full_bytes`` (S,) its full-image JPEG size. A ratio of
    sums (not a mean of ratios), so it estimates total traffic.
    """
    total = float(np.sum(full_bytes))
    return (np.asarray(send, dtype=np.float64) @ np.asarray(sel_bytes, dtype=np.float64)) / max(total, 1.0)


def measure_selection_bytes(cfg: EvalConfig, ds: Any, pre: Any, patch_size: int, data: Arrays,
                  specs: Sequence[SelectionSpec], cache: Cache,
                  report: ProgressFn) -> tuple[IntArray, IntArray, dict[str, IntArray], float]:
    """Encode the actual selections (the cached masks) of a fixed, seeded subsample of images with
    the chosen codec. Returns the subsample, its reference sizes (:func:`reference_bytes`), each
    selection's payload sizes, and the mean standalone JPEG file size of the subsample."""
    from shared import datasets
    from shared.codecs import get_codec

    codec = get_codec(cfg.codec)
    params = codec.resolve_params(dict(cfg.codec_params))
    sample = byte_sample(len(data.labels), cfg.bytes_sample, cfg.seed)
    size = len(sample)
    name = "bytes-" + digest({"codec": cfg.codec, "params": params, "size": size})
    cached = cache.load(name) or {}
    todo = [sp for sp in specs if sp.id not in cached]
    if "__reference__" in cached and not todo:
        sizes = {sp.id: cached[sp.id] for sp in specs}
        return sample, cached["__reference__"], sizes, float(cached["__file__"])
    pixels, _ = datasets.to_tensor_batch([ds.samples[int(i)] for i in sample], pre)
    px = pixels.numpy()
    ref = cached.get("__reference__")
    if ref is None:
        ref = np.array([reference_bytes(p, patch_size) for p in px], dtype=np.int64)
    file_mean = np.array(float(np.mean([jpeg_file_bytes(p) for p in px])))
    out = {sp.id: cached[sp.id] for sp in specs if sp.id in cached}
    for j, sp in enumerate(todo):
        masks = data.masks(sp.id, sample)
        # Score-aware codecs (jpeg-tiered) rank kept patches by the encoder's scores; a random
        # selection has none of its own, so it borrows the edge attention.
        scores = data.scores[(sp.encoder, "attention" if sp.score == "random" else sp.score)][sample]
        lengths = []
        for i in range(size):
            idx = np.flatnonzero(masks[i])
            lengths.append(len(codec.encode(px[i], idx, patch_size, params, scores=scores[i][idx])))
        out[sp.id] = np.array(lengths, dtype=np.int64)
        report("bytes", j + 1, len(todo), sp.id)
    cache.save(name, {"__reference__": ref, "__file__": file_mean, **out})
    return sample, ref, out, float(file_mean)


@dataclass
class ByteSizes:
    """Payload sizes of a seeded sample of S images (indices into the evaluated images)."""

    sample: IntArray  # (S,)
    reference: IntArray  # (S,) full image, jpeg q90, every patch (shared.codecs.full_image_payload_bytes)
    server: IntArray  # (S,) full image through the service's codec, every patch (server-only)
    glance: dict[int, IntArray]  # downscale → (S,) the downsampled image, every patch of size p/s
    region: dict[int, dict[float, IntArray]]  # downscale → side fraction → (S,) the window's full-res patches

    def fraction(self, total: float) -> float:
        return total / max(1.0, float(np.sum(self.reference)))


def measure_region_bytes(cfg: RegionEvalConfig, ds: Any, server: Any, passes: RegionPasses,
                         report: ProgressFn) -> ByteSizes:
    """Encode, for each sampled image, the glance and every window it would send (its own windows,
    chosen by the server's attention on its glance) with the service's codec."""
    from shared import datasets
    from shared.codecs import get_codec, quality_params
    from shared.region import downsample, global_patch_size

    codec = get_codec(cfg.codec)
    params = quality_params(codec, cfg.quality)
    p = passes.patch_size
    all_idx = np.arange(passes.num_patches)
    sample = byte_sample(len(passes.labels), cfg.bytes_sample, cfg.seed)
    ref, srv = [], []
    glance: dict[int, list[int]] = {s: [] for s in cfg.downscales}
    region: dict[int, dict[float, list[int]]] = {s: {f: [] for f in cfg.sides} for s in cfg.downscales}
    for j, i in enumerate(sample):
        px = datasets.crop_uint8(datasets.decode_rgb(ds.samples[int(i)].data), server.preprocess)
        ref.append(reference_bytes(px, p))
        srv.append(len(codec.encode(px, all_idx, p, params)))
        for s in cfg.downscales:
            glance[s].append(len(codec.encode(downsample(px, s), all_idx, global_patch_size(p, s), params)))
            for f in cfg.sides:
                region[s][f].append(len(codec.encode(px, passes.scales[s].windows[f][int(i)], p, params)))
        if (j + 1) % 16 == 0 or j + 1 == len(sample):
            report("bytes", j + 1, len(sample), f"{cfg.codec} q{cfg.quality}")

    def arr(x: list[int]) -> IntArray:
        return np.asarray(x, dtype=np.int64)

    return ByteSizes(sample=sample, reference=arr(ref), server=arr(srv),
                     glance={s: arr(v) for s, v in glance.items()},
                     region={s: {f: arr(v) for f, v in d.items()} for s, d in region.items()})
