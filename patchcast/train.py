"""``patchcast train``: train a small ViT (CLS + patch tokens) on an ImageFolder tree or a tar of one.

CPU-first: the whole split is decoded once into a uint8 tensor, augmentation runs batched in
torch, the model runs under bf16 autocast where it pays (AMX through oneDNN; see :func:`use_bf16`)
with timm's fused attention *off*
(the fused SDPA backward is slow on CPU). AdamW, linear warm-up + cosine, label smoothing,
optional soft distillation from a teacher, and — for server models — token dropout: a subset of
patch tokens per batch so the model stays accurate on the subsets devices send. The subset is
either uniformly random or the top-k patches by a *selector* edge model's CLS attention (the
patches a device running that edge model would actually send), or a mix of both.

``device`` picks where the arithmetic runs (a CUDA GPU when one is there, else the CPU); every
random draw still comes from CPU generators, so a run's data order, crops and token subsets do
not depend on the device.

Resume is exact: every random draw of epoch ``e`` comes from generators seeded by
``(seed, e)``, and a checkpoint (weights, optimizer moments, step) is written at each epoch end.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from shared import datasets
from shared.attention import edge_forward
from shared.errors import ConfigError
from shared.models import (
    LoadedModel,
    Preprocess,
    VitArch,
    build_model,
    load_checkpoint,
    load_teacher,
    save_checkpoint,
    save_teacher_checkpoint,
    set_fused_attention,
)
from shared.region import from_patches, to_patches, window_side
from shared.scores import cls_attention_scores
from shared.subset import embed_all, forward_tokens, gather_tokens

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Augment = Literal["crop", "rrc"]
SUBSET_SIZE = 1000  # the fixed test subset whose accuracy the model card records for CI checks
SUBSET_SEED = 0


@dataclass(frozen=True)
class TrainConfig:
    data: str
    test_data: str | None
    out: str
    arch: VitArch
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    token_dropout: float = 0.0  # probability that a batch trains on a token subset
    token_keep_min: float = 0.25  # smallest kept fraction when token dropout applies
    token_selector: str | None = None  # edge model whose attention picks the subset (None: random subsets)
    token_attention_share: float = 1.0  # with a selector: share of subset batches it picks (the rest random)
    # Region retransmission: probability that a batch trains on glances (box-downsampled by
    # glance_downscale and upsampled back, as a worker sees them), half of those with a random
    # full-resolution window of glance_window of the side in place (what a region exchange answers on).
    glance_mix: float = 0.0
    glance_downscale: int = 2
    glance_window: float = 0.5
    # the codec a deployment sends with (patchcast codecs): glances and windows are encoded and decoded
    # before the model sees them, so it learns on the artefacts a worker decodes (None: exact pixels)
    glance_codec: str | None = None
    glance_quality: int = 90
    init: str | None = None  # start from these weights (fine-tuning) instead of random init
    # Train this timm CNN (random init) instead of the ViT: a distillation teacher, never an edge or
    # server model; arch then gives only img_size, patch_size (the grid it is scored on) and num_classes.
    cnn: str | None = None
    # "crop": reflect-pad + random crop + flip (CIFAR); "rrc": random-resized crop (area in
    # [rrc_scale_min, 1], aspect 3/4..4/3) + flip from the image decoded at 1.5x the input size (photos)
    aug: Augment = "crop"
    rrc_scale_min: float = 0.35
    mixup: float = 0.0  # mixup Beta(alpha, alpha) (0: off)
    cutmix: float = 0.0  # cutmix Beta(alpha, alpha) (0: off); with both, each mixed batch picks one at random
    mix_prob: float = 1.0  # probability that a batch is mixed when mixup or cutmix is on
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:N"
    teacher: str | None = None
    distill_weight: float = 0.5
    distill_temperature: float = 2.0
    seed: int = 0
    threads: int | None = None
    bf16: bool = True
    name: str = "model"
    classes: tuple[int, ...] = ()  # a specialist (expert): train on these global class ids only
    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD
    command: str = field(default_factory=lambda: shlex.join(["patchcast", *sys.argv[1:]]))

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ConfigError("epochs and batch_size must be positive")
        if not 0.0 <= self.token_dropout <= 1.0 or not 0.0 < self.token_keep_min <= 1.0:
            raise ConfigError("token_dropout must be in [0, 1] and token_keep_min in (0, 1]")
        if self.lr <= 0:
            raise ConfigError("lr must be positive")
        if not 0.0 <= self.distill_weight <= 1.0 or self.distill_temperature <= 0:
            raise ConfigError("distill_weight must be in [0, 1] and distill_temperature positive")
        if not 0.0 <= self.token_attention_share <= 1.0:
            raise ConfigError("token_attention_share must be in [0, 1]")
        if not 0.0 <= self.glance_mix <= 1.0 or not 0.0 < self.glance_window <= 1.0:
            raise ConfigError("glance_mix must be in [0, 1] and glance_window in (0, 1]")
        if self.glance_mix and (self.glance_downscale < 2 or self.arch.patch_size % self.glance_downscale):
            raise ConfigError(f"glance_downscale {self.glance_downscale} must be ≥ 2 and divide the patch size "
                              f"{self.arch.patch_size}")
        if self.glance_codec is not None:
            from shared.codecs import get_codec
            from shared.errors import ProtocolError

            try:
                get_codec(self.glance_codec)
            except ProtocolError as exc:
                raise ConfigError(f"glance_codec: {exc}") from exc
            if not 1 <= self.glance_quality <= 100:
                raise ConfigError("glance_quality must be in 1..100")
        if len(set(self.classes)) != len(self.classes) or any(c < 0 for c in self.classes):
            raise ConfigError("classes must be distinct class ids ≥ 0")
        if self.classes and self.arch.num_classes != len(self.classes):
            raise ConfigError(f"a specialist on {len(self.classes)} classes needs arch.num_classes = "
                              f"{len(self.classes)}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.aug not in ("crop", "rrc") or not 0.0 < self.rrc_scale_min <= 1.0:
            raise ConfigError(f"aug must be crop or rrc and rrc_scale_min in (0, 1], got {self.aug!r}, "
                              f"{self.rrc_scale_min}")
        if self.mixup < 0 or self.cutmix < 0 or not 0.0 <= self.mix_prob <= 1.0:
            raise ConfigError("mixup and cutmix must be ≥ 0 and mix_prob in [0, 1]")
        if self.cnn is not None and (self.token_dropout or self.token_selector or self.glance_mix or self.init
                                     or self.classes or self.arch.reg_tokens):
            raise ConfigError("a CNN (teacher) trains on whole images only: no token dropout, selector, glances, "
                              "init, classes or register tokens")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} asked for, but torch sees no CUDA device")
        return torch.device(self.device)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(input_size=self.arch.img_size, mean=self.mean, std=self.std,
                          interpolation="bicubic", crop_pct=1.0)


def use_bf16(setting: str, device: torch.device) -> bool:
    """Training arithmetic: ``auto`` is bf16 autocast on a GPU and, on a CPU, only where
    :mod:`shared.precision` measures bf16 clearly faster than fp32 (with AMX it is; on some CPUs
    with AVX512-BF16 and no AMX a training step ran 1.3× slower in bf16)."""
    from shared.precision import resolve

    if setting == "auto" and device.type != "cpu":
        return True
    try:
        return resolve(setting) == "bf16"
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def decode_all(ds: datasets.Dataset, pre: Preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole split as uint8 (N, H, W, 3) + labels: decoded once, then augmented in torch."""
    pixels, labels = datasets.to_tensor_batch(ds.samples, pre)
    return pixels, labels


def augment(pixels: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with reflect padding + horizontal flip, batched. uint8 (B,H,W,3) → float (B,3,H,W)."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    b, _, h, w = x.shape
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (B, H)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (B, W)
    x = x[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None],
          rows[:, None, :, None], cols[:, None, None, :]]
    flip = torch.rand(b, generator=gen) < 0.5
    x[flip] = x[flip].flip(-1)
    return x


def resized_crop(pixels: torch.Tensor, size: int, gen: torch.Generator, scale_min: float) -> torch.Tensor:
    """Random-resized crop + horizontal flip, batched (one ``grid_sample``): uint8 (B,h,w,3) → float
    (B,3,size,size) in [0, 1]. Each crop covers an area fraction in [scale_min, 1] of the image with
    aspect ratio in [3/4, 4/3], anywhere inside it."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    b = x.shape[0]
    area = scale_min + (1.0 - scale_min) * torch.rand(b, generator=gen)
    log_ratio = (torch.rand(b, generator=gen) * 2 - 1) * math.log(4 / 3)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def mix_batch(unit: torch.Tensor, y: torch.Tensor, num_classes: int, mixup: float, cutmix: float,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix with the batch reversed: images (B,3,H,W) and soft targets (B, classes).

    ``lam`` ~ Beta(alpha, alpha) drawn from a NumPy generator seeded from ``gen`` (resume stays exact);
    cutmix's lam is the area actually kept after clipping the box to the image."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    other = unit.flip(0)
    if use_cutmix:
        _, _, h, w = unit.shape
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1, x0, x1 = max(0, cy - ch // 2), min(h, cy + ch // 2), max(0, cx - cw // 2), min(w, cx + cw // 2)
        unit = unit.clone()
        unit[:, :, y0:y1, x0:x1] = other[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        unit = unit * lam + other * (1.0 - lam)
    onehot = F.one_hot(y, num_classes).float()
    return unit, onehot * lam + onehot.flip(0) * (1.0 - lam)


def _normalise(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class CodecRoundTrip:
    """A codec's encode + decode applied to training pixels: what a worker decodes from a device."""

    name: str
    quality: int = 90

    def __call__(self, pixels: torch.Tensor, patch_size: int, kept: list[np.ndarray] | None = None) -> torch.Tensor:
        """uint8 (B, H, W, 3) → the same, with each image's patches at ``kept[i]`` (every patch when
        ``kept`` is None) replaced by their decoded copies."""
        from shared.codecs import get_codec, quality_params

        codec = get_codec(self.name)
        params = quality_params(codec, self.quality)
        images = pixels.cpu().numpy()
        b, h, w, _ = images.shape
        grid = (h // patch_size, w // patch_size)
        out = np.empty_like(images)
        for i in range(b):
            idx = np.arange(grid[0] * grid[1]) if kept is None else np.asarray(kept[i])
            patches = to_patches(images[i], patch_size)
            patches[idx] = codec.decode(codec.encode(images[i], idx, patch_size, params), (h, w), idx, patch_size,
                                        params)
            out[i] = from_patches(patches, grid)
        return torch.from_numpy(out).to(pixels.device)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → uint8 (B, H, W, 3)."""
    return images.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.permute(0, 3, 1, 2).float().div_(255.0)


def glances(unit: torch.Tensor, factor: int, patch_size: int, window: float, gen: torch.Generator,
            hybrid: bool, wire: CodecRoundTrip | None = None) -> torch.Tensor:
    """A batch (B, 3, H, W) in [0, 1] as a worker sees region-exchange images: box-downsampled by
    ``factor`` and bilinearly upsampled back (the glance), or with ``hybrid`` the glance with one
    random full-resolution window per image (``window`` of the side, on the patch grid) in place.
    With ``wire``, the downsampled image (in p/s patches) and the window (its own payload) pass
    through that codec first, as they travel."""
    b, _, h, w = unit.shape
    if wire is None:
        small = F.avg_pool2d(unit, factor)
    else:  # the device's uint8 box mean (shared.region.downsample), then the codec
        means = F.avg_pool2d(_to_uint8(unit).permute(0, 3, 1, 2).float(), factor).round_()
        small = _to_unit(wire(means.to(torch.uint8).permute(0, 2, 3, 1), patch_size // factor))
    glance = F.interpolate(small, scale_factor=factor, mode="bilinear", align_corners=False)
    if not hybrid:
        return glance
    rows, cols = h // patch_size, w // patch_size
    side = window_side(min(rows, cols), window)
    top = torch.randint(0, rows - side + 1, (b,), generator=gen) * patch_size
    left = torch.randint(0, cols - side + 1, (b,), generator=gen) * patch_size
    y, x = torch.arange(h), torch.arange(w)
    inside = (((y[None, :] >= top[:, None]) & (y[None, :] < top[:, None] + side * patch_size))[:, :, None]
              & ((x[None, :] >= left[:, None]) & (x[None, :] < left[:, None] + side * patch_size))[:, None, :])
    if wire is not None:
        span = np.arange(side)
        kept = [((int(t) // patch_size + span)[:, None] * cols + (int(lft) // patch_size + span)[None, :]).ravel()
                for t, lft in zip(top, left, strict=True)]
        unit = _to_unit(wire(_to_uint8(unit), patch_size, kept))
    return torch.where(inside[:, None].to(unit.device), unit, glance)


TokenPick = Literal["attention", "random"]


def pick_tokens(kind: TokenPick, keep: int, scores: torch.Tensor | None, batch: int, num_patches: int,
                gen: torch.Generator) -> torch.Tensor:
    """(B, keep) patch indices: the selector's top-``keep`` by attention score, or uniformly random.

    The random draw happens either way, so the generator's stream (and so resume) does not depend
    on which kind was picked.
    """
    random_order = torch.rand(batch, num_patches, generator=gen).argsort(1)[:, :keep]
    if kind == "random":
        return random_order
    if scores is None:
        raise ValueError("attention token picks need selector scores")
    return scores.float().topk(keep, dim=1).indices.cpu()


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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


def _save_state(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            st = opt.state.get(p, {})
            for key, val in st.items():
                t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
                tensors[f"opt.{gi}.{pi}.{key}"] = t.detach().clone().contiguous()
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().clone().contiguous()
    tmp = out / "train_state.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    tmp.replace(out / "train_state.safetensors")  # atomic: an interrupted write never corrupts resume


def _load_state(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    path = out / "train_state.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["meta"])
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            prefix = f"opt.{gi}.{pi}."
            st = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if st:
                # moments live with their parameter; Adam keeps its step counter on the CPU
                opt.state[p] = {k: v if k == "step" else v.to(p.device) for k, v in st.items()}
    return dict(meta)


ProgressFn = Callable[[str, int, int, dict[str, float]], None]


def train(cfg: TrainConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train (or resume) and write ``<out>/model.safetensors`` plus a model card. Returns the card."""
    device = cfg.torch_device()  # fail before the data is decoded
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pre = cfg.preprocess
    t_load = time.perf_counter()
    train_ds = datasets.load(cfg.data)
    if cfg.classes:
        train_ds = train_ds.restrict(cfg.classes)
    # random-resized crops sample from a finer copy, so zoomed-in crops keep detail
    train_pre = replace(pre, input_size=pre.input_size * 3 // 2) if cfg.aug == "rrc" else pre
    train_x, train_y = decode_all(train_ds, train_pre)
    test_x = test_y = None
    test_ds = None
    if cfg.test_data:
        test_ds = datasets.load(cfg.test_data)
        if cfg.classes:
            test_ds = test_ds.restrict(cfg.classes)
        test_x, test_y = decode_all(test_ds, pre)
    load_s = time.perf_counter() - t_load
    if cfg.arch.num_classes != len(train_ds.class_names):
        raise ConfigError(f"arch has {cfg.arch.num_classes} classes, data has {len(train_ds.class_names)}")

    torch.manual_seed(cfg.seed)
    model: torch.nn.Module = cfg.arch.build() if cfg.cnn is None else build_cnn(cfg.cnn, cfg.arch.num_classes)
    if cfg.init:
        start = build_model(cfg.init, role="edge")  # any layout: the state-dict check below decides
        init_state = start.model.state_dict()
        if cfg.classes and not start.class_ids and start.num_classes != len(cfg.classes):
            init_state = specialist_head(init_state, cfg.classes, cfg.init)
        try:
            model.load_state_dict(init_state)
        except RuntimeError as exc:
            raise ConfigError(f"--init {cfg.init}: weights do not fit the architecture asked for") from exc
    # On a CPU the fused SDPA backward is the slow part of a step; on a GPU the fused kernel wins.
    if isinstance(model, VisionTransformer):
        set_fused_attention(model, device.type != "cpu")
    else:
        model.to(memory_format=torch.channels_last)  # oneDNN's fast layout for convolutions
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n
                                                                and "cls_token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    teacher = None
    teacher_pre = pre
    if cfg.teacher:
        loaded_teacher = load_teacher(cfg.teacher)
        teacher, teacher_pre = loaded_teacher.model.eval().to(device), loaded_teacher.preprocess
        if teacher_pre.input_size != cfg.arch.img_size:
            raise ConfigError(f"the teacher sees {teacher_pre.input_size} px images, the model trained "
                              f"{cfg.arch.img_size} px")
        if not isinstance(teacher, VisionTransformer):
            teacher.to(memory_format=torch.channels_last)
    selector = None
    wire = CodecRoundTrip(cfg.glance_codec, cfg.glance_quality) if cfg.glance_codec else None
    if cfg.token_selector:
        loaded_selector = build_model(cfg.token_selector, role="edge")
        selector = loaded_selector.model.eval().to(device)
        selector_pre = loaded_selector.preprocess
        if (loaded_selector.preprocess.input_size, selector.patch_embed.patch_size) != \
                (cfg.arch.img_size, (cfg.arch.patch_size, cfg.arch.patch_size)):
            raise ConfigError("the token selector must see the same image and patch grid as the model trained")

    steps_per_epoch = len(train_y) // cfg.batch_size  # drop the last partial batch: fixed shapes
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    state = _load_state(out, model, opt)
    history: list[dict[str, float]] = []
    start_epoch, wall_before = 0, 0.0
    if state is not None:
        if state["config"]["arch"] != asdict(cfg.arch):
            raise ConfigError(f"{out}: existing checkpoint has another architecture; use a new --out")
        start_epoch, history, wall_before = state["epoch"], state["history"], state["wall_s"]
    num_patches = (cfg.arch.img_size // cfg.arch.patch_size) ** 2
    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(train_y), generator=gen)
        loss_sum, seen, t_epoch = 0.0, 0, time.perf_counter()
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup_steps, cfg.lr)
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            if cfg.aug == "rrc":
                unit = resized_crop(train_x[idx], cfg.arch.img_size, gen, cfg.rrc_scale_min).to(device)
            else:
                unit = augment(train_x[idx], gen).to(device, non_blocking=True)
            if cfg.glance_mix > 0 and float(torch.rand(1, generator=gen)) < cfg.glance_mix:
                hybrid = float(torch.rand(1, generator=gen)) < 0.5
                unit = glances(unit, cfg.glance_downscale, cfg.arch.patch_size, cfg.glance_window, gen, hybrid,
                               wire)
            y = train_y[idx].to(device, non_blocking=True)
            target = y
            if (cfg.mixup > 0 or cfg.cutmix > 0) and float(torch.rand(1, generator=gen)) < cfg.mix_prob:
                unit, target = mix_batch(unit, y, cfg.arch.num_classes, cfg.mixup, cfg.cutmix, gen)
            x = _normalise(unit, pre)
            keep = num_patches
            if cfg.token_dropout > 0 and float(torch.rand(1, generator=gen)) < cfg.token_dropout:
                lo = max(1, round(cfg.token_keep_min * num_patches))
                keep = int(torch.randint(lo, num_patches + 1, (1,), generator=gen))
            kind: TokenPick = "random"
            if keep < num_patches and selector is not None:
                kind = "attention" if float(torch.rand(1, generator=gen)) < cfg.token_attention_share else "random"
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                if keep < num_patches:
                    scores = None
                    if kind == "attention" and selector is not None:
                        with torch.no_grad():
                            scores = cls_attention_scores(edge_forward(selector, _normalise(unit, selector_pre))
                                                          .cls_attention)
                    kept = pick_tokens(kind, keep, scores, len(y), num_patches, gen).to(device)
                    assert isinstance(model, VisionTransformer)  # CNNs take no token dropout (config check)
                    logits = forward_tokens(model, gather_tokens(embed_all(model, x), kept))
                else:
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(_normalise(unit, teacher_pre)).float()
                    tau = cfg.distill_temperature
                    kd = F.kl_div(F.log_softmax(logits.float() / tau, -1), F.log_softmax(t_logits / tau, -1),
                                  reduction="batchmean", log_target=True) * tau * tau
                    loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
            if progress:
                progress("step", i + 1, steps_per_epoch, {"epoch": epoch + 1, "loss": loss_sum / seen,
                                                          "img_s": seen / (time.perf_counter() - t_epoch)})
        epoch_s = time.perf_counter() - t_epoch
        record = {"epoch": epoch + 1, "loss": loss_sum / max(1, seen), "epoch_s": epoch_s,
                  "img_s": seen / epoch_s}
        if test_x is not None and test_y is not None:
            sub = torch.from_numpy(np.random.default_rng(SUBSET_SEED).permutation(len(test_y))[:2000])
            record["val_acc_2k"] = evaluate(model, test_x[sub], test_y[sub], pre, cfg.bf16)
            model.train()
        history.append(record)
        _save_state(out, model, opt, {"epoch": epoch + 1, "history": history, "config": _jsonable(cfg),
                                      "wall_s": wall_before + time.perf_counter() - t0})
        if progress:
            progress("epoch", epoch + 1, cfg.epochs, record)

    wall_s = wall_before + time.perf_counter() - t0
    model.eval()
    model.to("cpu")
    if cfg.cnn is not None:
        model.to(memory_format=torch.contiguous_format)
        save_teacher_checkpoint(out / "model.safetensors", model, cfg.cnn, pre, list(train_ds.class_names))
    else:
        assert isinstance(model, VisionTransformer)
        set_fused_attention(model, True)
        loaded = LoadedModel(model=model, name=cfg.name, preprocess=pre, class_names=list(train_ds.class_names),
                             class_ids=list(cfg.classes))
        save_checkpoint(out / "model.safetensors", loaded, arch=cfg.arch)
    card = model_card(cfg, model, train_ds, test_ds, test_x, test_y, history, wall_s, load_s)
    write_card(out, cfg.name, card)
    return card


def build_cnn(name: str, num_classes: int) -> torch.nn.Module:
    """A timm CNN with random init (a distillation teacher; no downloads)."""
    import timm

    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as exc:  # unknown model name
        raise ConfigError(f"--arch {name!r}: {exc}") from exc
    if isinstance(model, VisionTransformer):
        raise ConfigError(f"--arch {name!r} is a ViT: train ViTs with the default --arch vit")
    return model


def specialist_head(state: dict[str, torch.Tensor], classes: Sequence[int], ref: str) -> dict[str, torch.Tensor]:
    """A general model's weights for a specialist on ``classes``: its classifier rows of those classes,
    in that order, so the specialist starts as the general model's softmax restricted to its classes
    and fine-tuning only has to improve on that."""
    head_w, head_b = state.get("head.weight"), state.get("head.bias")
    if head_w is None or head_b is None or max(classes) >= head_w.shape[0]:
        raise ConfigError(f"--init {ref}: its head has no rows for classes {list(classes)}")
    rows = torch.tensor(list(classes))
    return {**state, "head.weight": head_w[rows].clone(), "head.bias": head_b[rows].clone()}


def _jsonable(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["arch"] = asdict(cfg.arch)
    return d


def subset_indices(n: int) -> list[int]:
    """The fixed 1,000-image test subset (seeded permutation) that CI re-checks against the card."""
    return sorted(int(i) for i in np.random.default_rng(SUBSET_SEED).permutation(n)[:SUBSET_SIZE])


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
        "training": {k: v for k, v in _jsonable(cfg).items() if k not in ("arch", "command")},
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
