"""Shared by the zoo tests: a shipped model's card."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.models import ZOO_DIR


def card(name: str) -> dict[str, Any]:
    """The model card (json) of zoo model ``name``; the test fails when there is none."""
    path = ZOO_DIR / f"{name}.json"
    if not path.is_file():
        pytest.fail(f"zoo model {name} has no model card at {path}")
    card: dict[str, Any] = json.loads(path.read_text())
    return card
