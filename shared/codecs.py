"""Patch codecs: how the kept patches of one image become the request payload, and back.

A codec encodes the kept patches of an (H, W, 3) uint8 image and decodes a payload into exactly
those patches, ``(K, p, p, 3)`` uint8 in index order. The set of kept patches (``indices``) and the
image geometry travel outside the payload (the request's bitmask and fields), so payloads hold
pixels only.

Payloads are untrusted on the decoding side. ``Codec.decode`` validates its inputs, knows the exact
output size before it decompresses anything (so a decompression bomb is refused from its header),
wraps every parser failure in :class:`~shared.errors.BadPayloadError` and checks the result shape.

Layouts for image formats:

* ``canvas``: the full image with unkept patches filled grey. 16×16 patches align with JPEG 4:2:0
  MCUs and WebP macroblocks, so a blank patch costs about 1.5 bytes and kept patches keep their
  real neighbours.
* ``mosaic``: the kept patches packed row-major into a ``cols = W / p`` wide grid (last row padded
  grey). Better when patches are smaller than a DCT block (CIFAR's 4×4).
* ``box``: the canvas cropped to the bounding box of the kept patches (unkept ones inside it grey).
  A region exchange's window is exactly its box: the crop, with no blank patch at all.

JPEG payloads carry no tables: both sides rebuild the header (IJG quality-scaled tables, standard
Huffman tables of ITU-T T.81 Annex K, SOF from the geometry); the payload starts at the SOS marker.
That saves ~610 bytes per image, which is most of a 32×32 JPEG.
"""

from __future__ import annotations

import io
import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import simplejpeg
import zstandard
from PIL import Image

from shared.errors import (
    BadFieldError,
    BadGeometryError,
    BadMaskError,
    BadPayloadError,
    ProtocolError,
    UnknownCodecError,
)

Params = Mapping[str, int]
Layout = Literal["canvas", "mosaic", "box"]
FILL = 128  # grey: neutral chroma, so 4:2:0 bleeds the least colour into kept patches' borders
MAX_DECODE_PIXELS = 1 << 24  # defence in depth; the protocol limits are far lower
MAX_ZSTD_WINDOW = 1 << 23


@dataclass(frozen=True)
class ParamSpec:
    """One integer codec parameter: its wire key, allowed range (or choices) and default."""

    key: str
    default: int
    lo: int
    hi: int
    help: str
    choices: tuple[int, ...] = ()

    def check(self, value: object) -> int:
        if type(value) is not int:  # bool is an int subclass: refuse it explicitly
            raise BadFieldError(f"codec param {self.key!r} must be an integer, got {type(value).__name__}")
        if self.choices and value not in self.choices:
            raise BadFieldError(f"codec param {self.key!r}={value} not in {self.choices}")
        if not self.lo <= value <= self.hi:
            raise BadFieldError(f"codec param {self.key!r}={value} outside {self.lo}..{self.hi}")
        return value


# ---------------------------------------------------------------------------------------------
# Patch layout helpers (pure numpy)


def grid_of(geometry: tuple[int, int], patch_size: int) -> tuple[int, int]:
    h, w = geometry
    return h // patch_size, w // patch_size


def extract_patches(pixels: np.ndarray, indices: np.ndarray, patch_size: int) -> np.ndarray:
    """Kept patches of an (H, W, 3) image, ``(K, p, p, 3)`` in index order."""
    h, w, _ = pixels.shape
    p = patch_size
    rows, cols = h // p, w // p
    all_patches = pixels.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p, p, 3)
    return np.ascontiguousarray(all_patches[indices])


def canvas_image(patches: np.ndarray, geometry: tuple[int, int], indices: np.ndarray,
                 patch_size: int) -> np.ndarray:
    """An (H, W, 3) image holding ``patches`` at ``indices`` and grey elsewhere."""
    rows, cols = grid_of(geometry, patch_size)
    p = patch_size
    grid = np.full((rows * cols, p, p, 3), FILL, dtype=np.uint8)
    grid[indices] = patches
    return grid.reshape(rows, cols, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * p, cols * p, 3)


def box_of(indices: np.ndarray, geometry: tuple[int, int], patch_size: int) -> tuple[int, int, int, int]:
    """(top row, left column, rows, columns) of the kept patches' bounding box, in patches."""
    _, cols = grid_of(geometry, patch_size)
    r, c = indices // cols, indices % cols
    top, left = int(r.min()), int(c.min())
    return top, left, int(r.max()) - top + 1, int(c.max()) - left + 1


def box_local(indices: np.ndarray, geometry: tuple[int, int], patch_size: int) -> np.ndarray:
    """The kept patches' indices within their bounding box (row-major over the box)."""
    _, cols = grid_of(geometry, patch_size)
    top, left, _, box_cols = box_of(indices, geometry, patch_size)
    return (indices // cols - top) * box_cols + (indices % cols - left)


def box_image(patches: np.ndarray, geometry: tuple[int, int], indices: np.ndarray, patch_size: int) -> np.ndarray:
    """The bounding box of the kept patches, the patches in place and grey between them."""
    _, _, rows, cols = box_of(indices, geometry, patch_size)
    return canvas_image(patches, (rows * patch_size, cols * patch_size), box_local(indices, geometry, patch_size),
                        patch_size)


def mosaic_shape(count: int, geometry: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """(height, width) in pixels of the mosaic of ``count`` patches."""
    _, cols = grid_of(geometry, patch_size)
    return math.ceil(count / cols) * patch_size, cols * patch_size


def mosaic_image(patches: np.ndarray, geometry: tuple[int, int], patch_size: int) -> np.ndarray:
    """Patches packed row-major, ``W / p`` per row, the last row padded grey."""
    k = patches.shape[0]
    p = patch_size
    mh, mw = mosaic_shape(k, geometry, patch_size)
    rows, cols = mh // p, mw // p
    grid = np.full((rows * cols, p, p, 3), FILL, dtype=np.uint8)
    grid[:k] = patches
    return grid.reshape(rows, cols, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(mh, mw, 3)


def split_image(image: np.ndarray, patch_size: int) -> np.ndarray:
    """All patches of an image, row-major: ``(rows * cols, p, p, 3)``."""
    h, w, _ = image.shape
    p = patch_size
    return image.reshape(h // p, p, w // p, p, 3).transpose(0, 2, 1, 3, 4).reshape(-1, p, p, 3)


# ---------------------------------------------------------------------------------------------
# JPEG without tables on the wire


# Natural (row-major) index of each zigzag position.
_ZIGZAG = (
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6,
    7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31,
    39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
)
# ITU-T T.81 Annex K.1 tables (natural order), scaled by quality as libjpeg does.
_LUMA_Q = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)
_CHROMA_Q = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, *([99] * 38),
)
# Annex K.3 Huffman tables as DHT bodies (class/id byte, 16 code counts, symbols): DC0, AC0, DC1, AC1.
_DHT_BODIES = (
    "00" "00010501010101010100000000000000" "000102030405060708090a0b",
    "10" "0002010303020403050504040000017d"
    "01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728"
    "292a3435363738393a434445464748494a535455565758595a636465666768696a737475767778797a83848586878889"
    "8a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2"
    "e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9fa",
    "01" "00030101010101010101010000000000" "000102030405060708090a0b",
    "11" "00020102040403040705040400010277"
    "000102031104052131061241510761711322328108144291a1b1c109233352f0156272d10a162434e125f11718191a"
    "262728292a35363738393a434445464748494a535455565758595a636465666768696a737475767778797a8283848586"
    "8788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9"
    "dae2e3e4e5e6e7e8e9eaf2f3f4f5f6f7f8f9fa",
)
_SOI, _EOI, _SOS = b"\xff\xd8", b"\xff\xd9", b"\xff\xda"


def _segment(marker: int, body: bytes) -> bytes:
    return bytes((0xFF, marker)) + (len(body) + 2).to_bytes(2, "big") + body


def quant_tables(quality: int) -> tuple[list[int], list[int]]:
    """Luma and chroma quantisation tables (natural order) for IJG ``quality`` 1..100, baseline-clamped."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    def scaled(base: tuple[int, ...]) -> list[int]:
        return [min(255, max(1, (v * scale + 50) // 100)) for v in base]
    return scaled(_LUMA_Q), scaled(_CHROMA_Q)


@lru_cache(maxsize=128)
def jpeg_header(height: int, width: int, quality: int, subsampling: int) -> bytes:
    """SOI + DQT + SOF0 + DHT: what a JPEG payload (which starts at SOS) needs in front of it."""
    luma, chroma = quant_tables(quality)
    dqt = b"".join(_segment(0xDB, bytes((tid,)) + bytes(table[i] for i in _ZIGZAG))
                   for tid, table in ((0, luma), (1, chroma)))
    y_sampling = 0x22 if subsampling == 420 else 0x11
    sof = _segment(0xC0, bytes((8,)) + height.to_bytes(2, "big") + width.to_bytes(2, "big")
                   + bytes((3, 1, y_sampling, 0, 2, 0x11, 1, 3, 0x11, 1)))
    dht = b"".join(_segment(0xC4, bytes.fromhex(body)) for body in _DHT_BODIES)
    return _SOI + dqt + sof + dht


def _split_at_sos(data: bytes) -> tuple[bytes, bytes]:
    """A JPEG file → (header segments without APP markers, bytes from SOS to before EOI)."""
    kept = [_SOI]
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xDA:
            if not data.endswith(_EOI):
                break
            return b"".join(kept), data[i:-2]
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if not 0xE0 <= marker <= 0xEF:  # APPn (JFIF, EXIF) carry nothing the decoder needs
            kept.append(data[i:end])
        i = end
    raise BadPayloadError("local JPEG encoder wrote an unexpected stream")


@lru_cache(maxsize=128)
def _encoder_qtables(quality: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """:func:`quant_tables` for the encoder, computed once per quality (Pillow copies what it is given)."""
    luma, chroma = quant_tables(quality)
    return tuple(luma), tuple(chroma)


# What the local encoder writes before the SOS marker, per (height, width, quality, subsampling), once
# checked against the contract's header: a stream that starts with it needs no parse.
_ENCODER_PREFIX: dict[tuple[int, int, int, int], bytes] = {}
_MAX_PREFIXES = 1024


def _saved_jpeg(image: Image.Image, quality: int, subsampling: int) -> bytes:
    """Pillow's public JPEG writer with the contract's tables: the reference."""
    buf = io.BytesIO()
    image.save(buf, "JPEG", qtables=list(_encoder_qtables(quality)), optimize=False, progressive=False,
               subsampling=0 if subsampling == 444 else 2)
    return buf.getvalue()


def _direct_jpeg(image: Image.Image, quality: int, subsampling: int) -> bytes:
    """The same encoder called with the arguments ``save`` builds for it (Pillow ≥ 11's layout: quality -1
    when tables are given, no progression, smoothing or optimisation, RGB kept as YCbCr, no DPI, markers,
    comment, extra or EXIF), without ``save``'s Python layers: a quarter of a small image's encode."""
    luma, chroma = _encoder_qtables(quality)
    return image.tobytes("jpeg", "RGB", -1, False, 0, False, False, 0, (0, 0), 0 if subsampling == 444 else 2,
                         0, 0, [list(luma), list(chroma)], None, b"", b"")


# (quality, subsampling) → whether the direct call wrote exactly the reference's bytes, checked on the
# first image of each: a Pillow whose arguments differ falls back to save, nothing else changes.
_DIRECT_OK: dict[tuple[int, int], bool] = {}


def _jpeg_bytes(image: Image.Image, quality: int, subsampling: int) -> bytes:
    key = (quality, subsampling)
    ok = _DIRECT_OK.get(key)
    if ok:
        return _direct_jpeg(image, quality, subsampling)
    reference = _saved_jpeg(image, quality, subsampling)
    if ok is None:
        try:
            _DIRECT_OK[key] = _direct_jpeg(image, quality, subsampling) == reference
        except Exception:  # an older or newer Pillow's argument layout
            _DIRECT_OK[key] = False
    return reference


def jpeg_encode_stripped(image: np.ndarray, quality: int, subsampling: int) -> bytes:
    """Baseline JPEG of ``image`` with the header removed; refuses if the tables differ from the contract."""
    h, w, _ = image.shape
    data = _jpeg_bytes(Image.frombytes("RGB", (w, h), np.ascontiguousarray(image)), quality, subsampling)
    key = (h, w, quality, subsampling)
    prefix = _ENCODER_PREFIX.get(key)
    if prefix is not None and data.startswith(prefix) and data.endswith(_EOI):
        return data[len(prefix):-2]
    header, payload = _split_at_sos(data)
    if header != jpeg_header(h, w, quality, subsampling):
        raise BadPayloadError("local JPEG encoder's tables differ from protocol v1's; it would not decode")
    if len(_ENCODER_PREFIX) >= _MAX_PREFIXES:
        _ENCODER_PREFIX.clear()
    _ENCODER_PREFIX[key] = data[:len(data) - len(payload) - 2]
    return payload


def jpeg_decode_stripped(payload: bytes, height: int, width: int, quality: int,
                         subsampling: int) -> np.ndarray:
    if not payload.startswith(_SOS):
        raise BadPayloadError("JPEG payload must start with an SOS marker")
    data = jpeg_header(height, width, quality, subsampling) + payload + _EOI
    # libjpeg-turbo straight into a numpy array (simplejpeg; Pillow's own decoder is the same library
    # behind an Image object and twice the CPU). Accurate integer IDCT and fancy upsampling, as Pillow
    # decodes: the pixels are identical (tests/protocol/test_protocol_codecs.py pins it). Strict: a stream that
    # ends early, carries stray bytes or does not decode raises ValueError (Codec.decode: bad_payload)
    # where Pillow would fill in grey; the header is ours, so the size is known before decoding.
    image = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
    if image.shape != (height, width, 3):
        raise BadPayloadError(f"JPEG payload decoded to {image.shape}, expected {(height, width, 3)}")
    return image


def _pil_decode(data: bytes, fmt: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode one image of a known format and size; the size is checked from the header, before decoding."""
    with Image.open(io.BytesIO(data), formats=[fmt]) as img:
        if img.size != (shape[1], shape[0]):
            raise BadPayloadError(f"{fmt} payload is {img.size[0]}×{img.size[1]}, "
                                  f"expected {shape[1]}×{shape[0]}")
        if img.mode != "RGB" or getattr(img, "n_frames", 1) != 1:
            raise BadPayloadError(f"{fmt} payload must be one RGB frame, got mode {img.mode}")
        img.load()
        return np.asarray(img, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Codec interface

# (codec name, params' items, their keys' and values' types) → the params resolved. The types are in the
# key because True == 1 and 90.0 == 90 hash alike while the checks refuse a bool and a float.
_RESOLVED: dict[tuple[str, tuple[tuple[Any, Any], ...], tuple[type, ...], tuple[type, ...]], dict[str, int]] = {}
_MAX_RESOLVED = 256


class Codec(ABC):
    """A named way to put kept patches on the wire. ``encode``/``decode`` validate; subclasses implement
    ``_encode``/``_decode``."""

    name: str
    description: str
    lossless: bool
    param_specs: tuple[ParamSpec, ...] = ()

    def resolve_params(self, params: Mapping[str, object] | None = None) -> dict[str, int]:
        """Defaults filled in, every value checked; unknown keys are refused (a closed schema per codec).
        A new dict each call; what a plain dict resolved to is remembered (:data:`_RESOLVED`)."""
        if type(params) is dict:  # a request's, fresh from msgpack: one lookup for the params devices send
            key = (self.name, tuple(params.items()), tuple(map(type, params)), tuple(map(type, params.values())))
            try:
                hit = _RESOLVED.get(key)
            except TypeError:  # an unhashable value (a list): the checks refuse it
                return self._resolve(params)
            if hit is not None:
                return dict(hit)
            resolved = self._resolve(params)
            if len(_RESOLVED) >= _MAX_RESOLVED:  # many distinct params (a hostile device's): start again
                _RESOLVED.clear()
            _RESOLVED[key] = resolved
            return dict(resolved)
        return self._resolve(params)

    def _resolve(self, params: Mapping[str, object] | None) -> dict[str, int]:
        given = dict(params or {})
        specs = {s.key: s for s in self.param_specs}
        unknown = sorted(set(given) - set(specs))
        if unknown:
            raise BadFieldError(f"codec {self.name!r} has no param(s) {unknown}; known: {sorted(specs)}")
        return {key: spec.check(given.get(key, spec.default)) for key, spec in specs.items()}

    def encode(self, pixels: np.ndarray, indices: np.ndarray | list[int], patch_size: int,
               params: Mapping[str, object] | None = None, *, scores: np.ndarray | None = None) -> bytes:
        """Payload of the kept patches of ``pixels`` ((H, W, 3) uint8). ``indices`` must be sorted and unique;
        ``scores`` (one per kept patch, e.g. attention) is for score-aware codecs; the registered ones
        ignore it (a two-quality JPEG tried in bench/bytes.py did not earn its place)."""
        if (not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3
                or pixels.shape[2] != 3):
            raise BadFieldError("pixels must be an (H, W, 3) uint8 array")
        geometry = (int(pixels.shape[0]), int(pixels.shape[1]))
        idx = check_indices(np.asarray(indices), geometry, patch_size)
        if scores is not None and np.shape(scores) != (idx.size,):
            raise BadFieldError(f"scores must have one value per kept patch ({idx.size}), "
                                f"got {np.shape(scores)}")
        resolved = self.resolve_params(params)
        return self._encode(np.ascontiguousarray(pixels), idx, patch_size, resolved, scores)

    def decode(self, payload: bytes, geometry: tuple[int, int], indices: np.ndarray | list[int],
               patch_size: int, params: Mapping[str, object] | None = None) -> np.ndarray:
        """The kept patches, ``(K, p, p, 3)`` uint8 in index order. Raises only ProtocolError subclasses."""
        resolved = self.resolve_params(params)
        idx = check_indices(np.asarray(indices), geometry, patch_size)
        return self.decode_checked(payload, geometry, idx, patch_size, resolved)

    def decode_checked(self, payload: bytes, geometry: tuple[int, int], idx: np.ndarray, patch_size: int,
                       resolved: dict[str, int]) -> np.ndarray:
        """:meth:`decode` for arguments a validated request already vouches for: ``idx`` int64, sorted,
        unique, in range and not empty (its mask's), ``resolved`` params (its ``codec_params``)."""
        check_geometry(geometry, patch_size)
        if not isinstance(payload, bytes):
            raise BadPayloadError(f"payload must be bytes, got {type(payload).__name__}")
        try:
            out = self._decode(payload, geometry, idx, patch_size, resolved)
        except ProtocolError:
            raise
        except Exception as exc:  # Pillow, zlib and zstd raise a zoo of types on hostile input
            detail = f"{type(exc).__name__}: {exc}"
            raise BadPayloadError(f"{self.name} payload does not decode ({detail})") from exc
        want = (idx.size, patch_size, patch_size, 3)
        if out.shape != want or out.dtype != np.uint8:
            raise BadPayloadError(f"{self.name} payload decoded to {out.shape} {out.dtype}, "
                                  f"expected {want} uint8")
        return out

    @abstractmethod
    def _encode(self, pixels: np.ndarray, indices: np.ndarray, patch_size: int, params: dict[str, int],
                scores: np.ndarray | None) -> bytes: ...

    @abstractmethod
    def _decode(self, payload: bytes, geometry: tuple[int, int], indices: np.ndarray, patch_size: int,
                params: dict[str, int]) -> np.ndarray: ...


def check_geometry(geometry: tuple[int, int], patch_size: int) -> int:
    """Validate an image's geometry against its patch size → the number of patches."""
    h, w = geometry
    if type(patch_size) is not int or patch_size <= 0 or h <= 0 or w <= 0 or h % patch_size or w % patch_size:
        raise BadGeometryError(f"image {h}×{w} is not a positive multiple of patch size {patch_size}")
    if h * w > MAX_DECODE_PIXELS:
        raise BadGeometryError(f"image {h}×{w} exceeds {MAX_DECODE_PIXELS} pixels")
    return (h // patch_size) * (w // patch_size)


def check_indices(indices: np.ndarray, geometry: tuple[int, int], patch_size: int) -> np.ndarray:
    """Validate geometry and kept indices (sorted, unique, in range, at least one) → int64 array."""
    n = check_geometry(geometry, patch_size)
    if indices.ndim != 1 or indices.size == 0 or not np.issubdtype(indices.dtype, np.integer):
        raise BadMaskError("indices must be a non-empty 1-D integer array")
    idx = indices.astype(np.int64, copy=False)  # only read from here on
    if idx[0] < 0 or idx[-1] >= n or (idx.size > 1 and not bool((idx[1:] > idx[:-1]).all())):
        raise BadMaskError(f"indices must be sorted, unique and in 0..{n - 1}")
    return idx


# ---------------------------------------------------------------------------------------------
# Codecs


_LEVEL = {"zlib": ParamSpec("level", 6, 1, 9, "zlib compression level"),
          "zstd": ParamSpec("level", 3, 1, 19, "zstd compression level")}


@dataclass(frozen=True)
class RawCodec(Codec):
    """Patches as raw uint8 bytes, optionally compressed. Lossless; the decompressed size is known exactly."""

    name: str
    compression: Literal["none", "zlib", "zstd"]
    description: str
    lossless: bool = True

    @property
    def param_specs(self) -> tuple[ParamSpec, ...]:  # type: ignore[override]
        return (_LEVEL[self.compression],) if self.compression in _LEVEL else ()

    def _encode(self, pixels: np.ndarray, indices: np.ndarray, patch_size: int, params: dict[str, int],
                scores: np.ndarray | None) -> bytes:
        data = extract_patches(pixels, indices, patch_size).tobytes()
        if self.compression == "zlib":
            return zlib.compress(data, params["level"])
        if self.compression == "zstd":
            return zstandard.ZstdCompressor(level=params["level"], write_content_size=True).compress(data)
        return data

    def _decode(self, payload: bytes, geometry: tuple[int, int], indices: np.ndarray, patch_size: int,
                params: dict[str, int]) -> np.ndarray:
        expected = indices.size * patch_size * patch_size * 3
        if self.compression == "zlib":
            d = zlib.decompressobj()
            data = d.decompress(payload, expected)  # never more than expected bytes
            if not d.eof or d.unconsumed_tail or d.unused_data:
                raise BadPayloadError(f"zlib stream does not end at the expected {expected} bytes")
        elif self.compression == "zstd":
            # The frame header states the content size: refuse a wrong one before allocating anything.
            size = zstandard.frame_content_size(payload)
            if size != expected:
                raise BadPayloadError(f"zstd frame content size {size}, expected {expected}")
            dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
            data = dctx.decompress(payload, max_output_size=expected, allow_extra_data=False)
        else:
            data = payload
        if len(data) != expected:
            raise BadPayloadError(f"raw payload has {len(data)} bytes, expected {expected}")
        return np.frombuffer(data, dtype=np.uint8).reshape(indices.size, patch_size, patch_size, 3).copy()


_Q = ParamSpec("q", 90, 1, 100, "quality")
_SS = ParamSpec("ss", 0, 0, 444, "chroma subsampling 420 or 444; 0 = auto by patch size", choices=(0, 420, 444))


def chroma_subsampling(ss: int, patch_size: int) -> int:
    """The JPEG subsampling a ``ss`` param means; both sides derive it the same way.

    Auto (0): 4:2:0 when 16 divides the patch size, so every patch is whole MCUs and only the 1-px
    border ring sees its neighbours' chroma; 4:4:4 otherwise, where a 16×16 MCU would mix the chroma
    of several unrelated patches (measured on CIFAR-10, 4-px patches: 4:2:0 lost about twice the
    accuracy of 4:4:4 for 8 % fewer bytes; see docs/benchmarks.md).
    """
    if ss:
        return ss
    return 420 if patch_size % 16 == 0 else 444
_WEBP_METHOD = ParamSpec("m", 4, 0, 6, "WebP method (0 fast … 6 small)")
# Lossless WebP at libwebp's defaults takes ~0.4 s per 224 px image; the fastest setting costs ~+20 % bytes.
_WEBP_LL_METHOD = ParamSpec("m", 0, 0, 6, "WebP method (0 fast … 6 small)")
_WEBP_LL_EFFORT = ParamSpec("e", 0, 0, 100, "lossless effort (libwebp 'quality': 0 fast … 100 small)")
_PNG_LEVEL = ParamSpec("level", 6, 0, 9, "PNG zlib level")


@dataclass(frozen=True)
class ImageCodec(Codec):
    """One Pillow image (JPEG, WebP, PNG) of the canvas or the mosaic of kept patches."""

    name: str
    fmt: Literal["JPEG", "WEBP", "WEBP-LOSSLESS", "PNG"]
    layout: Layout
    description: str

    @property
    def lossless(self) -> bool:  # type: ignore[override]
        return self.fmt in ("PNG", "WEBP-LOSSLESS")

    @property
    def param_specs(self) -> tuple[ParamSpec, ...]:  # type: ignore[override]
        return {"JPEG": (_Q, _SS), "WEBP": (_Q, _WEBP_METHOD), "PNG": (_PNG_LEVEL,),
                "WEBP-LOSSLESS": (_WEBP_LL_METHOD, _WEBP_LL_EFFORT)}[self.fmt]

    def _encode(self, pixels: np.ndarray, indices: np.ndarray, patch_size: int, params: dict[str, int],
                scores: np.ndarray | None) -> bytes:
        geometry = (pixels.shape[0], pixels.shape[1])
        patches = extract_patches(pixels, indices, patch_size)
        if self.layout == "canvas":
            image = canvas_image(patches, geometry, indices, patch_size)
        elif self.layout == "box":
            image = box_image(patches, geometry, indices, patch_size)
        else:
            image = mosaic_image(patches, geometry, patch_size)
        if self.fmt == "JPEG":
            return jpeg_encode_stripped(image, params["q"], chroma_subsampling(params["ss"], patch_size))
        buf = io.BytesIO()
        if self.fmt == "WEBP":
            Image.fromarray(image).save(buf, "WEBP", quality=params["q"], method=params["m"])
        elif self.fmt == "WEBP-LOSSLESS":
            Image.fromarray(image).save(buf, "WEBP", lossless=True, quality=params["e"], method=params["m"],
                                        exact=True)
        else:
            Image.fromarray(image).save(buf, "PNG", compress_level=params["level"])
        return buf.getvalue()

    def _decode(self, payload: bytes, geometry: tuple[int, int], indices: np.ndarray, patch_size: int,
                params: dict[str, int]) -> np.ndarray:
        if self.layout == "canvas":
            shape, where = geometry, indices
        elif self.layout == "box":
            _, _, rows, cols = box_of(indices, geometry, patch_size)
            shape, where = (rows * patch_size, cols * patch_size), box_local(indices, geometry, patch_size)
        else:
            shape, where = mosaic_shape(indices.size, geometry, patch_size), None  # the first K, in order
        if self.fmt == "JPEG":
            ss = chroma_subsampling(params["ss"], patch_size)
            image = jpeg_decode_stripped(payload, shape[0], shape[1], params["q"], ss)
        else:
            image = _pil_decode(payload, "PNG" if self.fmt == "PNG" else "WEBP", shape)
        patches = split_image(image, patch_size)
        kept = patches[:indices.size] if where is None else patches[where]
        return kept if kept.flags.writeable else kept.copy()  # never a view of the decoder's read-only buffer


# ---------------------------------------------------------------------------------------------
# Registry


_REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    if codec.name in _REGISTRY:
        raise ValueError(f"codec {codec.name!r} is already registered")
    _REGISTRY[codec.name] = codec
    return codec


def get_codec(name: object) -> Codec:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownCodecError(f"unknown codec {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def list_codecs() -> list[Codec]:
    return list(_REGISTRY.values())


def quality_params(codec: Codec, quality: int) -> dict[str, int]:
    """The codec's resolved params with ``quality`` as its ``q`` where it has one (lossless codecs
    have none): how ``codec.quality`` in the config becomes wire params."""
    keys = {spec.key for spec in codec.param_specs}
    return codec.resolve_params({"q": quality} if "q" in keys else {})


@lru_cache(maxsize=16)
def _full_image_params(quality: int) -> dict[str, int]:
    return get_codec("jpeg").resolve_params({"q": quality})


def full_image_payload_bytes(pixels: np.ndarray, patch_size: int, quality: int = 90) -> int:
    """Bytes of the whole image as a payload: the ``jpeg`` codec with every patch kept. The reference
    that patch selection is compared with (table-less, like every payload on the wire)."""
    params = _full_image_params(quality)  # the same checks as the codec's encode …
    if (not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3
            or pixels.shape[2] != 3):
        raise BadFieldError("pixels must be an (H, W, 3) uint8 array")
    check_geometry((int(pixels.shape[0]), int(pixels.shape[1])), patch_size)
    # … and the same bytes: the canvas of every patch is the image itself, so it is encoded as it is.
    return len(jpeg_encode_stripped(np.ascontiguousarray(pixels), params["q"],
                                    chroma_subsampling(params["ss"], patch_size)))


for _codec in (
    RawCodec("raw", "none", "uint8 patches as they are (K·p·p·3 bytes); lossless, no CPU"),
    RawCodec("raw+zlib", "zlib", "uint8 patches, zlib-compressed; lossless"),
    RawCodec("raw+zstd", "zstd", "uint8 patches, zstd-compressed; lossless"),
    ImageCodec("png", "PNG", "mosaic", "PNG of the mosaic of kept patches; lossless"),
    ImageCodec("webp-lossless", "WEBP-LOSSLESS", "mosaic", "lossless WebP of the mosaic of kept patches"),
    ImageCodec("jpeg", "JPEG", "canvas", "table-less JPEG of the image with unkept patches blank (q, ss)"),
    ImageCodec("jpeg-mosaic", "JPEG", "mosaic", "table-less JPEG of the mosaic of kept patches (q, ss)"),
    ImageCodec("webp", "WEBP", "canvas", "lossy WebP of the image with unkept patches blank (q, m)"),
    ImageCodec("webp-mosaic", "WEBP", "mosaic", "lossy WebP of the mosaic of kept patches (q, m)"),
    ImageCodec("jpeg-box", "JPEG", "box", "table-less JPEG of the kept patches' bounding box, unkept ones inside "
               "it blank: a region's window is sent as its crop (q, ss)"),
):
    register(_codec)
