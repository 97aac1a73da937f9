"""The shipped model zoo loads offline by name and still scores what its model card says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zoo_helpers import card as _card

from patchcast.model_card import evaluate, subset_indices
from shared import datasets
from shared.models import ZOO_DIR, build_model

ZOO = ("cifar10-edge", "cifar10-server")
SPECIALISTS = ("cifar10-vehicles", "cifar10-animals")  # experts for routing, fine-tuned from the server
REGION = ("cifar10-server-glance",)  # the server fine-tuned on region-exchange images (train --glance-mix)




@pytest.fixture(scope="module")
def cifar_subset() -> tuple[torch.Tensor, torch.Tensor]:
    path = datasets.resolve("cifar10/test.tar")
    if not path.is_file():
        pytest.skip(f"CIFAR-10 test split not found under {datasets.data_root()} (set PATCHCAST_DATA)")
    ds = datasets.load(path)
    sub = ds.subset(subset_indices(len(ds)))
    edge = build_model("zoo:cifar10-edge", role="edge")
    return datasets.to_tensor_batch(sub.samples, edge.preprocess)


def test_zoo_is_small_and_complete() -> None:
    total = 0
    for name in ZOO + SPECIALISTS + REGION:
        weights = ZOO_DIR / f"{name}.safetensors"
        assert weights.is_file(), f"missing {weights}"
        assert (ZOO_DIR / f"{name}.md").is_file()
        total += weights.stat().st_size
    assert total <= 25 * 1024 * 1024


@pytest.mark.parametrize("name", ZOO + REGION)
def test_zoo_accuracy_matches_model_card(name: str, cifar_subset: tuple[torch.Tensor, torch.Tensor]) -> None:
    card = _card(name)
    loaded = build_model(f"zoo:{name}", role="edge" if name.endswith("-edge") else "server")
    assert loaded.class_names == card["class_names"] and loaded.num_patches == 64
    pixels, labels = cifar_subset
    accuracy = evaluate(loaded.model, pixels, labels, loaded.preprocess, bf16=False)
    assert card["test_subset"]["size"] == len(labels) == 1000
    assert abs(accuracy - card["test_subset"]["accuracy"]) <= 0.015, (accuracy, card["test_subset"])


@pytest.mark.parametrize("name", SPECIALISTS)
def test_specialists_score_their_cards_on_their_classes(name: str) -> None:
    path = datasets.resolve("cifar10/test.tar")
    if not path.is_file():
        pytest.skip(f"CIFAR-10 test split not found under {datasets.data_root()} (set PATCHCAST_DATA)")
    card = _card(name)
    loaded = build_model(f"zoo:{name}")
    assert loaded.class_ids == card["class_ids"] and len(loaded.class_ids) == loaded.num_classes
    ds = datasets.load(path).restrict(loaded.class_ids)
    sub = ds.subset(subset_indices(len(ds)))
    pixels, labels = datasets.to_tensor_batch(sub.samples, loaded.preprocess)
    accuracy = evaluate(loaded.model, pixels, labels, loaded.preprocess, bf16=False)
    assert card["test_subset"]["size"] == len(labels) == 1000
    assert abs(accuracy - card["test_subset"]["accuracy"]) <= 0.015, (accuracy, card["test_subset"])


def test_zoo_meets_the_accuracy_targets() -> None:
    edge, server = _card("cifar10-edge"), _card("cifar10-server")
    assert server["test_accuracy"] >= 0.70
    assert edge["test_accuracy"] >= 0.50
    # the gap is what makes collaboration worth it (DeiT-Tiny 72.2 % vs DeiT-Base 81.8 % in the paper)
    assert server["test_accuracy"] - edge["test_accuracy"] >= 0.10


def test_info_lists_the_zoo_with_its_specialists(capsys: pytest.CaptureFixture[str]) -> None:
    from patchcast.cli import main

    assert main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("model zoo"))
    for name in ZOO + SPECIALISTS:
        card = _card(name)
        assert f"zoo:{name} ({card['test_accuracy'] * 100:.1f} %" in line
    for name in SPECIALISTS:
        classes = ",".join(map(str, _card(name)["class_ids"]))
        assert f"%; specialist on classes {classes})" in line.split(f"zoo:{name} (")[1].split("zoo:")[0]


def test_the_glance_server_reads_glances(cifar_subset: tuple[torch.Tensor, torch.Tensor]) -> None:
    # On all 10,000 test images (docs/results.md, Region retransmission): glances (s = 2) 75.2 % with
    # this server against 47.9 % with the server trained on full images only.
    from shared.region import downsample, upsample

    pixels, labels = cifar_subset
    glances = torch.from_numpy(np.stack([upsample(downsample(p, 2), 2) for p in pixels.numpy()]))
    scores = {}
    for name in ("cifar10-server", "cifar10-server-glance"):
        loaded = build_model(f"zoo:{name}", role="server")
        scores[name] = evaluate(loaded.model, glances, labels, loaded.preprocess, bf16=False)
    assert scores["cifar10-server-glance"] >= 0.70, scores
    assert scores["cifar10-server-glance"] >= scores["cifar10-server"] + 0.15, scores
