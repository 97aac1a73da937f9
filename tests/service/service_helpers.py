"""Small random-init models, synthetic images and configs for the service tests (no zoo needed)."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import torch
from PIL import Image

from inference_worker.engine import PatchSet
from shared.config import Config, load_config
from shared.models import LoadedModel, Preprocess, VitArch, save_checkpoint
from shared.protocol import ErrorReply, PatchRequest, RegionRequest, Reply, build_request, decode_device_message, encode
from shared.topics import V1
from shared.transport import Incoming, Transport

IMG = 32
PATCH = 4
EDGE_ARCH = VitArch(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2, num_classes=10)
SERVER_ARCH = VitArch(img_size=IMG, patch_size=PATCH, embed_dim=48, depth=2, num_heads=3, num_classes=10)
PREPROCESS = Preprocess(input_size=IMG, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), crop_pct=1.0)



def patch_sets(count: int, seed: int = 0) -> list[PatchSet]:
    """``count`` random patch sets for the SERVER_ARCH models, from one patch to all of them."""
    rng = np.random.default_rng(seed)
    n, p = (SERVER_ARCH.img_size // SERVER_ARCH.patch_size) ** 2, SERVER_ARCH.patch_size
    sets = []
    for _ in range(count):
        k = int(rng.integers(1, n + 1))  # from a single patch to all of them
        idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
        sets.append(PatchSet(rng.integers(0, 256, size=(k, p, p, 3), dtype=np.uint8), idx))
    return sets


def valid_request(device: str, request_id: str, **overrides: object) -> bytes:
    """A valid request of ``device`` (its id ``<device>.<request_id>``: a device names only its own ids),
    with wire fields replaced by ``overrides``."""
    rng = np.random.default_rng(0)
    n = (IMG // PATCH) ** 2
    req = build_request(device_id=device, request_id=f"{device}.{request_id}",
                        pixels=rng.integers(0, 256, (IMG, IMG, 3), dtype=np.uint8),
                        indices=np.arange(0, n, 3), patch_size=PATCH, codec="jpeg-mosaic",
                        topk_ids=[3, 1], topk_probs=[0.5, 0.2], uncertainty=1.0, sent_at=1.0)
    body = msgpack.unpackb(encode(req))
    body.update(overrides)
    return msgpack.packb(body, use_bin_type=True)

def random_model(arch: VitArch, seed: int, name: str) -> LoadedModel:
    torch.manual_seed(seed)
    model = arch.build().eval()
    # timm's init gives near-uniform logits; a larger head spreads them so labels are not near-ties.
    with torch.no_grad():
        head = model.head
        assert isinstance(head, torch.nn.Linear)
        head.weight.mul_(40.0)
    return LoadedModel(model=model, name=name, preprocess=PREPROCESS, class_names=[f"c{i}" for i in range(10)])


def write_models(folder: Path) -> tuple[Path, Path]:
    """Edge and server checkpoints (safetensors) in ``folder``."""
    edge_path, server_path = folder / "edge.safetensors", folder / "server.safetensors"
    save_checkpoint(edge_path, random_model(EDGE_ARCH, 1, "edge"), arch=EDGE_ARCH)
    save_checkpoint(server_path, random_model(SERVER_ARCH, 2, "server"), arch=SERVER_ARCH)
    return edge_path, server_path


def write_images(folder: Path, per_class: int = 25, classes: int = 10, seed: int = 0) -> Path:
    """An ImageFolder tree of small PNGs: class-coloured noise, so labels exist and images differ."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = folder / f"class{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        for i in range(per_class):
            px = np.clip(base + rng.normal(0, 60, size=(IMG, IMG, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(px).save(buf, "PNG")
            (d / f"{i:03d}.png").write_bytes(buf.getvalue())
    return folder


def service_config(port: int, edge_path: Path, server_path: Path, source: Path, **sections: dict) -> Config:
    """A config for tests: this broker, these models, fp32, one thread each, quick timeouts."""
    base: dict[str, dict] = {
        "broker": {"port": port, "connect_timeout_s": 5.0, "publish_timeout_s": 5.0, "reconnect_min_s": 0.1,
                   "reconnect_max_s": 1.0},
        "models": {"edge": f"file:{edge_path}", "server": f"file:{server_path}", "model_id": "tiny"},
        "selection": {"rule": "topk", "value": 24},
        "gate": {"kind": "min_entropy", "threshold": 0.0},
        "codec": {"name": "jpeg-mosaic", "quality": 90},
        "edge": {"source": str(source), "devices": 2, "rate_hz": 0.0, "max_in_flight": 4, "reply_timeout_s": 5.0,
                 "threads": 1, "batch_size": 8, "metrics_interval_s": 1.0},
        "batching": {"max_batch": 16, "max_tokens": 1024, "max_delay_ms": 5.0, "policy": "packed"},
        "worker": {"threads": 1, "precision": "fp32", "metrics_interval_s": 0.5, "shutdown_grace_s": 5.0,
                   "queue_capacity": 256},
        "logging": {"format": "json", "level": "warning"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return load_config(overrides=base, environ={})


def exchange_config(port: int, model_files: tuple[Path, Path], source: Path, unique: str, *, offload: str,
                    devices: int, per_device: int, **sections: dict) -> Config:
    """A config for an exchange test (``edge.offload`` region or top_up): one pool, ``devices`` devices of
    ``per_device`` images each, the lossless raw codec (so a reference sees the same pixels), full-image
    bytes measured; ``sections`` add to (or override) the sections they name."""
    edge_path, server_path = model_files
    base: dict[str, dict] = {
        "models": {"model_id": f"tiny-{unique}"}, "worker": {"group": f"pool-{unique}"}, "codec": {"name": "raw"},
        "edge": {"devices": devices, "limit": per_device, "device_prefix": f"{unique}cam", "offload": offload,
                 "measure_full_bytes": True}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return service_config(port, edge_path, server_path, source, **base)


class HandDevice:
    """A device driven by hand in an exchange test: its own client on the broker, subscribed to its reply
    topic once :meth:`start` ran; :meth:`send` publishes one message (or raw bytes) as the device and
    returns the next answer it receives, decoded."""

    def __init__(self, cfg: Config, unique: str, device: str) -> None:
        self.device = device
        self.reply_topic = V1.reply(device)
        self.inbox: asyncio.Queue[Incoming] = asyncio.Queue()
        self.client = Transport(cfg.broker, client_id=f"{unique}-dev", handler=self.inbox.put_nowait)

    async def start(self, tg: asyncio.TaskGroup) -> asyncio.Task[None]:
        task = tg.create_task(self.client.run(), name="device")
        await self.client.subscribe(self.reply_topic)
        await self.client.wait_connected()
        return task

    async def send(self, message: PatchRequest | bytes, topic: str, correlation: bytes = b"c"
                   ) -> RegionRequest | Reply | ErrorReply:
        payload = message if isinstance(message, bytes) else encode(message)
        await self.client.publish(topic, payload, response_topic=self.reply_topic, correlation_data=correlation)
        answer = await asyncio.wait_for(self.inbox.get(), 10)
        return decode_device_message(answer.payload)


def with_section(cfg: Config, section: str, **values: object) -> Config:
    return replace(cfg, **{section: replace(getattr(cfg, section), **values)})


def async_test(timeout_s: float = 60.0):
    """Run an ``async def`` test in a fresh event loop (no pytest plugin needed), under a timeout."""
    import asyncio
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def runner(*args, **kwargs):
            async def bounded():
                async with asyncio.timeout(timeout_s):
                    return await fn(*args, **kwargs)
            return asyncio.run(bounded())
        return runner
    return wrap


def dynsec_plugin_missing() -> bool:
    """True where Mosquitto's dynamic-security plugin (the production profile's) is not installed."""
    from patchcast.broker import find_dynsec_plugin
    from shared.errors import BrokerProcessError

    try:
        find_dynsec_plugin()
    except BrokerProcessError:
        return True
    return False
