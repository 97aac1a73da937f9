"""Fixtures for the operations tests: a real Mosquitto on a free port (no mocked broker)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from patchcast.broker import BrokerProcess


@pytest.fixture
def broker() -> Iterator[BrokerProcess]:
    with BrokerProcess(port=0) as b:
        yield b
