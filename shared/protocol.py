"""Wire protocol v1: typed messages, msgpack encoding and a defensive decoder for untrusted bytes.

Every message is a msgpack map with short, stable keys plus ``"v"`` (schema version) and ``"t"``
(message kind). Messages are frozen dataclasses whose ``__post_init__`` is the single validator: a
message that exists is valid, whether built locally or decoded from the wire. ``docs/protocol.md``
is the contract; this module and it must agree.

Decoding untrusted bytes checks the total size before unpacking, unpacks with msgpack's own size
limits and no extension types, then validates every field (types first: ``True`` is not an int)
before any pixel is decoded. Every failure is a :class:`~shared.errors.ProtocolError` subclass with
a machine-readable ``code``; nothing else escapes. No pickle, no ``torch.load``.

Receivers ignore keys they do not know, so v1 can gain optional fields; any change of meaning or
any new required field bumps :data:`SCHEMA_VERSION` (and the topic prefix).

This module is the codec and the one import for callers: the messages live in :mod:`shared.messages`,
their field validators and v1's intrinsic bounds in :mod:`shared.wire_fields`, a deployment's limits
and their checks in :mod:`shared.protocol_limits`; all are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any, TypeVar, cast

import msgpack
import numpy as np

from shared.bitmask import pack_mask
from shared.codecs import get_codec
from shared.errors import (
    BadFieldError,
    BadTopicError,
    BadVersionError,
    ForeignIdError,
    MalformedError,
    ProtocolError,
    TooLargeError,
)
from shared.messages import (
    MESSAGE_TYPES,
    OUTCOME_STATUSES,
    Availability,
    EdgeMetrics,
    ErrorReply,
    Message,
    Outcome,
    OutcomeStatus,
    PatchRequest,
    RegionRequest,
    Reply,
    WorkerMetrics,
    construct,
)
from shared.protocol_limits import (
    DEFAULT_LIMITS,
    ProtocolLimits,
    check_properties,
    check_request_limits,
    precheck_request,
)
from shared.wire_fields import MAX_CLASS_ID, MAX_DOWNSCALE, MAX_PATCH_SIZE, MAX_SIDE, MAX_TOPK

__all__ = [
    "DEFAULT_LIMITS", "MAX_CLASS_ID", "MAX_DOWNSCALE", "MAX_PATCH_SIZE", "MAX_SIDE", "MAX_TOPK", "MESSAGE_TYPES",
    "OUTCOME_STATUSES", "SCHEMA_VERSION", "Availability", "EdgeMetrics", "ErrorReply", "Message", "Outcome",
    "OutcomeStatus", "PatchRequest", "ProtocolLimits", "RegionRequest", "Reply", "WorkerMetrics",
    "build_request", "check_properties", "check_request_limits", "check_request_owner", "check_response_topic",
    "decode", "decode_availability", "decode_device_message", "decode_edge_metrics", "decode_outcome",
    "decode_patches", "decode_reply", "decode_request", "decode_worker_metrics", "encode"]

SCHEMA_VERSION = 1
_BY_KIND: dict[str, type[Message]] = {cls.KIND: cls for cls in MESSAGE_TYPES}


# Field value types that are no Mapping: encode skips the (slow) ABC check for them.
_PLAIN = frozenset({str, int, float, bool, bytes, tuple, list, type(None)})


_REQUIRED: dict[type[Message], frozenset[str]] = {}


def _required(cls: type[Message]) -> frozenset[str]:
    """Fields without a default: always on the wire (as nil where the type allows None); once per class."""
    required = _REQUIRED.get(cls)
    if required is None:
        required = _REQUIRED[cls] = frozenset(f.name for f in fields(cls)  # type: ignore[arg-type]
                                              if f.default is MISSING and f.default_factory is MISSING)
    return required


def encode(message: Message, *, limits: ProtocolLimits | None = DEFAULT_LIMITS) -> bytes:
    """msgpack bytes of a message; optional fields that are ``None`` are left out. Refuses messages over
    the size limit (the broker would drop the connection, and MQTT clients do not check)."""
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "t": message.KIND}
    required = _required(type(message))
    for name, key in message.WIRE.items():
        value = getattr(message, name)
        if value is not None or name in required:
            body[key] = dict(value) if type(value) not in _PLAIN and isinstance(value, Mapping) else value
    data: bytes = msgpack.packb(body, use_bin_type=True)
    if limits is not None and len(data) > limits.max_message_bytes:
        raise TooLargeError(f"{message.KIND} message is {len(data)} bytes, limit {limits.max_message_bytes}")
    return data


def _no_ext(code: int, data: bytes) -> object:
    raise MalformedError(f"msgpack extension type {code} is not allowed")


def _unpack(data: bytes, limits: ProtocolLimits) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedError(f"message must be bytes, got {type(data).__name__}")
    if len(data) > limits.max_message_bytes:  # before unpacking anything
        raise TooLargeError(f"message is {len(data)} bytes, limit {limits.max_message_bytes}")
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext, max_ext_len=0,
            max_bin_len=limits.max_payload_bytes, max_str_len=limits.max_str_len,
            max_array_len=limits.max_array_len, max_map_len=limits.max_map_len)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # Format/Stack errors, ExtraData, utf-8
        if "exceeds max_" in str(exc) and "max_ext_len" not in str(exc):  # ext types are refused outright
            raise TooLargeError(f"message field too large: {exc}") from exc
        raise MalformedError(f"not a msgpack message: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise MalformedError("message must be a msgpack map with string keys")
    version = obj.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise BadVersionError(f"schema version {version!r} is not supported (this side: {SCHEMA_VERSION})")
    return obj


M = TypeVar("M", bound=Message)


def _build(cls: type[M], obj: dict[str, Any]) -> M:
    wire = cls.WIRE
    kwargs = {name: obj[key] for name, key in wire.items() if key in obj}
    if len(kwargs) < len(wire):
        required = _required(cls)
        for name, key in wire.items():
            if name in required and key not in obj:
                raise MalformedError(f"{cls.KIND} message lacks field {key!r} ({name})")
    try:
        return construct(cls, kwargs)
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:  # a validator met a type it did not expect
        raise BadFieldError(f"{cls.KIND} message has an invalid field: {exc}") from exc


def decode(data: bytes, *, limits: ProtocolLimits = DEFAULT_LIMITS) -> Message:
    """Any v1 message, dispatched on ``"t"``."""
    obj = _unpack(data, limits)
    kind = obj.get("t")
    cls = _BY_KIND.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MalformedError(f"unknown message kind {kind!r}")
    if cls is PatchRequest:
        precheck_request(obj, limits)
    message = _build(cls, obj)
    if isinstance(message, PatchRequest):
        check_request_limits(message, limits)
    elif isinstance(message, Reply | RegionRequest) and len(message.topk_ids) > limits.max_topk:
        raise TooLargeError(f"top-k of {len(message.topk_ids)} exceeds {limits.max_topk}")
    return message



def _decode_as(data: bytes, limits: ProtocolLimits, *classes: type[Message]) -> Message:
    message = decode(data, limits=limits)
    if not isinstance(message, classes):
        raise MalformedError(f"expected {' or '.join(c.KIND for c in classes)}, got {message.KIND}")
    return message



def decode_request(data: bytes, *, limits: ProtocolLimits = DEFAULT_LIMITS) -> PatchRequest:
    """A validated request (structure, geometry, mask, codec and params; pixels not decoded yet)."""
    message = _decode_as(data, limits, PatchRequest)
    assert isinstance(message, PatchRequest)
    return message


def _shown(value: str, limit: int = 80) -> str:
    """An untrusted string for an error message: quoted and escaped (no control characters reach a
    log line) and cut to ``limit`` characters."""
    return repr(value[:limit]) + ("…" if len(value) > limit else "")


def check_response_topic(response_topic: str | None, own: str) -> None:
    """A request's MQTT response topic must be exactly ``own``, the reply topic of the device that the
    request topic names (the broker authenticated the publisher of that topic): never empty, never a
    wildcard, never another device's. The worker replies to ``own`` in any case; this makes a device
    that names anything else learn it (:class:`BadTopicError`) instead of silently not being heard."""
    if response_topic is None:
        raise BadTopicError("request has no response topic")
    if not response_topic:
        raise BadTopicError("request has an empty response topic")
    if "+" in response_topic or "#" in response_topic:
        raise BadTopicError(f"response topic {_shown(response_topic)} contains a wildcard")
    if response_topic != own:
        raise BadTopicError(f"response topic {_shown(response_topic)} is not the sending device's own reply "
                            f"topic {own!r}")


def check_request_owner(request: PatchRequest, device_id: str) -> None:
    """The request belongs to ``device_id``, the device its topic names: its ``device_id`` field is that
    device (:class:`BadTopicError`), and its request id is one of the device's own, ``<device id>.<suffix>``
    (:class:`ForeignIdError`), so that no device can name, and have answered, another device's request."""
    if request.device_id != device_id:
        raise BadTopicError(f"request from {request.device_id!r} published on {device_id!r}'s topic")
    if not (request.request_id.startswith(device_id + ".") and len(request.request_id) > len(device_id) + 1):
        raise ForeignIdError(f"request id {request.request_id!r} is not one of device {device_id!r}'s: "
                             f"ids are '{device_id}.<suffix>'")


def decode_reply(data: bytes, *, limits: ProtocolLimits = DEFAULT_LIMITS) -> Reply | ErrorReply:
    message = _decode_as(data, limits, Reply, ErrorReply)
    assert isinstance(message, Reply | ErrorReply)
    return message


def decode_device_message(data: bytes, *, limits: ProtocolLimits = DEFAULT_LIMITS
                          ) -> Reply | ErrorReply | RegionRequest:
    """What a device's reply topic carries: an answer, or a worker's request for a region."""
    message = _decode_as(data, limits, Reply, ErrorReply, RegionRequest)
    assert isinstance(message, Reply | ErrorReply | RegionRequest)
    return message


def decode_worker_metrics(data: bytes, *, limits: ProtocolLimits = DEFAULT_LIMITS) -> WorkerMetrics:
    message = _decode_as(data, limits, WorkerMetrics)
    assert isinstance(message, WorkerMetrics)
    return message


def decode_outcome(data: bytes, *, limits: ProtocolLimits = DEFAULT_LIMITS) -> Outcome:
    message = _decode_as(data, limits, Outcome)
    assert isinstance(message, Outcome)
    return message


def decode_edge_metrics(data: bytes, *, limits: ProtocolLimits = DEFAULT_LIMITS) -> EdgeMetrics:
    message = _decode_as(data, limits, EdgeMetrics)
    assert isinstance(message, EdgeMetrics)
    return message


def decode_availability(data: bytes, *, limits: ProtocolLimits = DEFAULT_LIMITS) -> Availability:
    message = _decode_as(data, limits, Availability)
    assert isinstance(message, Availability)
    return message


def decode_patches(request: PatchRequest) -> np.ndarray:
    """The request's kept patches, ``(K, p, p, 3)`` uint8 in index order, K = popcount of the mask.

    The codec knows the exact output size from the (already validated) geometry and mask, so it refuses
    oversized or malformed payloads from their headers. Raises only ProtocolError subclasses.
    """
    codec = get_codec(request.codec)
    # A validated request's codec_params is the dict resolve_params made: read, never copied.
    return codec.decode_checked(request.payload, (request.height, request.width), request.indices,
                                request.patch_size, cast(dict[str, int], request.codec_params))


def build_request(*, device_id: str, request_id: str, pixels: np.ndarray, indices: np.ndarray | list[int],
                  patch_size: int, codec: str, codec_params: Mapping[str, int] | None = None,
                  scores: np.ndarray | None = None, topk_ids: tuple[int, ...] | list[int] = (),
                  topk_probs: tuple[float, ...] | list[float] = (), uncertainty: float = 0.0,
                  uncertainty_kind: str = "min_entropy", sent_at: float, label: int | None = None,
                  deadline: float | None = None, downscale: int | None = None,
                  exchange: str | None = None, offer: np.ndarray | list[int] | None = None) -> PatchRequest:
    """Encode the kept patches of ``pixels`` ((H, W, 3) uint8) and wrap them in a request (``offer``: the
    indices of a top-up offer, the kept ones among them)."""
    h, w = int(pixels.shape[0]), int(pixels.shape[1])
    rows, cols = h // patch_size, w // patch_size
    chosen = get_codec(codec)
    params = chosen.resolve_params(codec_params)
    idx = np.asarray(indices, dtype=np.int64)
    payload = chosen.encode(pixels, idx, patch_size, params, scores=scores)
    return PatchRequest(
        device_id=device_id, request_id=request_id, height=h, width=w, patch_size=patch_size,
        grid=(rows, cols), mask=pack_mask(idx, rows * cols), codec=codec, codec_params=params,
        payload=payload,
        topk_ids=tuple(int(i) for i in topk_ids), topk_probs=tuple(float(p) for p in topk_probs),
        uncertainty=float(uncertainty), uncertainty_kind=uncertainty_kind, sent_at=sent_at, label=label,
        deadline=deadline, downscale=downscale, exchange=exchange,
        offer=None if offer is None else pack_mask(np.asarray(offer, dtype=np.int64), rows * cols))
