"""What a receiver accepts: the deployment's protocol limits and the checks that apply them.

v1's intrinsic bounds (:mod:`shared.wire_fields`) hold for every message; these are tighter and
belong to a deployment (raise them together with the broker's ``max_packet_size``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from shared.errors import BadFieldError, BadPropertyError, TooLargeError
from shared.messages import PatchRequest


@dataclass(frozen=True)
class ProtocolLimits:
    """What a receiver accepts. Defaults fit 224–448 px images with 14–16 px patches on a broker whose
    ``max_packet_size`` is 1 MiB; raise them together with the broker's."""

    max_message_bytes: int = 1_048_576
    max_payload_bytes: int = 1_048_576
    max_pixels: int = 1024 * 1024
    max_patches: int = 4096
    max_patch_size: int = 64
    max_topk: int = 100
    max_str_len: int = 1024
    max_array_len: int = 1024
    max_map_len: int = 64
    # MQTT properties of a request (the worker echoes the correlation data; it ignores user properties)
    max_correlation_bytes: int = 128
    max_user_properties: int = 16
    max_user_property_chars: int = 1024  # all keys and values together

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is not int or value <= 0:
                raise BadFieldError(f"ProtocolLimits.{f.name} must be a positive int, got {value!r}")


DEFAULT_LIMITS = ProtocolLimits()


def check_request_limits(request: PatchRequest, limits: ProtocolLimits) -> None:
    """The deployment's limits (the dataclass already enforced v1's intrinsic ones)."""
    if request.patch_size > limits.max_patch_size:
        raise TooLargeError(f"patch size {request.patch_size} exceeds {limits.max_patch_size}")
    if request.height * request.width > limits.max_pixels:
        raise TooLargeError(f"image {request.height}×{request.width} exceeds {limits.max_pixels} pixels")
    if request.num_patches > limits.max_patches:
        raise TooLargeError(f"{request.num_patches} patches exceed {limits.max_patches}")
    if len(request.payload) > limits.max_payload_bytes:
        raise TooLargeError(f"payload of {len(request.payload)} bytes exceeds {limits.max_payload_bytes}")
    if len(request.topk_ids) > limits.max_topk:
        raise TooLargeError(f"top-k of {len(request.topk_ids)} exceeds {limits.max_topk}")


def precheck_request(obj: dict[str, Any], limits: ProtocolLimits) -> None:
    """Refuse an oversized geometry from the raw fields, before the mask is unpacked."""
    h, w, p = obj.get("h"), obj.get("w"), obj.get("p")
    if type(h) is int and type(w) is int and h * w > limits.max_pixels:
        raise TooLargeError(f"image {h}×{w} exceeds {limits.max_pixels} pixels")
    if type(p) is int and p > limits.max_patch_size:
        raise TooLargeError(f"patch size {p} exceeds {limits.max_patch_size}")


def check_properties(correlation_data: bytes | None, user_properties: Sequence[tuple[str, str]],
                     limits: ProtocolLimits = DEFAULT_LIMITS) -> None:
    """The MQTT properties of a request other than its response topic: correlation data at most
    ``max_correlation_bytes`` (the worker echoes it), at most ``max_user_properties`` user properties
    of at most ``max_user_property_chars`` characters together. :class:`BadPropertyError` otherwise."""
    if correlation_data is not None and len(correlation_data) > limits.max_correlation_bytes:
        raise BadPropertyError(f"correlation data of {len(correlation_data)} bytes exceeds "
                               f"{limits.max_correlation_bytes}")
    if len(user_properties) > limits.max_user_properties:
        raise BadPropertyError(f"{len(user_properties)} user properties exceed {limits.max_user_properties}")
    chars = sum(len(key) + len(value) for key, value in user_properties)
    if chars > limits.max_user_property_chars:
        raise BadPropertyError(f"user properties of {chars} characters exceed {limits.max_user_property_chars}")
