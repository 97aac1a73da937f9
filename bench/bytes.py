"""Bytes on the wire: the whole request message per codec and kept fraction, against a full-image JPEG.

Two datasets: Imagenette (``imagenette2/val.tar``: real photos, 16-pixel patches, at the input size of
``zoo:imagenette-server``) and CIFAR-10 (``cifar10/test.tar``, 4-pixel patches).

For every image, kept fraction and codec this builds the real ``PatchRequest`` (ids, geometry, mask,
codec params, payload, edge top-5, uncertainty, timestamps, deadline; no ground-truth label, as in
production) and measures ``len(protocol.encode(request))``: the exact MQTT payload. The baseline is
the full image at the server model's input size as a standard JPEG file (Pillow, quality 90, 4:2:0),
which is what a device would send without patch selection.

``--operating-point SUMMARY.json`` (a ``patchcast eval`` summary) adds the deployed view: the whole
split through that point's gate and selection rule (the edge's uncertainty decides which images are
offloaded, its attention which patches), every offloaded image's real request with the service codec,
against every image, and against the offloaded images, as full JPEGs.

Timings: encode = codec encode + building and msgpack-packing the request; decode = validating
decode + codec decode to (K, p, p, 3) uint8. Quality of lossy codecs is measured on the kept patches:
PSNR, and the mean absolute error on each patch's 1-pixel border ring vs its interior (4:2:0 chroma
upsampling bleeds fill colour into the ring).

Which patches are kept: the edge model's CLS attention (``zoo:imagenette-edge``, ``zoo:cifar10-edge``);
for CIFAR-10 without its zoo edge, a stand-in: per-patch gradient energy (mean squared
central-difference gradient of luma), the most detailed patches first.

Effect on classification: the dataset's zoo server (``zoo:imagenette-server``, ``zoo:cifar10-server``)
runs on the *decoded* kept patches with the subset forward (each patch embedded at its own position,
as the worker does), and its accuracy is compared with the same forward on the original, lossless
kept patches.

Quality adaptive to attention is measured as an experiment, ``x-jpeg-tiered`` (defined here, not
registered in the protocol): the top half of the kept patches by score at q, the rest at q2.

    PATCHCAST_DATA=/path/to/datasets python bench/bytes.py --limit 100
    python bench/bytes.py --dataset imagenette --operating-point reports/eval-imagenette/summary.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, features
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from shared import codecs, datasets
from shared import protocol as P
from shared.machine import machine_info
from shared.models import ZOO_DIR, Preprocess


class TieredJpegCodec(codecs.Codec):
    """Experiment, not part of the protocol: quality adaptive to attention.

    The ⌈K·hi/100⌉ highest-scoring kept patches go in one table-less JPEG mosaic at quality ``q``, the
    rest in a second one at ``q2``. Payload: tier mask over the K kept patches (⌈K/8⌉ bytes, 1 = high
    tier), the high-tier stream's length (4 bytes, big-endian), the two streams. Mosaics, not canvases:
    a canvas per tier pays for the other tier's blank patches and cuts kept patches off from half their
    neighbours (+15–20 % bytes in a first trial). Registered only in this process, as ``x-jpeg-tiered``.
    """

    name = "x-jpeg-tiered"
    description = "experiment: two JPEG mosaics, top `hi` % of kept patches by score at q, the rest at q2"
    lossless = False
    param_specs = (codecs.ParamSpec("q", 90, 1, 100, "quality of the high tier"),
                   codecs.ParamSpec("q2", 70, 1, 100, "quality of the low tier"),
                   codecs.ParamSpec("hi", 50, 0, 100, "percent of kept patches in the high tier"),
                   codecs.ParamSpec("ss", 0, 0, 444, "chroma subsampling as in jpeg", choices=(0, 420, 444)))

    def _encode(self, pixels: np.ndarray, indices: np.ndarray, patch_size: int, params: dict[str, int],
                scores: np.ndarray | None) -> bytes:
        if scores is None:
            raise ValueError("x-jpeg-tiered needs one score per kept patch")
        k = indices.size
        high = np.zeros(k, dtype=bool)
        n_high = math.ceil(k * params["hi"] / 100)
        high[np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:n_high]] = True
        geometry = (pixels.shape[0], pixels.shape[1])
        patches = codecs.extract_patches(pixels, indices, patch_size)
        ss = codecs.chroma_subsampling(params["ss"], patch_size)
        streams = [codecs.jpeg_encode_stripped(codecs.mosaic_image(patches[tier], geometry, patch_size), q, ss)
                   if tier.any() else b"" for tier, q in ((high, params["q"]), (~high, params["q2"]))]
        bits = np.packbits(high.astype(np.uint8), bitorder="big").tobytes()
        return bits + len(streams[0]).to_bytes(4, "big") + streams[0] + streams[1]

    def _decode(self, payload: bytes, geometry: tuple[int, int], indices: np.ndarray, patch_size: int,
                params: dict[str, int]) -> np.ndarray:
        k = indices.size
        nbits = (k + 7) // 8
        high = np.unpackbits(np.frombuffer(payload[:nbits], dtype=np.uint8), bitorder="big")[:k].astype(bool)
        len_a = int.from_bytes(payload[nbits:nbits + 4], "big")
        streams = (payload[nbits + 4:nbits + 4 + len_a], payload[nbits + 4 + len_a:])
        ss = codecs.chroma_subsampling(params["ss"], patch_size)
        out = np.empty((k, patch_size, patch_size, 3), dtype=np.uint8)
        for tier, stream, q in ((high, streams[0], params["q"]), (~high, streams[1], params["q2"])):
            count = int(tier.sum())
            if count:
                mh, mw = codecs.mosaic_shape(count, geometry, patch_size)
                image = codecs.jpeg_decode_stripped(stream, mh, mw, q, ss)
                out[tier] = codecs.split_image(image, patch_size)[:count]
        return out


codecs.register(TieredJpegCodec())

FRACTIONS = (1.0, 0.75, 0.5, 0.32)
# Besides every registered codec at its defaults: 4:2:0 vs 4:4:4 for both JPEG layouts (``ss=0``, the
# default, is one of the two), 4:4:4 at a lower quality for an equal-bytes comparison, a uniformly
# lower quality to compare with the two-quality experiment, and a faster WebP method.
DEFAULT_CODECS = ("raw", "raw+zlib", "raw+zstd", "png", "webp-lossless", "jpeg", "jpeg:ss=420", "jpeg:ss=444",
                  "jpeg:ss=444,q=85", "jpeg-mosaic", "jpeg-mosaic:ss=420", "jpeg-mosaic:ss=444",
                  "jpeg-mosaic:q=80", "webp", "webp:m=2", "webp-mosaic", "x-jpeg-tiered", "x-jpeg-tiered:q2=50")
BASELINE_QUALITY = 90
IMAGENETTE = "imagenette2/val.tar"
IMAGENETTE_EDGE, IMAGENETTE_SERVER = "zoo:imagenette-edge", "zoo:imagenette-server"
PSNR_CAP_DB = 99.0  # identical patches have infinite PSNR; cap so means stay finite


@dataclass(frozen=True)
class CodecSpec:
    label: str
    name: str
    params: dict[str, int]


def parse_spec(text: str) -> CodecSpec:
    """``name`` or ``name:key=value,key=value`` (e.g. ``jpeg:ss=444``)."""
    name, _, rest = text.partition(":")
    params = {k: int(v) for k, v in (kv.split("=", 1) for kv in rest.split(",") if kv)}
    codecs.get_codec(name).resolve_params(params)  # fail early on typos
    return CodecSpec(text, name, params)


@dataclass
class Sample:
    pixels: np.ndarray  # (H, W, 3) uint8, what the device owns
    scores: np.ndarray  # (N,) selection scores, higher = keep first
    topk_ids: tuple[int, ...]
    topk_probs: tuple[float, ...]
    label: int = -1


def gradient_energy(pixels: np.ndarray, patch: int) -> np.ndarray:
    """Per-patch mean squared central-difference gradient of luma: a model-free saliency stand-in."""
    luma = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    gx = np.zeros_like(luma)
    gy = np.zeros_like(luma)
    gx[:, 1:-1] = luma[:, 2:] - luma[:, :-2]
    gy[1:-1] = luma[2:] - luma[:-2]
    h, w = luma.shape
    energy = (gx**2 + gy**2).reshape(h // patch, patch, w // patch, patch).mean(axis=(1, 3))
    return energy.ravel()


STANDIN_TOPK = ((1, 2, 3, 4, 5), (0.41, 0.22, 0.09, 0.05, 0.03))  # sizes matter, values do not


def _zoo_has(ref: str) -> bool:
    return (ZOO_DIR / f"{ref.removeprefix('zoo:')}.safetensors").is_file()


def imagenette_pixels(limit: int | None, seed: int = 0) -> tuple[list[np.ndarray], list[int], Preprocess]:
    """A seeded spread of the Imagenette val photos at the server model's input size (what a device sends)."""
    from shared.models import build_model

    if not (_zoo_has(IMAGENETTE_EDGE) and _zoo_has(IMAGENETTE_SERVER)):
        raise SystemExit(f"{IMAGENETTE_EDGE} / {IMAGENETTE_SERVER} are not in the zoo ({ZOO_DIR})")
    pre = build_model(IMAGENETTE_SERVER).preprocess
    ds = datasets.load(IMAGENETTE).spread(limit, seed)
    pixels = [datasets.crop_uint8(datasets.decode_rgb(s.data), pre) for s in ds.samples]
    return pixels, [-1 if s.label is None else s.label for s in ds.samples], pre


def load_samples(dataset: str, limit: int | None) -> tuple[list[Sample], int, str]:
    """Images, patch size and a description of how patches were scored."""
    if dataset == "imagenette":
        pixels, labels, pre = imagenette_pixels(limit)
        samples = _edge_attention(pixels, IMAGENETTE_EDGE)
        for sample, label in zip(samples, labels, strict=True):
            sample.label = label
        return (samples, 16, f"edge model CLS attention ({IMAGENETTE_EDGE}, last block, mean over heads), "
                f"images at the server's input size {pre.input_size} px")
    ds = datasets.load("cifar10/test.tar").spread(limit)
    pixels = [np.asarray(datasets.decode_rgb(s.data), dtype=np.uint8) for s in ds.samples]
    labels = [-1 if s.label is None else s.label for s in ds.samples]
    patch = 4
    if (ZOO_DIR / "cifar10-edge.safetensors").is_file():
        samples = _edge_attention(pixels, "zoo:cifar10-edge")
        how = "edge model CLS attention (zoo:cifar10-edge, last block, mean over heads)"
    else:
        samples = [Sample(px, gradient_energy(px, patch), *STANDIN_TOPK) for px in pixels]
        how = "gradient-energy stand-in (zoo:cifar10-edge not available)"
    for sample, label in zip(samples, labels, strict=True):
        sample.label = label
    return samples, patch, how


def classifier_ref(dataset: str) -> str | None:
    """The zoo model that classifies decoded patches, if there is one for this dataset."""
    # Only the server: its subset forward is CLS + patches (the edge carries register tokens).
    ref = {"cifar10": "zoo:cifar10-server", "imagenette": IMAGENETTE_SERVER}.get(dataset)
    return ref if ref is not None and _zoo_has(ref) else None


def subset_correct(ref: str, patches: np.ndarray, indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per image, whether ``ref`` classifies its kept patches (B, K, p, p, 3) uint8 at ``indices`` (B, K)
    right, with the worker's subset forward."""
    import torch

    from shared.models import build_model
    from shared.subset import forward_subset

    loaded = _model_cache.get(ref) or _model_cache.setdefault(ref, build_model(ref))
    correct = []
    with torch.inference_mode():
        for start in range(0, len(labels), 512):
            x = datasets.normalize(torch.from_numpy(patches[start:start + 512]), loaded.preprocess)
            logits = forward_subset(loaded.model, x, torch.from_numpy(indices[start:start + 512]))
            correct.append(logits.argmax(-1).numpy() == labels[start:start + 512])
    return np.concatenate(correct)


_model_cache: dict[str, Any] = {}


def _edge_attention(pixels: list[np.ndarray], ref: str) -> list[Sample]:
    return [s for s, _ in edge_passes(pixels, ref)]


def edge_passes(pixels: list[np.ndarray], ref: str) -> list[tuple[Sample, np.ndarray]]:
    """The edge model on every image: a sample (CLS attention scores, top-5) and the logits of each."""
    import torch

    from shared.attention import edge_forward
    from shared.models import build_model
    from shared.scores import cls_attention_scores

    loaded = build_model(ref, role="edge")
    out: list[tuple[Sample, np.ndarray]] = []
    with torch.inference_mode():
        for start in range(0, len(pixels), 256):
            batch = torch.from_numpy(np.stack(pixels[start:start + 256]))
            result = edge_forward(loaded.model, datasets.normalize(batch, loaded.preprocess))
            scores = cls_attention_scores(result.cls_attention).numpy()
            logits = result.logits.float()
            probs, ids = torch.softmax(logits, dim=-1).topk(5, dim=-1)
            for i in range(batch.shape[0]):
                out.append((Sample(pixels[start + i], scores[i], tuple(int(v) for v in ids[i]),
                                   tuple(float(v) for v in probs[i])), logits[i].numpy()))
    return out


# ---- the deployed view: one operating point of `patchcast eval`, the whole split --------------------

OFFLOADED_BOUND, ALL_BOUND = 0.75, 0.30  # issue targets: patch requests vs the same images as full JPEGs


def operating_point(summary_path: Path, key: str) -> dict[str, Any]:
    """``key`` (e.g. ``best_point``) of a ``patchcast eval`` summary: a deployable edge-attention point."""
    summary = json.loads(summary_path.read_text())
    point = summary.get(key)
    if not point:
        raise SystemExit(f"{summary_path}: no {key!r} operating point")
    if point["encoder"] != "edge" or point["score"] != "attention" or point["rule"] in ("none", "full"):
        raise SystemExit(f"{summary_path}: {key} is {point['description']}; need an edge-attention selection")
    return {**point, "server_accuracy": summary["server"]["accuracy"], "eval_images": summary["images"],
            "summary": str(summary_path), "key": key}


def deployed_bytes(point: dict[str, Any], codec: str, quality: int, limit: int | None,
                   progress: Progress) -> dict[str, Any]:
    """Every image through the point's gate; each offloaded one as its real ``PatchRequest`` (the kept
    patches by the edge's attention, ``codec`` at ``quality``), each image also as a full JPEG q90."""
    import torch

    from shared.gates import Gate
    from shared.selection import SelectionRule, select

    pixels, _, pre = imagenette_pixels(limit)
    passes = edge_passes(pixels, IMAGENETTE_EDGE)
    logits = torch.from_numpy(np.stack([lg for _, lg in passes]))
    gate = Gate(point["gate"], point["eta"]) if point["gate"] != "none" else None
    send = gate.should_send(logits).numpy() if gate else np.ones(len(passes), dtype=bool)
    u = gate.uncertainty(logits).numpy() if gate else np.zeros(len(passes))
    rule = SelectionRule(point["rule"], point["value"])
    params = codecs.quality_params(codecs.get_codec(codec), quality)
    full = np.zeros(len(passes), dtype=np.int64)
    same_q = np.zeros(len(passes), dtype=np.int64)  # the full JPEG at the requests' own quality
    sent = np.zeros(len(passes), dtype=np.int64)
    kept = np.zeros(len(passes), dtype=np.int64)
    task = progress.add_task("operating point", total=len(passes))
    for i, (s, _) in enumerate(passes):
        full[i] = len(full_jpeg(s.pixels)[0])
        same_q[i] = full[i] if quality == BASELINE_QUALITY else len(jpeg_file(s.pixels, quality))
        if send[i]:
            indices = select(s.scores, rule).indices
            now = time.time()
            request = P.build_request(
                device_id="cam-0001", request_id=f"{i:08x}", pixels=s.pixels, indices=indices, patch_size=16,
                codec=codec, codec_params=params, scores=s.scores[indices], topk_ids=s.topk_ids,
                topk_probs=s.topk_probs, uncertainty=float(u[i]), uncertainty_kind=point["gate"]
                if point["gate"] != "none" else "min_entropy", sent_at=now, deadline=now + 2.0)
            sent[i] = len(P.encode(request))
            kept[i] = indices.size
        progress.advance(task)
    n_off = int(send.sum())
    all_ratio = float(sent.sum() / full.sum())
    off_ratio = float(sent.sum() / full[send].sum()) if n_off else 0.0
    return {"point": point, "codec": codec, "codec_params": params, "images": len(passes),
            "image": f"{pre.input_size}x{pre.input_size}", "offloaded": n_off,
            "mean_kept_patches": float(kept[send].mean()) if n_off else 0.0,
            "request_bytes": int(sent.sum()), "full_jpeg_bytes_all": int(full.sum()),
            "full_jpeg_bytes_offloaded": int(full[send].sum()), "full_jpeg_mean_bytes": float(full.mean()),
            "vs_full_jpeg_all_images": all_ratio, "vs_full_jpeg_offloaded_images": off_ratio,
            "quality": quality, "vs_same_quality_all_images": float(sent.sum() / same_q.sum()),
            "vs_same_quality_offloaded_images": float(sent.sum() / same_q[send].sum()) if n_off else 0.0}


def deployed_lines(d: dict[str, Any]) -> list[str]:
    p = d["point"]
    return [
        f"Operating point `{p['key']}` of `{p['summary']}`: {p['description']}: {p['accuracy'] * 100:.2f} % "
        f"(server-only {p['server_accuracy'] * 100:.2f} %, {p['eval_images']} images), comm cost "
        f"{p['comm_cost']:.3f}.",
        f"Deployed on {d['images']} images ({d['image']}): {d['offloaded']} offloaded "
        f"({d['offloaded'] / d['images']:.1%}), {d['mean_kept_patches']:.1f} patches each on average, "
        f"`{d['codec']}` {d['codec_params']}; request messages {d['request_bytes']:,} B; full-image JPEG "
        f"q{BASELINE_QUALITY} files: every image {d['full_jpeg_bytes_all']:,} B "
        f"(mean {d['full_jpeg_mean_bytes']:.0f} B), the offloaded images {d['full_jpeg_bytes_offloaded']:,} B.",
        f"All request bytes vs every image as full JPEG: {d['vs_full_jpeg_all_images']:.1%} "
        f"(target ≤ {ALL_BOUND:.0%}): {'PASS' if d['vs_full_jpeg_all_images'] <= ALL_BOUND else 'FAIL'}",
        f"Offloaded images' patch requests vs the same images as full JPEG: "
        f"{d['vs_full_jpeg_offloaded_images']:.1%} (target ≤ {OFFLOADED_BOUND:.0%}): "
        + ("n/a (no image offloaded)" if not d["offloaded"] else
           "PASS" if d["vs_full_jpeg_offloaded_images"] <= OFFLOADED_BOUND else "FAIL"),
    ] + ([] if d.get("quality", BASELINE_QUALITY) == BASELINE_QUALITY else [
        f"Against full-image JPEG files at the requests' own quality q{d['quality']} instead (what patch "
        f"selection and the gate save at equal quality): all images {d['vs_same_quality_all_images']:.1%}, "
        f"the offloaded images {d['vs_same_quality_offloaded_images']:.1%}"])


def ring_mask(patch: int) -> np.ndarray:
    ring = np.ones((patch, patch), dtype=bool)
    ring[1:-1, 1:-1] = False
    return ring


def psnr_db(diff: np.ndarray) -> float:
    mse = float(np.mean(diff**2)) if diff.size else 0.0
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * np.log10(255.0**2 / mse))


def quality(decoded: np.ndarray, original: np.ndarray, top: np.ndarray) -> dict[str, float]:
    """PSNR (dB, capped) over the kept patches and over its top / bottom half by selection score (``top``
    marks the top half, the high tier of jpeg-tiered), and MAE on the 1-px border ring and the interior."""
    diff = decoded.astype(np.float64) - original.astype(np.float64)
    ring = ring_mask(original.shape[1])
    absdiff = np.abs(diff)
    return {"psnr": psnr_db(diff), "psnr_top": psnr_db(diff[top]), "psnr_bottom": psnr_db(diff[~top]),
            "ring_mae": float(absdiff[:, ring].mean()), "inner_mae": float(absdiff[:, ~ring].mean())}


def jpeg_file(pixels: np.ndarray, quality: int) -> bytes:
    """``pixels`` as a JPEG file at ``quality``, 4:2:0 (the baseline's settings at another quality)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality, subsampling=2)
    return buf.getvalue()


def full_jpeg(pixels: np.ndarray) -> tuple[bytes, float, np.ndarray, float]:
    t0 = time.perf_counter()
    data = jpeg_file(pixels, BASELINE_QUALITY)
    t1 = time.perf_counter()
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    t2 = time.perf_counter()
    return data, (t1 - t0) * 1e3, decoded, (t2 - t1) * 1e3


def run_dataset(dataset: str, samples: list[Sample], patch: int, specs: list[CodecSpec],
                fractions: tuple[float, ...], progress: Progress) -> dict[str, Any]:
    rec: Records = defaultdict(lambda: defaultdict(list))
    base: dict[str, list[float]] = defaultdict(list)
    classifier = classifier_ref(dataset)
    # Decoded kept patches per (fraction, codec), for the accuracy check; k is fixed per fraction.
    decoded_sets: dict[tuple[float, str], list[np.ndarray]] = defaultdict(list)
    index_sets: dict[float, list[np.ndarray]] = defaultdict(list)
    task = progress.add_task(dataset, total=len(samples))
    for i, s in enumerate(samples):
        h, w, _ = s.pixels.shape
        n = (h // patch) * (w // patch)
        jpeg, enc_ms, jpeg_pixels, dec_ms = full_jpeg(s.pixels)
        base["bytes"].append(len(jpeg))
        base["bytes_tableless"].append(len(codecs.jpeg_encode_stripped(s.pixels, BASELINE_QUALITY, 420)))
        base["encode_ms"].append(enc_ms)
        base["decode_ms"].append(dec_ms)
        for f in fractions:
            k = max(1, round(f * n))
            indices = np.sort(np.argsort(-s.scores, kind="stable")[:k])
            original = codecs.extract_patches(s.pixels, indices, patch)
            if classifier:
                index_sets[f].append(indices)
                decoded_sets[(f, "original (lossless)")].append(original)
            top = np.zeros(k, dtype=bool)
            top[np.argsort(-s.scores[indices], kind="stable")[:(k + 1) // 2]] = True
            ref = rec[(f, "full-image JPEG q90 (reference)")]
            reference = codecs.extract_patches(jpeg_pixels, indices, patch)
            for key, value in quality(reference, original, top).items():
                ref[key].append(value)
            if classifier:
                decoded_sets[(f, "full-image JPEG q90 (reference)")].append(reference)
            for spec in specs:
                sent_at = time.time()
                t0 = time.perf_counter()
                request = P.build_request(
                    device_id="cam-0001", request_id=f"{i:08x}", pixels=s.pixels, indices=indices,
                    patch_size=patch, codec=spec.name, codec_params=spec.params, scores=s.scores[indices],
                    topk_ids=s.topk_ids, topk_probs=s.topk_probs, uncertainty=1.234567,
                    uncertainty_kind="min_entropy", sent_at=sent_at, deadline=sent_at + 2.0)
                data = P.encode(request)
                t1 = time.perf_counter()
                decoded = P.decode_patches(P.decode_request(data))
                t2 = time.perf_counter()
                r = rec[(f, spec.label)]
                r["bytes"].append(len(data))
                r["payload"].append(len(request.payload))
                r["ratio"].append(len(data) / len(jpeg))
                r["encode_ms"].append((t1 - t0) * 1e3)
                r["decode_ms"].append((t2 - t1) * 1e3)
                for key, value in quality(decoded, original, top).items():
                    r[key].append(value)
                if classifier:
                    decoded_sets[(f, spec.label)].append(decoded)
        progress.advance(task)
    result = summarise(dataset, samples, patch, rec, base, fractions)
    if classifier:
        labels = np.array([s.label for s in samples])
        correct = {key: subset_correct(classifier, np.stack(sets), np.stack(index_sets[key[0]]), labels)
                   for key, sets in decoded_sets.items()}
        for row in result["rows"]:
            row_key = (row["fraction"], row["codec"])
            if row_key in correct:
                mine, lossless = correct[row_key], correct[(row["fraction"], "original (lossless)")]
                # Paired comparison on the same images: SE of the difference from the discordant pairs.
                row["accuracy"] = float(mine.mean())
                row["accuracy_delta"] = float(mine.mean() - lossless.mean())
                row["accuracy_delta_ci95"] = 1.96 * float(np.sqrt(np.sum(mine != lossless))) / len(labels)
        result["classifier"] = classifier
    return result


Records = dict[tuple[float, str], dict[str, list[float]]]


def summarise(dataset: str, samples: list[Sample], patch: int, rec: Records, base: dict[str, list[float]],
              fractions: tuple[float, ...]) -> dict[str, Any]:
    mean = statistics.fmean
    base_mean = mean(base["bytes"])
    rows = []
    for (f, label), r in rec.items():
        row: dict[str, Any] = {"fraction": f, "codec": label}
        if "bytes" in r:
            spec = parse_spec(label)
            codec = codecs.get_codec(spec.name)
            params = codec.resolve_params(spec.params)
            row.update(
                lossless=codec.lossless, params=params,
                # Comparable with the baseline: every kept patch at the baseline's quality (or exact).
                baseline_quality=codec.lossless or (params.get("q") == BASELINE_QUALITY
                                                    and "q2" not in params),
                mean_bytes=mean(r["bytes"]), median_bytes=statistics.median(r["bytes"]),
                mean_payload=mean(r["payload"]), envelope_bytes=mean(r["bytes"]) - mean(r["payload"]),
                vs_baseline=mean(r["bytes"]) / base_mean, median_ratio=statistics.median(r["ratio"]),
                encode_ms=mean(r["encode_ms"]), decode_ms=mean(r["decode_ms"]))
        row.update(psnr_db=mean(r["psnr"]), psnr_top=mean(r["psnr_top"]), psnr_bottom=mean(r["psnr_bottom"]),
                   ring_mae=mean(r["ring_mae"]), inner_mae=mean(r["inner_mae"]))
        rows.append(row)
    h, w, _ = samples[0].pixels.shape
    return {
        "dataset": dataset, "images": len(samples), "image": f"{h}x{w}", "patch": patch,
        "num_patches": (h // patch) * (w // patch), "fractions": list(fractions),
        "baseline": {"mean_bytes": base_mean, "median_bytes": statistics.median(base["bytes"]),
                     "mean_bytes_tableless": mean(base["bytes_tableless"]),
                     "encode_ms": mean(base["encode_ms"]), "decode_ms": mean(base["decode_ms"])},
        "rows": rows,
    }


def machine() -> dict[str, Any]:
    return {**machine_info(torch=False),
            "pillow": Image.__version__ if hasattr(Image, "__version__") else "?",
            "libjpeg_turbo": features.version("libjpeg_turbo") or features.version("jpg"),
            "libwebp": features.version("webp"), "loadavg_at_start": os.getloadavg()[0]}


def headline(result: dict[str, Any]) -> str:
    b = result["baseline"]
    return (f"{result['images']} images, {result['image']}, patch {result['patch']} ({result['num_patches']} "
            f"patches), selection: {result['selection']}. "
            f"Baseline: full-image JPEG q{BASELINE_QUALITY} 4:2:0, "
            f"mean {b['mean_bytes']:.0f} B, median {b['median_bytes']:.0f} B (the same JPEG without its "
            f"tables: {b['mean_bytes_tableless']:.0f} B); encode {b['encode_ms']:.2f} ms, "
            f"decode {b['decode_ms']:.2f} ms."
            + (f" Accuracy: {result['classifier']} on the decoded kept patches (subset forward)."
               if "classifier" in result else ""))


COLUMNS = ("kept", "codec", "mean B", "median B", "mean vs JPEG", "median ratio", "enc ms", "dec ms",
           "PSNR dB", "PSNR top / bottom half", "ring / inner MAE")


def columns(result: dict[str, Any]) -> tuple[str, ...]:
    return COLUMNS + (("accuracy (Δ vs lossless ± 95 %)",) if "classifier" in result else ())


def row_cells(r: dict[str, Any], with_accuracy: bool) -> list[str]:
    kept = f"{r['fraction']:.0%}"
    acc = []
    if with_accuracy:
        acc = [f"{r['accuracy']:.1%} ({r['accuracy_delta'] * 100:+.1f} ± {r['accuracy_delta_ci95'] * 100:.1f})"
               if "accuracy" in r else ""]
    if "mean_bytes" not in r:  # the quality reference: no bytes of its own at this fraction
        return [kept, r["codec"], "", "", "", "", "", "", f"{r['psnr_db']:.2f}",
                f"{r['psnr_top']:.2f} / {r['psnr_bottom']:.2f}",
                f"{r['ring_mae']:.2f} / {r['inner_mae']:.2f}", *acc]
    exact = r["lossless"]
    return [kept, r["codec"], f"{r['mean_bytes']:.0f}", f"{r['median_bytes']:.0f}", f"{r['vs_baseline']:.1%}",
            f"{r['median_ratio']:.1%}", f"{r['encode_ms']:.2f}", f"{r['decode_ms']:.2f}",
            "exact" if exact else f"{r['psnr_db']:.2f}",
            "exact" if exact else f"{r['psnr_top']:.2f} / {r['psnr_bottom']:.2f}",
            "0 / 0" if exact else f"{r['ring_mae']:.2f} / {r['inner_mae']:.2f}", *acc]


def sorted_rows(result: dict[str, Any], fraction: float) -> list[dict[str, Any]]:
    rows = [r for r in result["rows"] if r["fraction"] == fraction]
    return sorted(rows, key=lambda r: r.get("mean_bytes", 0))


def print_tables(console: Console, result: dict[str, Any]) -> None:
    console.print(f"\n[bold]{result['dataset']}[/]: {headline(result)}")
    for f in result["fractions"]:
        table = Table(title=f"{result['dataset']}: {f:.0%} of patches kept")
        for col in columns(result):
            table.add_column(col, justify="left" if col in ("kept", "codec") else "right")
        for r in sorted_rows(result, f):
            table.add_row(*row_cells(r, "classifier" in result))
        console.print(table)


def markdown(result: dict[str, Any]) -> str:
    cols = columns(result)
    lines = [f"**{result['dataset']}**: {headline(result)}", "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    for f in result["fractions"]:
        lines += ["| " + " | ".join(row_cells(r, "classifier" in result)) + " |" for r in sorted_rows(result, f)]
    return "\n".join(lines)


def acceptance(result: dict[str, Any]) -> list[str]:
    out = []
    for f, bound in ((0.75, 1.0), (0.32, 0.45)):
        rows = [r for r in result["rows"]
                if r["fraction"] == f and "mean_bytes" in r and r["baseline_quality"]]
        if not rows:
            continue
        best = min(rows, key=lambda r: r["mean_bytes"])
        ok = best["vs_baseline"] < bound if bound == 1.0 else best["vs_baseline"] <= bound
        out.append(f"{result['dataset']} {f:.0%} kept: smallest codec with every kept patch at "
                   f"q{BASELINE_QUALITY}: {best['codec']} {best['mean_bytes']:.0f} B = "
                   f"{best['vs_baseline']:.1%} of the JPEG baseline (target {'<' if bound == 1.0 else '≤'} "
                   f"{bound:.0%}): {'PASS' if ok else 'FAIL'}")
    return out


def write_outputs(args: argparse.Namespace, argv: list[str] | None, info: dict[str, Any],
                  results: list[dict[str, Any]], deployed: dict[str, Any] | None = None) -> None:
    command = "python bench/bytes.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.json:
        args.json.write_text(json.dumps({"command": command, "machine": info, "results": results,
                                         "operating_point": deployed}, indent=1))
    if args.markdown:
        args.markdown.write_text("\n\n".join([f"`{command}`", *(markdown(r) for r in results),
                                              *(line for r in results for line in acceptance(r)),
                                              *(deployed_lines(deployed) if deployed else [])]) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=["imagenette", "cifar10", "both", "none"], default="both",
                    help="the per-codec tables: Imagenette val photos, CIFAR-10, both, or none (only "
                    "--operating-point)")
    ap.add_argument("--limit", type=int, default=None,
                    help="images per dataset (default: Imagenette 1000, CIFAR 3000)")
    ap.add_argument("--operating-point", type=Path, default=None, metavar="SUMMARY.json",
                    help="a `patchcast eval` summary of the Imagenette zoo: measure that point deployed, on "
                    "every val image (or --point-limit)")
    ap.add_argument("--point", default="best_point", help="which point of the summary (e.g. best_point_by_bytes)")
    ap.add_argument("--point-limit", type=int, default=None, help="images for --operating-point (default: all)")
    ap.add_argument("--point-codec", default="jpeg-mosaic", help="codec of the deployed requests (codec.name)")
    ap.add_argument("--point-quality", type=int, default=90, help="its quality (codec.quality)")
    ap.add_argument("--codecs", default=" ".join(DEFAULT_CODECS),
                    help="space-separated codec specs, e.g. 'jpeg jpeg:ss=444 webp'")
    ap.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    ap.add_argument("--json", type=Path, default=None, help="write all results as JSON here")
    ap.add_argument("--markdown", type=Path, default=None, help="write markdown tables here")
    args = ap.parse_args(argv)

    specs = [parse_spec(t) for t in args.codecs.split()]
    fractions = tuple(float(f) for f in args.fractions.split(","))
    console = Console(width=None if sys.stdout.isatty() else 150)
    info = machine()
    console.print(f"machine: {info}")
    results = []
    names = {"both": ["imagenette", "cifar10"], "none": []}.get(args.dataset, [args.dataset])
    for name in names:
        limit = args.limit if args.limit is not None else (1000 if name == "imagenette" else 3000)
        samples, patch, how = load_samples(name, limit)
        console.print(f"{name}: patches chosen by {how}")
        bar = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*bar, console=console) as progress:
            result = run_dataset(name, samples, patch, specs, fractions, progress)
        result["selection"] = how
        print_tables(console, result)
        results.append(result)
        write_outputs(args, argv, info, results)  # after each dataset: a long run keeps what it measured
    deployed = None
    if args.operating_point is not None:
        point = operating_point(args.operating_point, args.point)
        bar = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*bar, console=console) as progress:
            deployed = deployed_bytes(point, args.point_codec, args.point_quality, args.point_limit, progress)
        write_outputs(args, argv, info, results, deployed)
    for r in results:
        for line in acceptance(r):
            console.print(line)
    for line in deployed_lines(deployed) if deployed else []:
        console.print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
