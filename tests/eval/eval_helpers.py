"""Shared by the eval tests: a tiny labelled image set and a random-init edge/server pair for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shared.models import LoadedModel, Preprocess, VitArch, save_checkpoint


def tiny_eval_set(root: Path, *, classes: int = 4, per_class: int = 12, patch_size: int = 4,
                  depth: int = 2) -> dict[str, Path]:
    """32 px PNGs in an ImageFolder tree (``data``) and two ViT checkpoints (``edge``, ``server``)."""
    rng = np.random.default_rng(0)
    data = root / "data"
    for c in range(classes):
        (data / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            img[8 * c:8 * c + 8] = 255  # a class-dependent stripe, so labels are not pure noise
            Image.fromarray(img).save(data / f"class{c}" / f"{i}.png")
    pre = Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic", 1.0)
    paths = {"data": data}
    for name, dim, seed in (("edge", 32, 1), ("server", 48, 2)):
        torch.manual_seed(seed)
        arch = VitArch(img_size=32, patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=2,
                       num_classes=classes)
        paths[name] = root / f"{name}.safetensors"
        save_checkpoint(paths[name], LoadedModel(arch.build().eval(), name, pre, []), arch=arch)
    return paths


def cached_tiny_eval(root: Path) -> dict[str, Path]:
    """:func:`tiny_eval_set` (3 classes × 10 images, 8-px patches, one block) and a quick ``patchcast eval``
    of it whose cache is in ``out`` (the folder the analysis scripts read)."""
    from patchcast.cli import main as patchcast_main

    paths = tiny_eval_set(root, classes=3, per_class=10, patch_size=8, depth=1)
    out = root / "out"
    assert patchcast_main(["eval", "--data", str(paths["data"]), "--edge", f"file:{paths['edge']}", "--server",
                           f"file:{paths['server']}", "--sweep", "quick", "--out", str(out), "--threads", "1",
                           "--bytes-sample", "4", "--bootstrap", "10", "--no-plots", "--no-rollout",
                           "--no-server-encoder"]) == 0
    return {**paths, "out": out}
