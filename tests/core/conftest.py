"""Fixtures for the core tests only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run the core tests single-threaded. Their tensors are small (batch 1–3), and on a busy 2-core
    machine intra-op threads mostly wait on each other: one DeiT-Tiny forward took 2.7 s with two
    threads and 0.1–0.17 s with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
