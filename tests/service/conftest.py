"""Fixtures for the service tests: a real Mosquitto (the project's broker/mosquitto.conf on a free
port), small random-init models in temporary safetensors checkpoints, synthetic images."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_helpers import write_images, write_models

from patchcast.broker import LOCAL_CONF, BrokerProcess

_ids = itertools.count()


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerProcess]:
    with BrokerProcess(port=0, template=LOCAL_CONF) as b:
        yield b


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"), per_class=25)


@pytest.fixture
def unique() -> str:
    """A short id that keeps each test's topics (model id, device prefix, worker ids) apart."""
    return f"t{next(_ids)}"
