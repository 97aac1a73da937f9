"""``patchcast train``: train a small ViT (CLS + patch tokens) on an ImageFolder tree or a tar of one.

CPU-first: the whole split is decoded once into a uint8 tensor, augmentation runs batched in
torch, the model runs under bf16 autocast where it pays (AMX through oneDNN; see :func:`shared.precision.resolve`)
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

This module is the run and its loop; what a batch looks like (augmentations, glances, token
subsets) is :mod:`patchcast.augment`, and the model card written at the end :mod:`patchcast.model_card`.
"""

from __future__ import annotations

import json
import math
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
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from patchcast.augment import (
    CodecRoundTrip,
    TokenPick,
    augment,
    decode_all,
    glances,
    mix_batch,
    normalise,
    pick_tokens,
    resized_crop,
)
from patchcast.model_card import SUBSET_SEED, evaluate, jsonable, model_card, write_card
from shared import datasets
from shared.attention import edge_forward
from shared.errors import ConfigError
from shared.models import (
    LoadedModel,
    Preprocess,
    VitArch,
    build_model,
    load_teacher,
    save_checkpoint,
    save_teacher_checkpoint,
    set_fused_attention,
)
from shared.scores import cls_attention_scores
from shared.subset import embed_all, forward_tokens, gather_tokens

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Augment = Literal["crop", "rrc"]


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
    token_spread: int = 0  # with a selector: its picks in the spread order of these cells (selection.spread)
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
        if self.token_spread < 0:
            raise ConfigError("token_spread must be ≥ 0 (a cell side in patches; 0: top-k by attention)")
        if self.token_spread and not self.token_selector:
            raise ConfigError("token_spread orders a token selector's picks: it needs token_selector")
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


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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
        if isinstance(model, VisionTransformer):
            init_state = resampled_pos_embed(init_state, start.model, model)
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
            x = normalise(unit, pre)
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
                            scores = cls_attention_scores(edge_forward(selector, normalise(unit, selector_pre))
                                                          .cls_attention)
                    kept = pick_tokens(kind, keep, scores, len(y), num_patches, gen,
                                       cfg.token_spread).to(device)
                    assert isinstance(model, VisionTransformer)  # CNNs take no token dropout (config check)
                    logits = forward_tokens(model, gather_tokens(embed_all(model, x), kept))
                else:
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(normalise(unit, teacher_pre)).float()
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
        _save_state(out, model, opt, {"epoch": epoch + 1, "history": history, "config": jsonable(cfg),
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


def resampled_pos_embed(state: dict[str, torch.Tensor], source: torch.nn.Module,
                        target: VisionTransformer) -> dict[str, torch.Tensor]:
    """``state`` with its position embedding resampled (bicubic, as timm does) from ``source``'s patch grid
    to ``target``'s: fine-tuning at another input size. The prefix tokens' (CLS, registers) rows are kept
    as they are. Unchanged when the grids match or when either model is not a timm ViT with absolute
    position embeddings (the state-dict check that follows decides then)."""
    old = state.get("pos_embed")
    if (old is None or not isinstance(source, VisionTransformer) or target.pos_embed is None
            or old.shape == target.pos_embed.shape or source.no_embed_class != target.no_embed_class
            or source.num_prefix_tokens != target.num_prefix_tokens):
        return state
    prefix = 0 if source.no_embed_class else source.num_prefix_tokens
    old_grid = list(source.patch_embed.grid_size)
    if old.shape[1] != prefix + old_grid[0] * old_grid[1]:
        return state
    out = dict(state)
    out["pos_embed"] = resample_abs_pos_embed(old, new_size=list(target.patch_embed.grid_size), old_size=old_grid,
                                              num_prefix_tokens=prefix)
    return out


def specialist_head(state: dict[str, torch.Tensor], classes: Sequence[int], ref: str) -> dict[str, torch.Tensor]:
    """A general model's weights for a specialist on ``classes``: its classifier rows of those classes,
    in that order, so the specialist starts as the general model's softmax restricted to its classes
    and fine-tuning only has to improve on that."""
    head_w, head_b = state.get("head.weight"), state.get("head.bias")
    if head_w is None or head_b is None or max(classes) >= head_w.shape[0]:
        raise ConfigError(f"--init {ref}: its head has no rows for classes {list(classes)}")
    rows = torch.tensor(list(classes))
    return {**state, "head.weight": head_w[rows].clone(), "head.bias": head_b[rows].clone()}


