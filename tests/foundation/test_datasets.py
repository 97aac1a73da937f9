"""Image sources: folder, ImageFolder tree, tar of one, labels.csv folder, single file."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared import datasets
from shared.errors import DatasetError
from shared.models import Preprocess


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for cls, color in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.jpg").write_bytes(_jpeg(color))
    return root


def test_imagefolder_labels_follow_sorted_class_names(imagefolder: Path) -> None:
    ds = datasets.load(imagefolder)
    assert ds.class_names == ("cat", "dog")
    assert [s.label for s in ds.samples] == [0, 0, 0, 1, 1, 1]


def test_tar_of_an_imagefolder(imagefolder: Path, tmp_path: Path) -> None:
    tar_path = tmp_path / "split.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(imagefolder, arcname="test")
    ds = datasets.load(tar_path, limit=4)
    assert ds.class_names == ("cat", "dog") and len(ds) == 4
    assert ds.samples[0].key == "test/cat/0.jpg" and ds.samples[3].label == 1


def test_plain_folder_and_single_file(imagefolder: Path) -> None:
    flat = datasets.load(imagefolder / "dog")
    assert len(flat) == 3 and all(s.label is None for s in flat.samples)
    single = datasets.load(imagefolder / "cat" / "1.jpg")
    assert len(single) == 1


def test_labels_csv_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.JPEG").write_bytes(_jpeg((1, 2, 3)))
    (tmp_path / "images" / "b.JPEG").write_bytes(_jpeg((4, 5, 6)))
    (tmp_path / "labels.csv").write_text("file,class_index,class_name\nimages/a.JPEG,2,x\nimages/b.JPEG,0,y\n")
    ds = datasets.load(tmp_path)
    assert [s.label for s in ds.samples] == [2, 0] and ds.class_names == ("y", "", "x")


def test_missing_and_empty_sources_are_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        datasets.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        datasets.load(tmp_path / "empty")
    with pytest.raises(DatasetError, match="not a decodable image"):
        datasets.decode_rgb(b"not an image")


def test_crop_follows_the_preprocess_config() -> None:
    img = Image.fromarray(np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3))
    pre = Preprocess(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875)  # resize 36, crop 32
    assert pre.resize_size == 36
    out = datasets.crop_uint8(img, pre)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    x = datasets.normalize(torch.from_numpy(out.copy()), pre)
    assert x.shape == (3, 32, 32) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0


def test_shared_cifar10_test_split_if_present() -> None:
    path = datasets.resolve("cifar10/test.tar")
    if not path.is_file():
        pytest.skip(f"CIFAR-10 not found under {datasets.data_root()} (set PATCHCAST_DATA)")
    ds = datasets.load(path, limit=20)
    assert len(ds) == 20 and len(ds.class_names) == 10


def test_restrict_keeps_and_relabels_a_class_subset() -> None:
    from shared.datasets import Dataset, Sample

    ds = Dataset(tuple(Sample(f"k{i}", b"x", i % 4) for i in range(8)), ("a", "b", "c", "d"), "mem")
    sub = ds.restrict([3, 1])
    assert [s.key for s in sub.samples] == ["k1", "k3", "k5", "k7"]
    assert [s.label for s in sub.samples] == [1, 0, 1, 0] and sub.class_names == ("d", "b")
    for bad in ([], [1, 1], [4]):
        with pytest.raises(DatasetError):
            ds.restrict(bad)


Triple = tuple[float, float, float]


@pytest.mark.parametrize("mean, std", [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                                       ((0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)),
                                       ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
def test_uint8_normalizer_is_normalize_for_every_value(mean: Triple, std: Triple) -> None:
    pre = Preprocess(input_size=16, mean=mean, std=std)
    rng = np.random.default_rng(0)
    every = np.stack([rng.permutation(256) for _ in range(3)], axis=-1).astype(np.uint8).reshape(16, 16, 3)
    batch = np.stack([every, every[::-1], rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)])
    want = datasets.normalize(torch.from_numpy(batch), pre)
    normalizer = datasets.Uint8Normalizer(pre)
    got = normalizer(batch)
    assert got.dtype == torch.float32 and got.shape == (3, 3, 16, 16) and got.stride() == want.stride()
    assert torch.equal(got, want)
    # one image alone (the edge's batch of 1), and the tiles of another size
    assert torch.equal(normalizer(batch[:1]), want[:1])
    small = np.ascontiguousarray(batch[:, :8, :8])
    assert torch.equal(normalizer(small), datasets.normalize(torch.from_numpy(small), pre))


def test_uint8_normalizer_refuses_what_is_not_uint8_rgb() -> None:
    normalizer = datasets.Uint8Normalizer(Preprocess(input_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    for bad in (np.zeros((1, 4, 4, 3), np.float32), np.zeros((4, 4, 3), np.uint8), np.zeros((1, 4, 4, 4), np.uint8)):
        with pytest.raises(ValueError):
            normalizer(bad)


def _jpeg_of(image: Image.Image, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **options)
    return buf.getvalue()


def test_decode_rgb_jpegs_are_what_image_open_decodes() -> None:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    files = {"baseline": _jpeg_of(rgb, quality=90), "444": _jpeg_of(rgb, subsampling=0),
             "progressive": _jpeg_of(rgb, progressive=True), "exif": _jpeg_of(rgb, exif=Image.Exif().tobytes()),
             "grey": _jpeg_of(rgb.convert("L")), "cmyk": _jpeg_of(rgb.convert("CMYK"))}
    fast = {name for name, data in files.items() if datasets._decode_rgb_jpeg(data) is not None}
    assert fast == {"baseline", "444", "progressive", "exif"}  # the others take Image.open's path
    for data in files.values():
        with Image.open(io.BytesIO(data)) as want:
            assert np.array_equal(np.asarray(datasets.decode_rgb(data)), np.asarray(want.convert("RGB")))
    for broken in (files["baseline"][:200], files["baseline"][:2] + b"\xff\xc0\x00\x11\x08" + bytes(40)):
        with pytest.raises(DatasetError):
            datasets.decode_rgb(broken)
