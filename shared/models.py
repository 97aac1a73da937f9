"""Build edge and server ViTs by name.

Three sources, one reference syntax:

* ``timm:<registry name>`` (or a bare timm name) — e.g. ``timm:deit_base_patch16_224``; with
  ``pretrained=True`` timm fetches the official weights (needs network or a warm HF cache).
* ``file:<path>.safetensors`` — a local checkpoint. Only safetensors is accepted: it cannot run
  code on load, unlike pickled ``.pth`` files.
* ``zoo:<name>`` (or a bare zoo name) — a checkpoint shipped in :mod:`shared.zoo`.

A PatchCast checkpoint is a safetensors file whose metadata holds ``patchcast.arch`` (JSON of
:class:`VitArch`, or a timm registry name under ``patchcast.timm_name``), ``patchcast.data``
(preprocessing config) and optionally ``patchcast.class_names``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from shared.errors import ModelError

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
Role = Literal["edge", "server"]


@dataclass(frozen=True)
class VitArch:
    """Shape of a plain ViT (patch tokens + CLS), enough to rebuild it without timm's registry."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 10
    # Register tokens (Darcet et al., 2024): extra learned tokens after CLS that absorb the
    # attention a small ViT would otherwise park on a few background patches. Edge models only.
    reg_tokens: int = 0

    def __post_init__(self) -> None:
        if self.img_size <= 0 or self.patch_size <= 0 or self.img_size % self.patch_size:
            raise ModelError(f"img_size {self.img_size} must be a positive multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ModelError(f"embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
        if self.depth <= 0 or self.num_classes <= 0:
            raise ModelError("depth and num_classes must be positive")
        if self.reg_tokens < 0:
            raise ModelError(f"reg_tokens must be >= 0, got {self.reg_tokens}")

    def build(self) -> VisionTransformer:
        return VisionTransformer(
            img_size=self.img_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            num_classes=self.num_classes,
            class_token=True,
            reg_tokens=self.reg_tokens,
            global_pool="token",
        )


@dataclass(frozen=True)
class Preprocess:
    """Preprocessing taken from the model's config (timm ``pretrained_cfg`` or checkpoint metadata)."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    @property
    def resize_size(self) -> int:
        """Shorter side before the center crop (timm's convention: floor(input_size / crop_pct))."""
        return math.floor(self.input_size / self.crop_pct) if self.crop_pct < 1.0 else self.input_size

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preprocess:
        return cls(
            input_size=int(data["input_size"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            interpolation=str(data.get("interpolation", "bicubic")),
            crop_pct=float(data.get("crop_pct", 1.0)),
        )

    @classmethod
    def from_timm(cls, model: torch.nn.Module) -> Preprocess:
        cfg = timm.data.resolve_data_config({}, model=model)
        return cls(
            input_size=int(cfg["input_size"][-1]),
            mean=tuple(float(v) for v in cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
            interpolation=str(cfg.get("interpolation", "bicubic")),
            crop_pct=float(cfg.get("crop_pct", 1.0)),
        )


@dataclass
class LoadedModel:
    """A ViT ready for PatchCast, with what the rest of the system needs to know about it."""

    model: VisionTransformer
    name: str
    preprocess: Preprocess
    class_names: list[str] = field(default_factory=list)
    # A specialist (expert) model's outputs stand for these global class ids, output i for
    # class_ids[i]; empty for a model over every class (output i is class i).
    class_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.class_ids and len(self.class_ids) != self.num_classes:
            raise ModelError(f"{self.name}: {len(self.class_ids)} class ids for {self.num_classes} outputs")
        if len(set(self.class_ids)) != len(self.class_ids) or any(c < 0 for c in self.class_ids):
            raise ModelError(f"{self.name}: class ids must be distinct and ≥ 0")

    def global_class(self, output: int) -> int:
        """The global class id of one output index (the identity for a model over every class)."""
        return self.class_ids[output] if self.class_ids else output

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    @property
    def grid(self) -> tuple[int, int]:
        gh, gw = self.model.patch_embed.grid_size
        return int(gh), int(gw)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)


def zoo_names() -> list[str]:
    return sorted(p.stem for p in ZOO_DIR.glob("*.safetensors"))


def _check_plain_vit(model: torch.nn.Module, name: str) -> VisionTransformer:
    """A ViT whose patch tokens follow CLS (+ optional registers), each with its own pos-embed."""
    if not isinstance(model, VisionTransformer):
        raise ModelError(f"{name}: PatchCast needs a timm VisionTransformer, got {type(model).__name__}")
    if model.cls_token is None or model.no_embed_class:
        raise ModelError(f"{name}: needs a CLS token and pos-embed on CLS (DeiT/ViT layout)")
    if model.pos_embed is None or getattr(model, "dynamic_img_size", False):
        raise ModelError(f"{name}: needs a fixed absolute position embedding")
    return model


def read_checkpoint_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise ModelError(f"{path}: not a readable safetensors checkpoint ({exc})") from exc


def _load_module(path: Path) -> tuple[torch.nn.Module, dict[str, str]]:
    """Build the architecture a checkpoint's metadata names and load its weights (any timm model)."""
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise ModelError(f"{path}: only .safetensors checkpoints are accepted (pickled files can run code)")
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    meta = read_checkpoint_metadata(path)
    try:
        if "patchcast.arch" in meta:
            model: torch.nn.Module = VitArch(**json.loads(meta["patchcast.arch"])).build()
        elif "patchcast.timm_name" in meta:
            num_classes = int(meta.get("patchcast.num_classes", "1000"))
            model = timm.create_model(meta["patchcast.timm_name"], pretrained=False, num_classes=num_classes)
        else:
            raise ModelError(f"{path}: metadata names no architecture (patchcast.arch or patchcast.timm_name)")
        state = load_file(str(path))
        # fp16/bf16 storage (the zoo keeps large models at half size): compute stays fp32
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
    except ModelError:
        raise
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{path}: invalid checkpoint ({exc})") from exc
    if missing or unexpected:
        raise ModelError(f"{path}: weights do not fit the architecture (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.eval(), meta


def _preprocess_of(meta: dict[str, str], model: torch.nn.Module, path: Path) -> Preprocess:
    try:
        return (Preprocess.from_json(json.loads(meta["patchcast.data"])) if "patchcast.data" in meta
                else Preprocess.from_timm(model))
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"{path}: invalid preprocessing metadata ({exc})") from exc


def load_checkpoint(path: str | Path, name: str | None = None) -> LoadedModel:
    """Load a PatchCast safetensors checkpoint (architecture and preprocessing from its metadata).

    Only ViTs: edge and server models must have patch tokens (see :func:`load_teacher` for CNNs)."""
    path = Path(path)
    model, meta = _load_module(path)
    vit = _check_plain_vit(model, str(path))
    preprocess = _preprocess_of(meta, vit, path)
    try:
        class_names = json.loads(meta.get("patchcast.class_names", "[]"))
        class_ids = [int(c) for c in json.loads(meta.get("patchcast.class_ids", "[]"))]
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{path}: invalid checkpoint ({exc})") from exc
    return LoadedModel(model=vit, name=name or path.stem, preprocess=preprocess,
                       class_names=[str(c) for c in class_names], class_ids=class_ids)


@dataclass(frozen=True)
class Teacher:
    """A distillation teacher: any timm classifier (a CNN too), used only to train the zoo's ViTs."""

    model: torch.nn.Module
    preprocess: Preprocess

    def __post_init__(self) -> None:
        if not isinstance(self.model, torch.nn.Module):
            raise ModelError(f"a teacher must be a torch module, got {type(self.model).__name__}")


def load_teacher(ref: str) -> Teacher:
    """A teacher from ``file:PATH``/``zoo:NAME`` (a ViT or a timm CNN checkpoint) or any other reference
    :func:`build_model` takes. CNNs are accepted here only: edge and server roles stay ViT-only."""
    kind, _, rest = ref.partition(":")
    if not rest:
        kind, rest = _guess_kind(ref), ref
    if kind in ("file", "zoo"):
        path = ZOO_DIR / f"{rest}.safetensors" if kind == "zoo" else Path(rest)
        model, meta = _load_module(path)
        return Teacher(model=model, preprocess=_preprocess_of(meta, model, path))
    loaded = build_model(ref, role="edge")
    return Teacher(model=loaded.model, preprocess=loaded.preprocess)


def save_teacher_checkpoint(path: str | Path, model: torch.nn.Module, timm_name: str, preprocess: Preprocess,
                            class_names: list[str]) -> None:
    """A timm CNN teacher's weights + the metadata :func:`load_teacher` needs."""
    from safetensors.torch import save_file

    meta = {"patchcast.data": json.dumps(preprocess.to_json()), "patchcast.class_names": json.dumps(class_names),
            "patchcast.timm_name": timm_name, "patchcast.num_classes": str(len(class_names))}
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def save_checkpoint(path: str | Path, loaded: LoadedModel, *, arch: VitArch | None = None,
                    timm_name: str | None = None, extra: dict[str, str] | None = None) -> None:
    """Write weights + the metadata :func:`load_checkpoint` needs."""
    from safetensors.torch import save_file

    meta = {"patchcast.data": json.dumps(loaded.preprocess.to_json()),
            "patchcast.class_names": json.dumps(loaded.class_names)}
    if loaded.class_ids:
        meta["patchcast.class_ids"] = json.dumps(loaded.class_ids)
    if arch is not None:
        meta["patchcast.arch"] = json.dumps(asdict(arch))
    elif timm_name is not None:
        meta["patchcast.timm_name"] = timm_name
        meta["patchcast.num_classes"] = str(loaded.num_classes)
    else:
        raise ModelError("save_checkpoint needs arch or timm_name")
    meta.update(extra or {})
    state = {k: v.detach().contiguous().clone() for k, v in loaded.model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def build_model(ref: str, *, pretrained: bool = False, role: Role = "server") -> LoadedModel:
    """Build a model from ``timm:NAME``, ``file:PATH``, ``zoo:NAME`` or a bare zoo/timm name/path.

    ``role="edge"`` turns fused attention off so attention maps can be read
    (see :mod:`shared.attention`); the server keeps fused SDPA, which is faster.
    """
    kind, _, rest = ref.partition(":")
    if not rest:
        kind, rest = _guess_kind(ref), ref
    if kind == "zoo":
        path = ZOO_DIR / f"{rest}.safetensors"
        if not path.is_file():
            raise ModelError(f"unknown zoo model {rest!r}; available: {', '.join(zoo_names()) or 'none'}")
        loaded = load_checkpoint(path, name=rest)
    elif kind == "file":
        loaded = load_checkpoint(rest)
    elif kind == "timm":
        try:
            model = timm.create_model(rest, pretrained=pretrained)
        except RuntimeError as exc:  # unknown model name
            raise ModelError(f"timm model {rest!r}: {exc}") from exc
        except Exception as exc:  # network / hub failures when pretrained=True
            raise ModelError(f"timm model {rest!r} (pretrained={pretrained}) could not be loaded: {exc}") from exc
        vit = _check_plain_vit(model, rest)
        loaded = LoadedModel(model=vit.eval(), name=rest, preprocess=Preprocess.from_timm(vit),
                             class_names=[])
    else:
        raise ModelError(f"model reference {ref!r}: expected timm:NAME, file:PATH or zoo:NAME")
    if role == "edge":
        set_fused_attention(loaded.model, False)
    else:
        check_server_layout(loaded, ref)
    return loaded


def check_server_layout(loaded: LoadedModel, ref: str) -> None:
    """The server sees CLS + the received patches only (``shared.subset``, ``shared.packing``)."""
    if loaded.model.reg_token is not None:
        raise ModelError(f"{ref}: register tokens are supported on edge models only, not as a server")


def _guess_kind(ref: str) -> str:
    if ref.endswith(".safetensors") or "/" in ref:
        return "file"
    if ref in zoo_names():
        return "zoo"
    return "timm"


def set_fused_attention(model: VisionTransformer, enabled: bool) -> None:
    for blk in model.blocks:
        blk.attn.fused_attn = enabled  # type: ignore[union-attr]
