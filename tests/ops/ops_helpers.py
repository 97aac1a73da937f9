"""Helpers for the operations tests (imported by name: test folders are not packages)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def patchcast_cmd(*args: str) -> list[str]:
    """``patchcast ARGS`` through this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "patchcast.cli", *args]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PATCHCAST_LOGGING__FORMAT", "json")
    env.update(extra)
    return env


def tiny_models(folder: Path, *, server_dim: int = 96, server_depth: int = 4) -> tuple[str, str]:
    """Random-init CIFAR-shaped (32×32, patch 4) edge and server checkpoints: fast stand-ins for the
    zoo models (accuracy ≈ chance, everything else real). Returns ``(file:edge, file:server)`` refs."""
    import torch

    from shared.models import LoadedModel, Preprocess, VitArch, save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    pre = Preprocess(input_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.2435, 0.2616))
    refs = []
    for name, arch in (("tiny-edge", VitArch(32, 4, 48, 2, 3, num_classes=10)),
                       ("tiny-server", VitArch(32, 4, server_dim, server_depth, 3, num_classes=10))):
        path = folder / f"{name}.safetensors"
        if not path.exists():
            torch.manual_seed(0)
            save_checkpoint(path, LoadedModel(arch.build().eval(), name, pre, [str(i) for i in range(10)]),
                            arch=arch)
        refs.append(f"file:{path}")
    return refs[0], refs[1]


def zoo_or_tiny(folder: Path) -> tuple[str, str]:
    """The offline zoo models when both are exported, else tiny random stand-ins."""
    from shared.models import zoo_names

    names = set(zoo_names())
    if {"cifar10-edge", "cifar10-server"} <= names:
        return "zoo:cifar10-edge", "zoo:cifar10-server"
    return tiny_models(folder)
