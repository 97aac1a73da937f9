"""``patchcast train``: train an edge or server ViT for the model zoo (see :mod:`patchcast.train`)."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from shared.errors import ConfigError
from shared.precision import PRECISION_SETTINGS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a small ViT (edge or server) on an image folder or tar",
        description="Train a timm VisionTransformer (CLS + patch tokens), on a CUDA GPU when there is one, else "
        "on the CPU, with bf16 autocast where it is faster than fp32 (--precision). "
        "Writes OUT/train_state.safetensors every epoch (re-running the same command resumes exactly), "
        "then OUT/model.safetensors and a model card (NAME.json, NAME.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="cifar10/train.tar",
                   help="training ImageFolder tree or tar of one (relative paths resolve under $PATCHCAST_DATA)")
    p.add_argument("--test-data", default="cifar10/test.tar", help="held-out set for the model card ('' = none)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, card)")
    p.add_argument("--name", default="model", help="model name (zoo name when exported)")
    p.add_argument("--arch", default="vit", metavar="vit|TIMM_CNN",
                   help="vit (an edge or server model), or a timm CNN name such as resnet18, trained from random "
                   "init as a distillation teacher (--teacher) only: PatchCast serves ViTs")
    p.add_argument("--norm", choices=("cifar", "imagenet"), default="cifar",
                   help="input mean/std: CIFAR-10's, or ImageNet's (photos such as Imagenette)")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--dim", type=int, default=96, help="embedding width")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--mlp-ratio", type=float, default=4.0)
    p.add_argument("--reg-tokens", type=int, default=0,
                   help="register tokens after CLS (edge models): they take the attention a small ViT would "
                   "otherwise park on a few background patches, so its CLS attention ranks patches better")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--aug", choices=("crop", "rrc"), default="crop",
                   help="crop: reflect-pad 4 + random crop + flip (CIFAR); rrc: random-resized crop + flip, "
                   "sampled from the image decoded at 1.5x the input size (photos)")
    p.add_argument("--rrc-scale-min", type=float, default=0.35, help="with --aug rrc: smallest crop area fraction")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup Beta(alpha, alpha) (0: off)")
    p.add_argument("--cutmix", type=float, default=0.0,
                   help="cutmix Beta(alpha, alpha) (0: off); with --mixup too, each mixed batch picks one")
    p.add_argument("--mix-prob", type=float, default=1.0, help="probability that a batch is mixed")
    p.add_argument("--token-dropout", type=float, default=0.0,
                   help="probability that a batch trains on a random subset of patch tokens (server models)")
    p.add_argument("--token-keep-min", type=float, default=0.25, help="smallest kept fraction under token dropout")
    p.add_argument("--token-selector", default=None, metavar="MODEL",
                   help="edge model (zoo:NAME, file:PATH) whose last-block CLS attention picks the kept tokens under "
                   "token dropout: the server trains on the patches that edge would send (default: random subsets)")
    p.add_argument("--token-attention-share", type=float, default=1.0,
                   help="with --token-selector: share of subset batches picked by attention (the rest random)")
    p.add_argument("--token-spread", type=int, default=0, metavar="C",
                   help="with --token-selector: the attention picks in the spread order over C×C cells (the "
                   "best of each cell first), as a device with selection.spread = C sends them")
    p.add_argument("--glance-mix", type=float, default=0.0,
                   help="region retransmission: probability that a batch trains on glances (the image "
                   "box-downsampled by --glance-downscale and upsampled back, as a worker sees it), half of them "
                   "with a random full-resolution window of --glance-window of the side in place")
    p.add_argument("--glance-downscale", type=int, default=2, help="with --glance-mix: the downsampling factor")
    p.add_argument("--glance-window", type=float, default=0.5, help="with --glance-mix: window side fraction")
    p.add_argument("--glance-codec", default=None, metavar="CODEC",
                   help="with --glance-mix: send glances and windows through this codec (patchcast codecs) before "
                   "the model sees them, as a worker decodes them (default: the exact pixels)")
    p.add_argument("--glance-quality", type=int, default=90, help="with --glance-codec: the codec's quality")
    p.add_argument("--init", default=None, metavar="MODEL",
                   help="start from these weights (zoo:NAME, file:PATH) instead of random init: fine-tuning; "
                        "at another --img-size, the position embedding is resampled (bicubic) to the new grid")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--teacher", default=None, help="teacher model reference for soft distillation (edge models)")
    p.add_argument("--distill-weight", type=float, default=0.5,
                   help="with --teacher: loss = (1 - w) * label loss + w * KL(teacher || student)")
    p.add_argument("--distill-temperature", type=float, default=2.0, help="with --teacher: softmax temperature")
    p.add_argument("--classes", default="", metavar="C,C,…",
                   help="train a specialist (expert) on these class ids only, e.g. 0,1,8,9; the checkpoint maps its "
                   "outputs back to them, and routing.experts sends it the images those classes dominate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--precision", choices=PRECISION_SETTINGS, default="auto",
                   help="arithmetic: auto = bf16 autocast on a GPU, and on a CPU where a short probe measures "
                   "bf16 ≥ 1.25× faster than fp32 (AMX); fp32 otherwise")
    p.add_argument("--fp32", action="store_true", help="same as --precision fp32")
    p.add_argument("--export-zoo", action="store_true",
                   help="copy the final checkpoint and card into the package's model zoo (shared/zoo)")
    p.set_defaults(handler=run)


def _parse_classes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError as exc:
        raise ConfigError(f"--classes {text!r}: expected comma-separated class ids, e.g. 0,1,8,9") from exc


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from patchcast.train import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, TrainConfig, train
    from shared.models import ZOO_DIR, VitArch
    from shared.precision import resolve

    classes = _parse_classes(args.classes)
    num_classes = len(classes) if classes else _count_classes(args.data)
    cfg = TrainConfig(
        data=args.data, test_data=args.test_data or None, out=args.out,
        arch=VitArch(args.img_size, args.patch_size, args.dim, args.depth, args.heads, args.mlp_ratio, num_classes,
                     reg_tokens=args.reg_tokens),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        token_dropout=args.token_dropout, token_keep_min=args.token_keep_min,
        token_selector=args.token_selector, token_attention_share=args.token_attention_share,
        token_spread=args.token_spread,
        init=args.init, device=args.device, teacher=args.teacher,
        distill_weight=args.distill_weight, distill_temperature=args.distill_temperature,
        seed=args.seed, threads=args.threads, name=args.name, classes=classes, glance_mix=args.glance_mix,
        glance_downscale=args.glance_downscale, glance_window=args.glance_window, glance_codec=args.glance_codec,
        glance_quality=args.glance_quality, cnn=None if args.arch == "vit" else args.arch, aug=args.aug,
        rrc_scale_min=args.rrc_scale_min, mixup=args.mixup, cutmix=args.cutmix, mix_prob=args.mix_prob,
        mean=IMAGENET_MEAN if args.norm == "imagenet" else CIFAR_MEAN,
        std=IMAGENET_STD if args.norm == "imagenet" else CIFAR_STD)
    # auto: bf16 on a GPU; on a CPU only where it measures clearly faster (on some CPUs with
    # AVX512-BF16 and no AMX a training step ran 1.3× slower in bf16)
    cfg = replace(cfg, bf16=resolve("fp32" if args.fp32 else args.precision, cfg.torch_device().type) == "bf16")
    console = Console()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console) as progress:
        epochs = progress.add_task("epochs", total=cfg.epochs, info="")
        steps = progress.add_task("steps", total=1, info="")

        def on_progress(kind: str, done: int, total: int, info: dict[str, float]) -> None:
            if kind == "step":
                progress.update(steps, completed=done, total=total,
                                info=f"epoch {int(info['epoch'])} loss {info['loss']:.3f} {info['img_s']:.0f} img/s")
            else:
                acc = info.get("val_acc_2k")
                progress.update(epochs, completed=done, info=f"val {acc * 100:.1f} %" if acc is not None else "")
                progress.console.log(json.dumps({k: round(v, 4) for k, v in info.items()}))

        card = train(cfg, on_progress)
    console.print(f"test accuracy: {card.get('test_accuracy')}  wall {card['wall_time_s'] / 60:.1f} min")
    if args.export_zoo:
        out = Path(args.out)
        shutil.copyfile(out / "model.safetensors", ZOO_DIR / f"{args.name}.safetensors")
        for suffix in (".json", ".md"):
            shutil.copyfile(out / f"{args.name}{suffix}", ZOO_DIR / f"{args.name}{suffix}")
        console.print(f"exported to {ZOO_DIR}/{args.name}.safetensors")
    return 0


def _count_classes(data: str) -> int:
    from shared import datasets

    p = datasets.resolve(data)
    if p.is_file() and p.name.endswith(".tar"):
        import tarfile

        with tarfile.open(p) as tar:
            classes = {Path(m.name).parent.name for m in tar if m.isfile()}
        return len(classes)
    if p.is_dir():
        return len([d for d in p.iterdir() if d.is_dir()])
    raise ConfigError(f"{p}: training data must be an ImageFolder tree or a tar of one")
