"""The edge model side of a device: images in, decisions (keep or send which patches) out.

Synchronous and CPU-bound; the fleet runs it in one executor thread, batched across devices.
Per image: decode + center-crop (the uint8 pixels a device owns), edge ViT forward with CLS
attention, gate on the logits' uncertainty, select patches by attention score, encode the kept
patches with the configured codec.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shared.attention import EdgeOutput, edge_forward
from shared.codecs import full_image_payload_bytes, get_codec, quality_params
from shared.config import CodecConfig, GateConfig, RegionConfig, SelectionConfig
from shared.datasets import Sample, Uint8Normalizer, crop_uint8, decode_rgb
from shared.errors import ConfigError
from shared.gates import Gate
from shared.models import LoadedModel
from shared.region import downsample, global_patch_size
from shared.scores import scores_float64
from shared.selection import Selection, SelectionRule, select_batch

TOPK = 5
_LN2 = math.log(2.0)  # as shared.gates


@dataclass(frozen=True)
class EdgeDecision:
    """What the edge made of one image. ``payload`` and ``indices`` are set only when ``send``."""

    edge_label: int
    topk_ids: tuple[int, ...]
    topk_probs: tuple[float, ...]
    uncertainty: float
    send: bool
    height: int
    width: int
    patch_size: int
    num_patches: int
    indices: np.ndarray | None = None
    payload: bytes | None = None
    edge_ms: float = 0.0  # this image's share of the batch's edge compute
    # bytes of the same image as a full-image JPEG payload (what a device without patch selection
    # would send); measured only for images that are sent, and only when asked for
    full_payload_bytes: int | None = None
    # Region retransmission (edge.offload = "region"): the payload is the whole image downsampled by
    # ``downscale`` (height, width and patch_size describe that image), and ``pixels`` is the
    # full-resolution image the device keeps until the exchange ends.
    downscale: int | None = None
    pixels: np.ndarray | None = None
    # The server's top-up (edge.offload = "top_up"): the offered patches (sorted, every sent one in them and
    # more), and ``pixels`` held until the worker has answered or asked for the rest.
    offer: np.ndarray | None = None

    @property
    def kept(self) -> int:
        return 0 if self.indices is None else int(self.indices.size)


@dataclass(frozen=True)
class EdgeGate:
    """The gate's verdict on one batch: which images go to a worker, with each image's top-k."""

    send: list[int]  # batch positions of the images the gate sends
    uncertainty: list[float]
    topk_ids: list[tuple[int, ...]]
    topk_probs: list[tuple[float, ...]]


def codec_params(config: CodecConfig) -> dict[str, int]:
    """The codec config as wire params: ``quality`` goes to codecs that have a ``q`` parameter."""
    return quality_params(get_codec(config.name), config.quality)


class EdgeEngine:
    """A loaded edge ViT with the gate, selection rule and codec a device applies."""

    def __init__(self, loaded: LoadedModel, gate: GateConfig, selection: SelectionConfig,
                 codec: CodecConfig, *, measure_full_bytes: bool = False,
                 region: RegionConfig | None = None, top_up: bool = False) -> None:
        """``region``: offload by region retransmission (a downsampled glance, then the region a worker
        asks for) instead of attention-chosen patches. ``top_up``: each sent image also offers
        ``selection.offer_rule``'s patches (the server's top-up)."""
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.gate = Gate(gate.kind, gate.threshold)
        self.rule = SelectionRule(selection.rule, selection.value, spread=selection.spread)
        self.score_kind = selection.score
        self.offer: SelectionRule | None = None  # None with top_up: every patch is offered
        self.top_up = top_up
        if top_up and region is not None:
            raise ConfigError("edge.offload is either 'region' or 'top_up'")
        if top_up and selection.offer_rule != "all":
            self.offer = SelectionRule(selection.offer_rule, selection.offer_value, spread=selection.spread)
        self.codec = get_codec(codec.name)
        self.codec_name = codec.name
        self.codec_params = codec_params(codec)
        self.patch_size = loaded.patch_size
        self.num_patches = loaded.num_patches
        if selection.spread >= 2 and math.isqrt(self.num_patches) ** 2 != self.num_patches:
            raise ConfigError(f"selection.spread needs a square patch grid; {loaded.name} has "
                              f"{self.num_patches} patches")
        self.measure_full_bytes = measure_full_bytes
        self._normalize = Uint8Normalizer(loaded.preprocess)
        self.quality = codec.quality
        self.downscale = None if region is None else region.downscale
        if self.downscale is not None:
            try:
                global_patch_size(self.patch_size, self.downscale)
            except ValueError as exc:
                raise ConfigError(f"edge.offload = 'region': {exc}") from exc

    def pixels(self, sample: Sample) -> np.ndarray:
        """(H, W, 3) uint8: the cropped image as the device holds it."""
        return crop_uint8(decode_rgb(sample.data), self.loaded.preprocess)

    # One image's (or one batch's) path, stage by stage; :meth:`run` chains them, and
    # bench/service_overhead.py (``--edge``) times each one.

    def images(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """The model input: the uint8 images stacked and normalised, (B, 3, H, W) float."""
        return self._normalize(pixels[0][None] if len(pixels) == 1 else np.stack(pixels))

    def forward(self, images: torch.Tensor) -> EdgeOutput:
        """The edge ViT forward with the attention its score kind needs."""
        with torch.inference_mode():
            return edge_forward(self.model, images, all_layers=self.score_kind == "rollout")

    def scores(self, out: EdgeOutput) -> np.ndarray:
        """(B, N) patch scores (computed in float32, each row summing to 1) as float64, as selection takes
        them. Each row depends on its own image only: :meth:`run` scores just the images the gate sends
        (``out.rows(sent)``), the same values as those rows of the whole batch's scores."""
        with torch.inference_mode():
            return scores_float64(out, self.score_kind)

    def gate_topk(self, out: EdgeOutput) -> EdgeGate:
        """The gate's decision and uncertainty, and the top-k of the softmax, for every image.

        The paper's min-entropy gate on the CPU takes :func:`_min_entropy_topk`: two torch ops where
        :func:`_gate_topk` runs eight (each pays its code's cache misses after a forward: ~75 µs per image
        at batch 1), the same values bit for bit."""
        with torch.inference_mode():
            logits = out.logits.float()
            if self.gate.kind == "min_entropy" and logits.device.type == "cpu":
                fast = _min_entropy_topk(logits, self.gate.threshold)
                if fast is not None:
                    return fast
            return _gate_topk(self.gate, logits)

    def select(self, scores: np.ndarray | None, chosen: Sequence[int]) -> dict[int, Selection]:
        """The selection rule applied to the images in ``chosen`` (batch positions of those the gate
        sends); ``scores``: theirs, row j for ``chosen[j]`` (``None`` when none is chosen)."""
        if not chosen:
            return {}
        if scores is None or len(scores) != len(chosen):
            raise ValueError(f"select: {len(chosen)} images chosen, scores for "
                             f"{0 if scores is None else len(scores)}")
        return dict(zip(chosen, select_batch(scores, self.rule), strict=True))

    def payload(self, px: np.ndarray, indices: np.ndarray, scores: np.ndarray) -> bytes:
        """The kept patches of one image as the codec's payload (``scores``: that image's (N,) scores)."""
        return self.codec.encode(px, indices, self.patch_size, self.codec_params, scores=scores[indices])

    def full_bytes(self, px: np.ndarray) -> int | None:
        """Bytes of the whole image as a payload, when ``measure_full_bytes`` (else None)."""
        return full_image_payload_bytes(px, self.patch_size, self.quality) if self.measure_full_bytes else None

    def run(self, samples: Sequence[Sample]) -> list[EdgeDecision]:
        started = time.perf_counter()
        pixels = [self.pixels(s) for s in samples]
        out = self.forward(self.images(pixels))
        gate = self.gate_topk(out)
        # patches are scored only for the images that send them (a region glance sends the whole image)
        chosen = gate.send if self.downscale is None else []
        scores = self.scores(out.rows(chosen)) if chosen else None
        selections = self.select(scores, chosen)
        sent, row = set(gate.send), {i: j for j, i in enumerate(chosen)}  # row: image → its row of scores
        h, w = pixels[0].shape[:2]
        decisions: list[EdgeDecision | dict[str, Any]] = []  # an image's decision, or the fields of one
        for i, px in enumerate(pixels):
            ids, probs, unc = gate.topk_ids[i], gate.topk_probs[i], gate.uncertainty[i]
            indices = payload = None
            full_bytes = None
            if i in sent and self.downscale is not None:
                decisions.append(self._glance(ids, probs, unc, px))
                continue
            offer = None
            if i in sent:
                assert scores is not None
                indices = np.asarray(selections[i].indices, dtype=np.int64)
                payload = self.payload(px, indices, scores[row[i]])
                full_bytes = self.full_bytes(px)
                if self.top_up:
                    offer = self.offered(indices, scores[row[i]])
            decisions.append(dict(
                edge_label=ids[0], topk_ids=ids, topk_probs=probs, uncertainty=unc, send=i in sent,
                height=h, width=w, patch_size=self.patch_size, num_patches=self.num_patches, indices=indices,
                payload=payload, full_payload_bytes=full_bytes, offer=offer,
                pixels=px if offer is not None else None))
        share = (time.perf_counter() - started) * 1000.0 / max(len(samples), 1)
        return [_with_ms(d, share) if isinstance(d, EdgeDecision) else EdgeDecision(**d, edge_ms=share)
                for d in decisions]

    def offered(self, indices: np.ndarray, scores: np.ndarray) -> np.ndarray | None:
        """The top-up's offer for one sent image: the sent patches and ``selection.offer_rule``'s on the same
        (N,) scores, sorted; ``None`` when that adds no patch (nothing more to offer)."""
        if self.offer is None:
            extra = np.arange(self.num_patches, dtype=np.int64)
        else:
            extra = np.asarray(select_batch(scores[None], self.offer)[0].indices, dtype=np.int64)
        offer = np.union1d(indices, extra)
        return offer if offer.size > indices.size else None

    def _glance(self, ids: tuple[int, ...], probs: tuple[float, ...], uncertainty: float,
                px: np.ndarray) -> EdgeDecision:
        """A region exchange's first message: the whole image, box-downsampled, every patch kept."""
        assert self.downscale is not None
        small = downsample(px, self.downscale)
        p = global_patch_size(self.patch_size, self.downscale)
        indices = np.arange(self.num_patches, dtype=np.int64)  # the downsampled grid is the model's grid
        payload = self.codec.encode(small, indices, p, self.codec_params)
        full_bytes = self.full_bytes(px)
        return EdgeDecision(
            edge_label=ids[0], topk_ids=ids, topk_probs=probs, uncertainty=uncertainty,
            send=True, height=small.shape[0], width=small.shape[1], patch_size=p, num_patches=self.num_patches,
            indices=indices, payload=payload, full_payload_bytes=full_bytes, downscale=self.downscale, pixels=px)


def _gate_topk(gate: Gate, logits: torch.Tensor) -> EdgeGate:
    """:meth:`EdgeEngine.gate_topk` for any gate, in torch (call under ``torch.inference_mode``)."""
    send, unc = gate.decide(logits)
    probs = torch.softmax(logits, dim=-1)
    top_p, top_i = probs.topk(min(TOPK, probs.shape[-1]), dim=-1)
    return EdgeGate(send=[i for i, sent in enumerate(send.tolist()) if sent], uncertainty=unc.tolist(),
                    topk_ids=[tuple(row) for row in top_i.tolist()],
                    topk_probs=[tuple(row) for row in top_p.tolist()])


def _min_entropy_topk(logits: torch.Tensor, threshold: float) -> EdgeGate | None:
    """:meth:`EdgeEngine.gate_topk` for the min-entropy gate on float32 CPU logits (B, C), with torch only
    for the log-softmax and the softmax, the rest in plain Python on their values; ``None`` where the
    general path must decide (NaN, or a tie among the top k + 1 probabilities, whose order ``torch.topk``
    leaves to its implementation).

    The same values as :func:`_gate_topk`, bit for bit (``tests/core/test_edge_gate_fast.py``): the
    maximum and the negation are exact; the float32 quotient −max / ln 2 is the float64 quotient of the
    same float32 operands rounded to float32, which is the correctly rounded float32 quotient (53 ≥ 2·24 + 2
    bits); and torch compares a float32 tensor with a Python float in float32, so η is rounded to float32."""
    logp = torch.log_softmax(logits, dim=-1).tolist()  # shared.gates._log_probs
    rows = torch.softmax(logits, dim=-1).tolist()
    k = min(TOPK, logits.shape[-1])
    eta = _float32(threshold)
    gate = EdgeGate(send=[], uncertainty=[], topk_ids=[], topk_probs=[])
    for i, (row, logp_row) in enumerate(zip(rows, logp, strict=True)):
        if any(p != p for p in row):  # NaN: torch.topk ranks it first; leave it to torch
            return None
        order = sorted(range(len(row)), key=row.__getitem__, reverse=True)[: k + 1]
        top = [row[j] for j in order]
        if len(set(top)) < len(top):
            return None
        u = _float32(-max(logp_row) / _LN2_F32)
        if u >= eta:
            gate.send.append(i)
        gate.uncertainty.append(u)
        gate.topk_ids.append(tuple(order[:k]))
        gate.topk_probs.append(tuple(top[:k]))
    return gate


def _float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even; ±inf beyond its range, as torch), as a Python float."""
    try:
        return float(_F32.unpack(_F32.pack(x))[0])
    except OverflowError:
        return math.copysign(math.inf, x)


_F32 = struct.Struct("f")
_LN2_F32 = _float32(_LN2)  # the float32 ln 2 torch divides by


def _with_ms(decision: EdgeDecision, ms: float) -> EdgeDecision:
    from dataclasses import replace

    return replace(decision, edge_ms=ms)
