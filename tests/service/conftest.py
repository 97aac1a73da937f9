"""Fixtures for the service tests: a real Mosquitto (the project's broker/mosquitto.conf on a free
port), small random-init models in temporary safetensors checkpoints, synthetic images."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from other_brokers import Rumqttd, rumqttd_installed
from service_helpers import write_images, write_models

from patchcast.broker import LOCAL_CONF, BrokerProcess

_ids = itertools.count()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked ``any_broker`` runs over Mosquitto and over rumqttd (tests/service/other_brokers.py)."""
    if metafunc.definition.get_closest_marker("any_broker") and "broker" in metafunc.fixturenames:
        metafunc.parametrize("broker", ["mosquitto", "rumqttd"], indirect=True, scope="module")


@pytest.fixture(scope="module")
def broker(request: pytest.FixtureRequest) -> Iterator[BrokerProcess | Rumqttd]:
    """A broker on a free loopback port: Mosquitto, or rumqttd for the ``rumqttd`` run of an ``any_broker`` test."""
    if getattr(request, "param", "mosquitto") == "rumqttd":
        if not rumqttd_installed():
            pytest.skip("rumqttd is not installed (pip install iotcore: rumqttd compiled into a wheel)")
        b = Rumqttd().start()
        try:
            yield b
        finally:
            b.stop()
        return
    with BrokerProcess(port=0, template=LOCAL_CONF) as mosquitto:
        yield mosquitto


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
