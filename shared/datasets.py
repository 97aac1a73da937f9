"""Image sources: a folder, an ImageFolder tree, a tar of one, the ImageNet sample folder with its
``labels.csv``, or single files. All yield :class:`Sample` records of encoded image bytes, so
large sets stay small in memory and decoding happens where the pixels are needed.

Where datasets live is configurable: ``$PATCHCAST_DATA`` if set, else a ``datasets`` folder
found beside the checkout (``../shared/datasets``), else ``~/.cache/patchcast/datasets``.
"""

from __future__ import annotations

import csv
import io
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from shared.errors import DatasetError
from shared.models import Preprocess

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sample:
    key: str
    data: bytes
    label: int | None = None


@dataclass(frozen=True)
class Dataset:
    """An in-memory list of encoded samples plus class names (possibly empty)."""

    samples: tuple[Sample, ...]
    class_names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: Sequence[int]) -> Dataset:
        return Dataset(tuple(self.samples[i] for i in indices), self.class_names, self.source)

    def restrict(self, classes: Sequence[int]) -> Dataset:
        """Only the samples of ``classes`` (global ids), relabelled 0..len(classes)-1 in that order:
        the training set of a specialist (expert) model."""
        if not classes or len(set(classes)) != len(classes):
            raise DatasetError("classes must be a non-empty list of distinct class ids")
        if self.class_names and any(not 0 <= c < len(self.class_names) for c in classes):
            raise DatasetError(f"{self.source}: class ids must be in 0..{len(self.class_names) - 1}, "
                               f"got {list(classes)}")
        local = {c: i for i, c in enumerate(classes)}
        kept = tuple(replace(s, label=local[s.label]) for s in self.samples if s.label in local)
        if not kept:
            raise DatasetError(f"{self.source}: no samples of classes {list(classes)}")
        names = tuple(self.class_names[c] for c in classes) if self.class_names else ()
        return Dataset(kept, names, self.source)

    def head(self, limit: int | None) -> Dataset:
        return self if limit is None else Dataset(self.samples[:limit], self.class_names, self.source)

    def spread(self, limit: int | None, seed: int = 0) -> Dataset:
        """A fixed, class-balanced-ish subset: a seeded permutation's first ``limit`` samples."""
        if limit is None or limit >= len(self.samples):
            return self
        order = np.random.default_rng(seed).permutation(len(self.samples))[:limit]
        return self.subset(sorted(int(i) for i in order))


def data_root() -> Path:
    env = os.environ.get("PATCHCAST_DATA")
    if env:
        return Path(env).expanduser()
    for candidate in (REPO_ROOT.parent / "shared" / "datasets", Path.cwd().parent / "shared" / "datasets"):
        if candidate.is_dir():
            return candidate
    return Path.home() / ".cache" / "patchcast" / "datasets"


def resolve(path: str | Path) -> Path:
    """Resolve a dataset path: absolute/existing paths as given, else relative to :func:`data_root`."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    return data_root() / p


def load(path: str | Path, *, limit: int | None = None) -> Dataset:
    """Load any supported source. ``limit`` keeps the first N samples (in sorted order)."""
    p = resolve(path)
    if not p.exists():
        raise DatasetError(f"{p}: no such file or folder (data root: {data_root()}; set PATCHCAST_DATA)")
    if p.is_file() and p.name.endswith((".tar", ".tar.gz", ".tgz")):
        return _load_tar(p).head(limit)
    if p.is_file():
        return Dataset((Sample(p.name, p.read_bytes()),), (), str(p))
    if (p / "labels.csv").is_file():
        return _load_labels_csv(p).head(limit)
    subdirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    if subdirs and any(_is_image(f) for d in subdirs for f in d.iterdir()):
        return _load_imagefolder(p, subdirs).head(limit)
    files = sorted(f for f in p.iterdir() if _is_image(f))
    if not files:
        raise DatasetError(f"{p}: no images found")
    return Dataset(tuple(Sample(f.name, f.read_bytes()) for f in files[:limit]), (), str(p))


def _is_image(f: Path) -> bool:
    return f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES


def _load_imagefolder(root: Path, subdirs: list[Path]) -> Dataset:
    classes = tuple(d.name for d in subdirs)
    samples = [Sample(f"{d.name}/{f.name}", f.read_bytes(), label)
               for label, d in enumerate(subdirs) for f in sorted(d.iterdir()) if _is_image(f)]
    return Dataset(tuple(samples), classes, str(root))


def _load_tar(path: Path) -> Dataset:
    """A tar of an ImageFolder tree: ``<split>/<class>/<file>`` or ``<class>/<file>``."""
    try:
        with tarfile.open(path) as tar:
            members = [m for m in tar if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES]
            entries = []
            for m in members:
                fh = tar.extractfile(m)
                if fh is None:
                    continue
                entries.append((m.name, fh.read()))
    except (tarfile.TarError, OSError) as exc:
        raise DatasetError(f"{path}: unreadable tar ({exc})") from exc
    if not entries:
        raise DatasetError(f"{path}: no images in tar")
    class_of = [Path(name).parent.name for name, _ in entries]
    classes = tuple(sorted(set(class_of)))
    index = {c: i for i, c in enumerate(classes)}
    entries_sorted = sorted(zip(entries, class_of, strict=True), key=lambda e: e[0][0])
    samples = tuple(Sample(name, data, index[c]) for (name, data), c in entries_sorted)
    return Dataset(samples, classes, str(path))


def _load_labels_csv(root: Path) -> Dataset:
    """The ImageNet sample layout: ``labels.csv`` with ``file`` and ``class_index`` (+ names)."""
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "file" not in rows[0] or "class_index" not in rows[0]:
        raise DatasetError(f"{root}/labels.csv: needs 'file' and 'class_index' columns")
    num_classes = max(int(r["class_index"]) for r in rows) + 1
    names = [""] * num_classes
    samples = []
    for r in rows:
        idx = int(r["class_index"])
        names[idx] = r.get("class_name", "") or r.get("synset", "")
        samples.append(Sample(r["file"], (root / r["file"]).read_bytes(), idx))
    return Dataset(tuple(samples), tuple(names), str(root))


_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2))  # baseline, extended, progressive Huffman


def _jpeg_rgb_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a three-component JPEG with no Adobe marker, read from its frame header; None
    for anything else (grayscale, CMYK, an Adobe colour transform, not a JPEG, a header it cannot read)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    i, end = 2, len(data)
    while i + 9 < end and data[i] == 0xFF:
        marker = data[i + 1]
        if marker in _SOF_MARKERS:
            if data[i + 9] != 3:
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker in (0xDA, 0xEE) or not 0xC0 <= marker <= 0xFE:  # scan data, Adobe APP14, no marker
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _decode_rgb_jpeg(data: bytes) -> Image.Image | None:
    """A three-component JPEG through Pillow's JPEG decoder straight, with the arguments Image.open would
    give it (the same pixels), without its header parse in Python; None where the general path is needed."""
    size = _jpeg_rgb_size(data)
    limit = Image.MAX_IMAGE_PIXELS
    if size is None or min(size) <= 0 or (limit is not None and size[0] * size[1] > limit):
        return None
    try:
        return Image.frombytes("RGB", size, data, "jpeg", "RGB", "")
    except (OSError, ValueError):
        return None  # the general path says what is wrong with it


def decode_rgb(data: bytes) -> Image.Image:
    fast = _decode_rgb_jpeg(data)
    if fast is not None:
        return fast
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"not a decodable image ({exc})") from exc
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() to its own mode is a copy


_PIL_INTERP = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
               "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


def crop_uint8(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """Resize the shorter side to ``pre.resize_size`` and center-crop ``pre.input_size``: (H, W, 3) uint8.

    These are the pixels a device owns and may send; normalisation happens on each side.
    """
    size = pre.input_size
    resize = pre.resize_size
    w, h = img.size
    if (w, h) != (size, size):
        scale = resize / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), _PIL_INTERP.get(pre.interpolation, Image.Resampling.BICUBIC))
        if (nw, nh) != (size, size):  # a crop to the whole image would only copy it
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def normalize(pixels: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 (..., H, W, 3) or (..., 3, H, W) float in [0,1] → normalised float (…, 3, H, W)."""
    if pixels.dtype == torch.uint8:
        pixels = pixels.movedim(-1, -3).float().div_(255.0)
    mean, std = _mean_std(tuple(pre.mean), tuple(pre.std), pixels.dtype, pixels.device)
    return (pixels - mean) / std


@lru_cache(maxsize=64)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (3, 1, 1) normalisation constants, built once per preprocess, dtype and device (never written to);
    normal tensors even when first asked for under ``torch.inference_mode``, so that autograd may use them."""
    with torch.inference_mode(False):
        return (torch.tensor(mean, dtype=dtype, device=device).view(3, 1, 1),
                torch.tensor(std, dtype=dtype, device=device).view(3, 1, 1))


class Uint8Normalizer:
    """:func:`normalize` for uint8 (B, H, W, 3) numpy images: the same float32 operations in the same order
    (÷ 255, − mean, ÷ std), so the same values and strides, but on contiguous memory.

    :func:`normalize` broadcasts a 3-element mean over the channel axis, which leaves torch and numpy an
    inner loop of 3 values; here mean and std are tiled to one image's length once per image size, and
    each operation runs over the whole image at SIMD width (a 160 px image: ~40 µs against ~160 µs for a
    per-channel lookup table). Elementwise IEEE float32 arithmetic gives every value bit for bit.
    """

    _MAX_SIZES = 8  # image sizes whose tiles are kept (a device sees one or two)

    def __init__(self, pre: Preprocess) -> None:
        self._mean = np.asarray(pre.mean, dtype=np.float32)
        self._std = np.asarray(pre.std, dtype=np.float32)
        if self._mean.shape != (3,) or self._std.shape != (3,):
            raise ValueError("normalisation needs 3 channel means and standard deviations")
        self._tiles: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _tiles_for(self, values: int) -> tuple[np.ndarray, np.ndarray]:
        tiles = self._tiles.get(values)
        if tiles is None:
            if len(self._tiles) >= self._MAX_SIZES:
                self._tiles.clear()
            tiles = self._tiles[values] = (np.tile(self._mean, values // 3), np.tile(self._std, values // 3))
        return tiles

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) → (B, 3, H, W) float32 with :func:`normalize`'s values and strides."""
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"expected uint8 (B, H, W, 3) pixels, got {pixels.dtype} {pixels.shape}")
        b, values = pixels.shape[0], pixels.shape[1] * pixels.shape[2] * 3  # an empty batch too
        mean, std = self._tiles_for(values)
        x = pixels.reshape(b, values).astype(np.float32)
        np.divide(x, np.float32(255.0), out=x)
        np.subtract(x, mean, out=x)
        np.divide(x, std, out=x)
        # (B, H, W, 3) memory seen as (B, 3, H, W): the view and the move in numpy, one torch call (each torch
        # call pays its code's cache misses on a device, between forwards)
        return torch.from_numpy(x.reshape(pixels.shape).transpose(0, 3, 1, 2))


def to_tensor_batch(samples: Sequence[Sample], pre: Preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode + crop a list of samples: uint8 (B, H, W, 3) and labels (B,) (-1 where unknown)."""
    arrays = [crop_uint8(decode_rgb(s.data), pre) for s in samples]
    pixels = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(0, pre.input_size, pre.input_size, 3,
                                                                           dtype=torch.uint8)
    labels = torch.tensor([-1 if s.label is None else s.label for s in samples], dtype=torch.long)
    return pixels, labels


def iter_batches(dataset: Dataset, pre: Preprocess, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(dataset), batch_size):
        yield to_tensor_batch(dataset.samples[start:start + batch_size], pre)
