"""Codecs: exact lossless round trips, lossy quality bounds, the JPEG table contract, bomb guards."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import zstandard
from PIL import Image
from protocol_helpers import natural_image

from shared import codecs as C
from shared.errors import BadFieldError, BadMaskError, ProtocolError, UnknownCodecError

# Lossy codecs at their default quality (q=90) on the synthetic photo-like image
# must keep at least this PSNR on the kept patches. A 4-px patch is half a DCT block and, in a canvas,
# shares it with grey fill (every 3rd patch kept is the worst case), so its bound is lower.
PSNR_BOUND_DB = {16: 30.0, 4: 20.0}
CASES = [(224, 16, 3), (32, 4, 3), (64, 16, 1)]  # (image side, patch size, keep every k-th patch)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_registry() -> None:
    names = [c.name for c in C.list_codecs()]
    assert {"raw", "raw+zlib", "raw+zstd", "png", "webp-lossless", "jpeg", "jpeg-mosaic", "webp",
            "webp-mosaic"} <= set(names)
    assert len(names) == len(set(names))
    with pytest.raises(UnknownCodecError):
        C.get_codec("gif")
    assert C.get_codec("jpeg").resolve_params(None) == {"q": 90, "ss": 0}
    with pytest.raises(BadFieldError):
        C.get_codec("jpeg").resolve_params({"ss": 422})


def test_remembered_params_refuse_what_the_checks_refuse() -> None:
    """Resolved params are remembered per (codec, items, types): a bool or a float equal to a remembered int
    is still refused, each call gets its own dict, and many distinct params do not grow the memory."""
    jpeg = C.get_codec("jpeg-mosaic")
    first = jpeg.resolve_params({"q": 1, "ss": 444})
    second = jpeg.resolve_params({"q": 1, "ss": 444})
    assert first == second == {"q": 1, "ss": 444} and first is not second
    first["q"] = 50
    assert jpeg.resolve_params({"q": 1, "ss": 444}) == {"q": 1, "ss": 444}
    for odd in ({"q": True, "ss": 444}, {"q": 1.0, "ss": 444}, {"q": 1, "ss": 444.0}, {"q": [1]}, {"q": 101},
                {"q": 1, "zz": 1}, {b"q": 1}):
        with pytest.raises(BadFieldError):
            jpeg.resolve_params(odd)  # type: ignore[arg-type]
    assert C.get_codec("raw+zlib").resolve_params({"level": 1}) == {"level": 1}  # another codec, its own
    for q in range(1, 101):
        for ss in (0, 420, 444):
            assert jpeg.resolve_params({"q": q, "ss": ss}) == {"q": q, "ss": ss}
    assert len(C._RESOLVED) <= C._MAX_RESOLVED


@pytest.mark.parametrize("codec", C.list_codecs(), ids=lambda c: c.name)
@pytest.mark.parametrize(("side", "patch", "every"), CASES)
def test_round_trip(codec: C.Codec, side: int, patch: int, every: int) -> None:
    pixels = natural_image(side, side, seed=side)
    indices = np.arange(0, (side // patch) ** 2, every)
    scores = np.random.default_rng(0).random(indices.size)
    payload = codec.encode(pixels, indices, patch, scores=scores)
    out = codec.decode(payload, (side, side), indices, patch)
    expected = C.extract_patches(pixels, indices, patch)
    assert out.shape == expected.shape and out.dtype == np.uint8
    if codec.lossless:
        assert np.array_equal(out, expected)
    else:
        assert psnr(out, expected) >= PSNR_BOUND_DB[patch]


def test_lossy_quality_follows_q() -> None:
    pixels = natural_image(64, 64, seed=3)
    indices = np.arange(16)
    ref = C.extract_patches(pixels, indices, 16)
    jpeg = C.get_codec("jpeg")
    low, high = (jpeg.encode(pixels, indices, 16, {"q": q}) for q in (30, 95))
    assert len(low) < len(high)
    assert psnr(jpeg.decode(low, (64, 64), indices, 16, {"q": 30}), ref) < psnr(
        jpeg.decode(high, (64, 64), indices, 16, {"q": 95}), ref)


def _pil_jpeg(pixels: np.ndarray, quality: int, subsampling: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality, subsampling=0 if subsampling == 444 else 2)
    return buf.getvalue()


@pytest.mark.parametrize("quality", [1, 25, 50, 75, 90, 100])
@pytest.mark.parametrize("subsampling", [420, 444])
def test_jpeg_header_contract_matches_the_encoder(quality: int, subsampling: int) -> None:
    # The payload carries no tables: the decoder's rebuilt header must be exactly what libjpeg wrote.
    pixels = natural_image(48, 80, seed=quality)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality, subsampling=0 if subsampling == 444 else 2)
    header, payload = C._split_at_sos(buf.getvalue())
    assert header == C.jpeg_header(48, 80, quality, subsampling)
    assert payload == C.jpeg_encode_stripped(pixels, quality, subsampling)
    other = natural_image(48, 80, seed=quality + 1)  # the same geometry again: the checked prefix is reused
    header, other_payload = C._split_at_sos(_pil_jpeg(other, quality, subsampling))
    assert other_payload == C.jpeg_encode_stripped(other, quality, subsampling) != payload
    assert header == C.jpeg_header(48, 80, quality, subsampling)
    luma, chroma = C.quant_tables(quality)
    assert list(Image.open(buf).quantization[0]) == luma  # type: ignore[attr-defined]
    assert list(Image.open(buf).quantization[1]) == chroma  # type: ignore[attr-defined]


@pytest.mark.parametrize("quality", [30, 90])
@pytest.mark.parametrize("subsampling", [420, 444])
def test_jpeg_decode_gives_pillows_pixels(quality: int, subsampling: int) -> None:
    # The worker decodes with libjpeg-turbo straight to numpy; Pillow (the same library behind an Image)
    # is the reference: every pixel equal, for both subsamplings and odd, MCU-unaligned sizes.
    for seed, (h, w) in enumerate([(32, 32), (48, 80), (40, 24), (112, 112)]):
        pixels = natural_image(h, w, seed=seed + quality)
        payload = C.jpeg_encode_stripped(pixels, quality, subsampling)
        stream = C.jpeg_header(h, w, quality, subsampling) + payload + b"\xff\xd9"
        reference = np.asarray(Image.open(io.BytesIO(stream)).convert("RGB"))
        assert np.array_equal(C.jpeg_decode_stripped(payload, h, w, quality, subsampling), reference)


def test_jpeg_payloads_that_pillow_would_patch_up_are_refused() -> None:
    # A truncated, padded or bit-flipped stream decodes in Pillow to grey or garbage; here it is refused.
    pixels, idx = natural_image(32, 32, seed=5), np.arange(64)
    codec = C.get_codec("jpeg")
    payload = codec.encode(pixels, idx, 4)
    for broken in (payload[: len(payload) // 2], payload + bytes(40), payload[:60] + b"\xff\xd9" + payload[60:]):
        assert _code(codec.decode, broken, (32, 32), idx, 4) == "bad_payload"
    assert codec.decode(payload, (32, 32), idx, 4).shape == (64, 4, 4, 3)


def test_jpeg_encode_calls_pillows_encoder_directly_only_where_it_writes_saves_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pixels = natural_image(40, 24, seed=9)
    reference = C._saved_jpeg(Image.fromarray(pixels), 77, 420)
    monkeypatch.setattr(C, "_DIRECT_OK", {})
    assert reference.endswith(C.jpeg_encode_stripped(pixels, 77, 420) + b"\xff\xd9")
    assert C._DIRECT_OK == {(77, 420): True}  # this Pillow: the direct call is the one in use
    assert reference.endswith(C.jpeg_encode_stripped(pixels, 77, 420) + b"\xff\xd9")

    def other_layout(*args: object) -> bytes:
        raise TypeError("argument 9 must be int, not list")  # as a Pillow with another argument layout

    monkeypatch.setattr(C, "_DIRECT_OK", {})
    monkeypatch.setattr(C, "_direct_jpeg", other_layout)
    assert reference.endswith(C.jpeg_encode_stripped(pixels, 77, 420) + b"\xff\xd9")
    assert C._DIRECT_OK == {(77, 420): False}
    assert reference.endswith(C.jpeg_encode_stripped(pixels, 77, 420) + b"\xff\xd9")


def test_encode_validates_its_inputs() -> None:
    raw = C.get_codec("raw")
    pixels = natural_image(32, 32)
    with pytest.raises(BadMaskError):
        raw.encode(pixels, [3, 1], 4)
    with pytest.raises(BadMaskError):
        raw.encode(pixels, [1, 1], 4)
    with pytest.raises(BadMaskError):
        raw.encode(pixels, [64], 4)
    with pytest.raises(BadMaskError):
        raw.encode(pixels, [], 4)
    with pytest.raises(ProtocolError):
        raw.encode(pixels.astype(np.float32), [0], 4)
    with pytest.raises(ProtocolError):
        raw.encode(pixels, [0], 5)
    with pytest.raises(BadFieldError):
        C.get_codec("jpeg").encode(pixels, [0, 1], 4, scores=np.ones(3))  # one score per kept patch


def _code(fn: object, *args: object) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.code


def test_zstd_refuses_wrong_or_missing_content_size_before_decompressing() -> None:
    codec, idx = C.get_codec("raw+zstd"), np.arange(4)
    expected = 4 * 16 * 16 * 3
    big = zstandard.ZstdCompressor().compress(bytes(expected * 1000))  # a 3 MB bomb in a few hundred bytes
    assert _code(codec.decode, big, (64, 64), idx, 16) == "bad_payload"
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(expected))
    assert _code(codec.decode, no_size, (64, 64), idx, 16) == "bad_payload"
    trailing = zstandard.ZstdCompressor().compress(bytes(expected)) + b"junk"
    assert _code(codec.decode, trailing, (64, 64), idx, 16) == "bad_payload"


def test_zlib_output_is_bounded() -> None:
    codec, idx = C.get_codec("raw+zlib"), np.arange(4)
    bomb = zlib.compress(bytes(50_000_000), 9)  # 50 MB of zeros in ~50 KB
    tracemalloc.start()
    try:
        assert _code(codec.decode, bomb, (64, 64), idx, 16) == "bad_payload"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # inflated only up to the expected 3 KB, not to 50 MB
    short = zlib.compress(bytes(100))
    assert _code(codec.decode, short, (64, 64), idx, 16) == "bad_payload"


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG start whose header claims a large size; the (compressible) rows would follow."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(3 * width + 1) * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)


def test_image_dimensions_are_checked_before_decoding() -> None:
    idx = np.arange(4)
    huge = _png_bomb(8000, 8000)  # 192 MB if decoded, yet under Pillow's own bomb limit
    with pytest.raises(ProtocolError, match="8000×8000, expected"):  # refused from the header
        C.get_codec("png").decode(huge, (64, 64), idx, 16)
    other = io.BytesIO()
    Image.fromarray(natural_image(128, 128)).save(other, "WEBP", quality=80)
    assert _code(C.get_codec("webp").decode, other.getvalue(), (64, 64), idx, 16) == "bad_payload"
    rgba = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 4), np.uint8)).save(rgba, "PNG")
    assert _code(C.get_codec("png").decode, rgba.getvalue(), (64, 64), idx, 16) == "bad_payload"
    # A JPEG payload's size comes from the receiver's own SOF: a full JPEG file is not a payload.
    assert _code(C.get_codec("jpeg").decode, other.getvalue(), (64, 64), idx, 16) == "bad_payload"


def test_chroma_subsampling_auto_follows_mcu_alignment() -> None:
    assert C.chroma_subsampling(0, 16) == 420 and C.chroma_subsampling(0, 32) == 420
    assert C.chroma_subsampling(0, 4) == 444 and C.chroma_subsampling(0, 14) == 444
    assert C.chroma_subsampling(420, 4) == 420 and C.chroma_subsampling(444, 16) == 444
    pixels, idx = natural_image(64, 64), np.arange(0, 16, 2)
    jpeg = C.get_codec("jpeg-mosaic")
    auto, explicit = jpeg.encode(pixels, idx, 16), jpeg.encode(pixels, idx, 16, {"ss": 420})
    assert auto == explicit  # the payload never says which; both sides derive it from the patch size
    assert jpeg.encode(pixels, idx, 16, {"ss": 444}) != auto
    for ss in (0, 420, 444):
        payload = jpeg.encode(pixels, idx, 16, {"ss": ss})
        assert psnr(jpeg.decode(payload, (64, 64), idx, 16, {"ss": ss}), C.extract_patches(pixels, idx, 16)) > 30


@pytest.mark.parametrize("codec", C.list_codecs(), ids=lambda c: c.name)
def test_decode_refuses_bad_geometry_and_params(codec: C.Codec) -> None:
    assert _code(codec.decode, b"x", (65, 64), np.arange(2), 16) == "bad_geometry"
    assert _code(codec.decode, b"x", (64, 64), np.arange(17), 16) == "bad_mask"
    assert _code(codec.decode, "x", (64, 64), np.arange(2), 16) == "bad_payload"
    assert _code(codec.decode, b"x", (64, 64), np.arange(2), 16, {"nope": 1}) == "bad_field"


def test_the_box_layout_sends_a_window_as_its_crop() -> None:
    pixels = natural_image(64, 64, seed=5)  # 8×8 grid of 8-px patches
    window = np.array([r * 8 + c for r in range(2, 6) for c in range(1, 4)])  # rows 2–5, columns 1–3
    patches = C.extract_patches(pixels, window, 8)
    assert C.box_of(window, (64, 64), 8) == (2, 1, 4, 3)
    np.testing.assert_array_equal(C.box_image(patches, (64, 64), window, 8), pixels[16:48, 8:32])
    # a gap inside the box is grey, and the kept patches come back in index order
    sparse = np.array([2 * 8 + 1, 5 * 8 + 3])
    box = C.box_image(C.extract_patches(pixels, sparse, 8), (64, 64), sparse, 8)
    assert box.shape == (32, 24, 3) and (box[0:8, 8:16] == C.FILL).all()
    codec = C.get_codec("jpeg-box")
    params = codec.resolve_params({"q": 90})
    payload = codec.encode(pixels, window, 8, params)
    assert payload == C.jpeg_encode_stripped(pixels[16:48, 8:32], 90, C.chroma_subsampling(0, 8))
    assert psnr(codec.decode(payload, (64, 64), window, 8, params), patches) > 30
    # the crop is smaller than the same window packed into the mosaic's image-wide rows
    mosaic = C.get_codec("jpeg-mosaic")
    assert len(payload) < len(mosaic.encode(pixels, window, 8, mosaic.resolve_params({"q": 90})))
