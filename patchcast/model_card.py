"""A trained model's card: its accuracy (the saved checkpoint, reloaded), the data, the command and
the machine, written as ``<name>.json`` and a Markdown summary ``<name>.md`` next to the weights.

The fixed test subset (:func:`subset_indices`) is what CI re-checks against a card's number.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shared import datasets
from shared.models import Preprocess, load_checkpoint, load_teacher

if TYPE_CHECKING:
    from patchcast.train import TrainConfig

SUBSET_SIZE = 1000  # the fixed test subset whose accuracy the model card records for CI checks


SUBSET_SEED = 0


@torch.inference_mode()
def evaluate(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, pre: Preprocess,
             bf16: bool, batch_size: int = 500) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = datasets.normalize(pixels[start:start + batch_size], pre).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        correct += int((logits.argmax(-1).cpu() == labels[start:start + batch_size]).sum())
    return correct / max(1, len(labels))


def subset_indices(n: int) -> list[int]:
    """The fixed 1,000-image test subset (seeded permutation) that CI re-checks against the card."""
    return sorted(int(i) for i in np.random.default_rng(SUBSET_SEED).permutation(n)[:SUBSET_SIZE])


def jsonable(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["arch"] = asdict(cfg.arch)
    return d


def model_card(cfg: TrainConfig, model: torch.nn.Module, train_ds: datasets.Dataset,
               test_ds: datasets.Dataset | None, test_x: torch.Tensor | None, test_y: torch.Tensor | None,
               history: list[dict[str, float]], wall_s: float, load_s: float) -> dict[str, Any]:
    """Evaluate the final weights (the checkpoint as saved, reloaded) and describe the run."""
    path = Path(cfg.out) / "model.safetensors"
    reloaded = load_checkpoint(path).model if cfg.cnn is None else load_teacher(f"file:{path}").model
    params = sum(p.numel() for p in model.parameters())
    architecture = ({"family": "timm VisionTransformer (CLS + patch tokens)", **asdict(cfg.arch), "params": params}
                    if cfg.cnn is None else
                    {"family": f"timm {cfg.cnn} (CNN, random init: a distillation teacher only)",
                     "timm_name": cfg.cnn, "img_size": cfg.arch.img_size, "num_classes": cfg.arch.num_classes,
                     "params": params})
    card: dict[str, Any] = {
        "name": cfg.name,
        "architecture": architecture,
        "preprocess": cfg.preprocess.to_json(),
        "class_names": list(train_ds.class_names),
        "class_ids": list(cfg.classes),  # a specialist's outputs → global class ids ([] = every class)
        # The data as named on the command line (relative to the data root), not this machine's path.
        "data": {"train": cfg.data, "train_sha256": _sha_or_none(train_ds.source),
                 "train_images": len(train_ds),
                 "test": cfg.test_data if test_ds else None,
                 "test_sha256": _sha_or_none(test_ds.source) if test_ds else None},
        "training": {k: v for k, v in jsonable(cfg).items() if k not in ("arch", "command")},
        "command": cfg.command,
        "epochs": cfg.epochs,
        "wall_time_s": round(wall_s, 1),
        "data_decode_s": round(load_s, 1),
        "history": history,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": _device_name(cfg.torch_device())},
    }
    parent = init_card(cfg.init)
    if parent is not None:
        card["init_from"] = parent
    if test_x is not None and test_y is not None:
        # fp32 evaluation: what users (and CI) get when they load the checkpoint on any CPU
        card["test_accuracy"] = round(evaluate(reloaded, test_x, test_y, cfg.preprocess, bf16=False), 4)
        sub = torch.tensor(subset_indices(len(test_y)))
        card["test_subset"] = {"size": len(sub), "seed": SUBSET_SEED, "rule": "numpy default_rng(seed)"
                               ".permutation(len(test))[:size], sorted",
                               "accuracy": round(evaluate(reloaded, test_x[sub], test_y[sub],
                                                          cfg.preprocess, bf16=False), 4)}
    return card


def init_card(ref: str | None) -> dict[str, Any] | None:
    """What a fine-tuned model started from: the starting checkpoint's own card, when it has one
    (``zoo:NAME`` → ``NAME.json`` in the zoo; ``file:DIR/model.safetensors`` → the card in DIR)."""
    if not ref:
        return None
    from shared.models import ZOO_DIR

    kind, _, rest = ref.partition(":")
    if kind == "zoo":
        candidates = [ZOO_DIR / f"{rest}.json"]
    elif kind == "file":
        candidates = sorted(Path(rest).parent.glob("*.json"))
    else:
        return {"model": ref}
    for path in candidates:
        if path.is_file():
            parent = json.loads(path.read_text())
            keep = ("name", "command", "epochs", "wall_time_s", "test_accuracy", "machine", "init_from")
            return {"model": ref, **{k: parent[k] for k in keep if k in parent}}
    return {"model": ref}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha_or_none(source: str) -> str | None:
    p = Path(source)
    return sha256_of(p) if p.is_file() else None


def _where(machine: dict[str, Any]) -> str:
    device = machine.get("device", "cpu")
    cpu = f"{machine['threads']} threads ({machine['processor'] or machine['platform']})"
    return cpu if device == "cpu" else f"{device} ({cpu} for data)"


def write_card(out: Path, name: str, card: dict[str, Any]) -> None:
    (out / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    a = card["architecture"]
    lines = [
        f"# Model card: {name}", "",
        f"- Architecture: {a['family']}, img {a['img_size']}, "
        + (f"patch {a['patch_size']}, dim {a['embed_dim']}, depth {a['depth']}, heads {a['num_heads']}"
           f"{', ' + str(a['reg_tokens']) + ' register tokens' if a.get('reg_tokens') else ''}, "
           if "embed_dim" in a else "")
        + f"{a['params']:,} parameters",
        f"- Data: `{Path(card['data']['train']).name}` (sha256 `{card['data']['train_sha256']}`), "
        f"{card['data']['train_images']:,} images",
        f"- Training: {card['epochs']} epochs, wall time {card['wall_time_s'] / 60:.1f} min "
        f"on {_where(card['machine'])}",
        f"- Settings: {json.dumps(card['training'])}",
        f"- Command: `{card['command']}`",
    ]
    if card.get("class_ids"):
        lines.append(f"- Specialist (expert) on classes {card['class_ids']} "
                     f"({', '.join(card['class_names'])}): output i is class {card['class_ids']}[i]; "
                     f"accuracies are on those classes' images only")
    parent = card.get("init_from")
    while parent:  # a fine-tuned model: say what it started from, and what that started from
        lines.append(f"- Started from `{parent['model']}`" + (
            f": {parent['epochs']} epochs, wall time {parent['wall_time_s'] / 60:.1f} min, test accuracy "
            f"{parent['test_accuracy'] * 100:.2f} %, command `{parent['command']}`" if "command" in parent else ""))
        parent = parent.get("init_from")
    if "test_accuracy" in card:
        lines += [f"- Test accuracy (all {Path(card['data']['test']).name} images, fp32): "
                  f"**{card['test_accuracy'] * 100:.2f} %**",
                  f"- Fixed {card['test_subset']['size']}-image subset accuracy (CI check): "
                  f"{card['test_subset']['accuracy'] * 100:.2f} %"]
    lines += ["", "| epoch | loss | val acc (2k) | images/s |", "|---|---|---|---|"]
    for h in card["history"]:
        lines.append(f"| {h['epoch']} | {h['loss']:.4f} | {h.get('val_acc_2k', float('nan')) * 100:.1f} % "
                     f"| {h['img_s']:.0f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
