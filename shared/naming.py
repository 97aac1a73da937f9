"""Default ids of services and models as they appear in topics (pure string functions).

Devices and workers must agree on the model id in request topics without talking to each other:
both derive it from the server model reference unless ``models.model_id`` names it.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import PurePath

from shared.topics import MAX_ID_LEN, validate_id

_BAD = re.compile(r"[^A-Za-z0-9_.:-]+")


def sanitize_id(text: str, fallback: str = "x") -> str:
    """Map arbitrary text to a valid topic-level id (invalid runs become ``-``, at most 64 chars)."""
    cleaned = _BAD.sub("-", text).strip("-.") or fallback
    return cleaned[:MAX_ID_LEN]


def model_id(server_ref: str, explicit: str = "") -> str:
    """``models.model_id`` if set, else the server reference's name: ``zoo:cifar10-server`` →
    ``cifar10-server``, ``file:/m/deit.safetensors`` → ``deit``, ``timm:deit_base_patch16_224`` →
    ``deit_base_patch16_224``."""
    if explicit:
        return validate_id(explicit, "models.model_id")
    kind, _, rest = server_ref.partition(":")
    name = rest if rest else server_ref
    if kind == "file" or name.endswith(".safetensors") or "/" in name:
        name = PurePath(name).stem
    return sanitize_id(name, "model")


def default_worker_id() -> str:
    """Host name + pid: unique per process on a host, readable in dashboards."""
    return sanitize_id(f"{socket.gethostname().split('.')[0]}-{os.getpid()}", f"worker-{os.getpid()}")


def device_id(prefix: str, index: int) -> str:
    """``cam-0000``, ``cam-0001``, …"""
    return validate_id(f"{prefix}-{index:04d}", "device id")
