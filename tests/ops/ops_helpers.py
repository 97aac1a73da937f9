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


def tiny_models(folder: Path, *, server_dim: int = 96, server_depth: int = 4,
                server_heads: int = 3) -> tuple[str, str]:
    """Random-init CIFAR-shaped (32×32, patch 4) edge and server checkpoints: fast stand-ins for the
    zoo models (accuracy ≈ chance, everything else real). Returns ``(file:edge, file:server)`` refs."""
    import torch

    from shared.models import LoadedModel, Preprocess, VitArch, save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    pre = Preprocess(input_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.2435, 0.2616))
    refs = []
    for name, arch in (("tiny-edge", VitArch(32, 4, 48, 2, 3, num_classes=10)),
                       (f"tiny-server-{server_dim}x{server_depth}",
                        VitArch(32, 4, server_dim, server_depth, server_heads, num_classes=10))):
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


def tar_subset(folder: Path, tar_name: str, every: int) -> Path:
    """An ImageFolder of every N-th image of a split's tar (all classes, labels from the folder names):
    the same images as the whole split, a fraction of the load time."""
    import tarfile

    from shared.datasets import resolve

    if folder.is_dir() and any(folder.iterdir()):
        return folder
    with tarfile.open(resolve(tar_name)) as tar:
        members = [m for m in tar if m.isfile()]
        for m in members[::every]:
            parts = Path(m.name).parts
            target = folder / parts[-2] / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            fh = tar.extractfile(m)
            assert fh is not None
            target.write_bytes(fh.read())
    return folder


def cifar_subset(folder: Path, every: int = 25) -> Path:
    """Every N-th CIFAR-10 test image as an ImageFolder."""
    return tar_subset(folder, "cifar10/test.tar", every)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
