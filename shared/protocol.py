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
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Literal, TypeVar

import msgpack
import numpy as np

from shared.bitmask import mask_nbytes, pack_mask, unpack_mask
from shared.codecs import get_codec
from shared.errors import (
    BadFieldError,
    BadGeometryError,
    BadMaskError,
    BadPropertyError,
    BadTopicError,
    BadVersionError,
    ForeignIdError,
    MalformedError,
    ProtocolError,
    TooLargeError,
)
from shared.topics import validate_id, validate_role

SCHEMA_VERSION = 1

# Intrinsic bounds of v1 (deployment limits, tighter, live in ProtocolLimits).
MAX_SIDE = 65_535  # JPEG's limit; image codecs cannot represent more
MAX_PATCH_SIZE = 256
MAX_TOPK = 1000
MAX_CLASS_ID = 2**31 - 1
MAX_MESSAGE_CHARS = 1024
MAX_DOWNSCALE = 16
_KIND_RE = re.compile(r"[a-z0-9_]{1,32}")


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


# ---------------------------------------------------------------------------------------------
# Field validation helpers: each checks the type first, then the range, and normalises in place.


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclasses normalise fields only in __post_init__


def _int(obj: object, name: str, lo: int, hi: int) -> int:
    value = getattr(obj, name)
    if type(value) is not int:  # exact type: bool and numpy ints are refused, not coerced
        raise BadFieldError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise BadFieldError(f"{name}={value} outside {lo}..{hi}")
    return value


def _opt_int(obj: object, name: str, lo: int, hi: int) -> int | None:
    return None if getattr(obj, name) is None else _int(obj, name, lo, hi)


def _float(obj: object, name: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    value = getattr(obj, name)
    if type(value) not in (float, int):  # ints are fine on the wire (0, 1); bools are not
        raise BadFieldError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or not lo <= number <= hi:
        raise BadFieldError(f"{name}={value} is not finite or outside {lo}..{hi}")
    _set(obj, name, number)
    return number


def _opt_float(obj: object, name: str, lo: float = -math.inf, hi: float = math.inf) -> float | None:
    return None if getattr(obj, name) is None else _float(obj, name, lo, hi)


def _str(obj: object, name: str, max_len: int = MAX_MESSAGE_CHARS) -> str:
    value = getattr(obj, name)
    if not isinstance(value, str):
        raise BadFieldError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise BadFieldError(f"{name} has {len(value)} characters, at most {max_len}")
    return value


def _ident(obj: object, name: str) -> str:
    try:
        return validate_id(getattr(obj, name), name)
    except BadTopicError as exc:
        raise BadFieldError(exc.message) from exc


def _kind(obj: object, name: str) -> str:
    value = _str(obj, name, 32)
    if not _KIND_RE.fullmatch(value):
        raise BadFieldError(f"{name}={value!r} must match [a-z0-9_]{{1,32}}")
    return value


def _bytes(obj: object, name: str) -> bytes:
    value = getattr(obj, name)
    if not isinstance(value, bytes | bytearray):
        raise BadFieldError(f"{name} must be bytes, got {type(value).__name__}")
    _set(obj, name, bytes(value))
    return bytes(value)


def _seq(obj: object, name: str, item: type, max_len: int) -> tuple[Any, ...]:
    value = getattr(obj, name)
    if not isinstance(value, list | tuple):
        raise BadFieldError(f"{name} must be an array, got {type(value).__name__}")
    if len(value) > max_len:
        raise BadFieldError(f"{name} has {len(value)} items, at most {max_len}")
    out = []
    for v in value:
        if item is float and type(v) in (float, int) and math.isfinite(v):
            out.append(float(v))
        elif item is int and type(v) is int:
            out.append(v)
        else:
            raise BadFieldError(f"{name} items must be finite {item.__name__}s, got {type(v).__name__}")
    result = tuple(out)
    _set(obj, name, result)
    return result


def _int_map(obj: object, name: str, max_len: int, lo: int, hi: int) -> dict[str, int]:
    value = getattr(obj, name)
    if not isinstance(value, Mapping):
        raise BadFieldError(f"{name} must be a map, got {type(value).__name__}")
    if len(value) > max_len:
        raise BadFieldError(f"{name} has {len(value)} entries, at most {max_len}")
    out: dict[str, int] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not _KIND_RE.fullmatch(k):
            raise BadFieldError(f"{name} keys must match [a-z0-9_]{{1,32}}, got {k!r}")
        if type(v) is not int or not lo <= v <= hi:
            raise BadFieldError(f"{name}[{k!r}] must be an int in {lo}..{hi}, got {v!r}")
        out[k] = v
    _set(obj, name, dict(sorted(out.items())))
    return out


def _topk(obj: object, ids_name: str, probs_name: str) -> None:
    ids = _seq(obj, ids_name, int, MAX_TOPK)
    probs = _seq(obj, probs_name, float, MAX_TOPK)
    if len(ids) != len(probs):
        raise BadFieldError(f"{ids_name} and {probs_name} differ in length ({len(ids)} vs {len(probs)})")
    if any(not 0 <= i <= MAX_CLASS_ID for i in ids) or len(set(ids)) != len(ids):
        raise BadFieldError(f"{ids_name} must be distinct class ids in 0..{MAX_CLASS_ID}")
    if any(not 0.0 <= p <= 1.0 for p in probs) or sum(probs) > 1.0 + 1e-3:
        raise BadFieldError(f"{probs_name} must be probabilities summing to at most 1")
    if any(a < b for a, b in itertools.pairwise(probs)):
        raise BadFieldError(f"{probs_name} must be sorted, highest first")


# ---------------------------------------------------------------------------------------------
# Messages


class Message:
    """Base of all v1 messages: ``KIND`` is the ``"t"`` value, ``WIRE`` maps field names to keys."""

    KIND: ClassVar[str]
    WIRE: ClassVar[dict[str, str]]


@dataclass(frozen=True)
class PatchRequest(Message):
    """A device's request: the kept patches of one image plus what the server needs to answer it."""

    KIND: ClassVar[str] = "req"
    WIRE: ClassVar[dict[str, str]] = {
        "device_id": "d", "request_id": "r", "height": "h", "width": "w", "patch_size": "p", "grid": "g",
        "mask": "m", "codec": "c", "codec_params": "cp", "payload": "x", "topk_ids": "k", "topk_probs": "kp",
        "uncertainty": "u", "uncertainty_kind": "uk", "sent_at": "ts", "label": "y", "deadline": "dl",
        "downscale": "sc", "exchange": "ex"}

    device_id: str
    request_id: str
    height: int
    width: int
    patch_size: int
    grid: tuple[int, int]
    mask: bytes  # bit i (MSB first) = patch i, row-major; see shared.bitmask.pack_mask
    codec: str
    codec_params: Mapping[str, int]
    payload: bytes
    topk_ids: tuple[int, ...]  # the edge model's top-k, highest first
    topk_probs: tuple[float, ...]
    uncertainty: float  # the gate's score (e.g. min-entropy) that made the device ask
    uncertainty_kind: str
    sent_at: float  # device wall clock, Unix seconds
    label: int | None = None  # ground truth, for evaluation runs only
    deadline: float | None = None  # device wall clock after which an answer is useless
    # Region retransmission (shared.region): a *global* request carries the whole image box-downsampled
    # by ``downscale`` (every patch kept) and offers a full-resolution region on request; a *region*
    # request carries the window a worker asked for, under that worker's ``exchange`` id.
    downscale: int | None = None
    exchange: str | None = None

    def __post_init__(self) -> None:
        _ident(self, "device_id")
        _ident(self, "request_id")
        p = _int(self, "patch_size", 1, MAX_PATCH_SIZE)
        h = _int(self, "height", 1, MAX_SIDE)
        w = _int(self, "width", 1, MAX_SIDE)
        if h % p or w % p:
            raise BadGeometryError(f"image {h}×{w} is not a multiple of patch size {p}")
        grid = _seq(self, "grid", int, 2)
        if grid != (h // p, w // p):
            raise BadGeometryError(f"grid {grid} does not match {h}×{w} / {p} = {(h // p, w // p)}")
        n = grid[0] * grid[1]
        mask = _bytes(self, "mask")
        if len(mask) != mask_nbytes(n):
            raise BadMaskError(f"mask has {len(mask)} bytes, expected ceil({n}/8) = {mask_nbytes(n)}")
        try:
            kept = unpack_mask(mask, n)
        except ValueError as exc:
            raise BadMaskError(str(exc)) from exc
        if kept.size == 0:
            raise BadMaskError("mask keeps no patch")
        codec = get_codec(_str(self, "codec", 64))
        params = self.codec_params
        if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
            raise BadFieldError("codec_params must be a map with string keys")
        _set(self, "codec_params", codec.resolve_params(params))
        if not _bytes(self, "payload"):
            raise BadFieldError("payload is empty")
        _topk(self, "topk_ids", "topk_probs")
        _float(self, "uncertainty")
        _kind(self, "uncertainty_kind")
        sent = _float(self, "sent_at", 0.0)
        _opt_int(self, "label", 0, MAX_CLASS_ID)
        _opt_float(self, "deadline", sent)
        if _opt_int(self, "downscale", 2, MAX_DOWNSCALE) is not None:
            if kept.size != n:
                raise BadMaskError("a downscaled (global) request keeps every patch")
            if self.exchange is not None:
                raise BadFieldError("a request is either global (downscale) or a region (exchange), not both")
        if self.exchange is not None:
            _ident(self, "exchange")

    @property
    def stage(self) -> Literal["patches", "global", "region"]:
        """``patches`` (the attention-aware request), or the global or region step of an exchange."""
        return "global" if self.downscale is not None else "region" if self.exchange is not None else "patches"

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def indices(self) -> np.ndarray:
        """Sorted kept patch indices (int64)."""
        return unpack_mask(self.mask, self.num_patches)

    @property
    def kept(self) -> int:
        return int(np.unpackbits(np.frombuffer(self.mask, dtype=np.uint8)).sum())

    @property
    def edge_label(self) -> int | None:
        return self.topk_ids[0] if self.topk_ids else None


@dataclass(frozen=True)
class Reply(Message):
    """A worker's answer to one request."""

    KIND: ClassVar[str] = "rep"
    WIRE: ClassVar[dict[str, str]] = {
        "request_id": "r", "label": "l", "topk_ids": "k", "topk_probs": "kp", "queue_ms": "qm",
        "infer_ms": "im", "total_ms": "tm", "worker_id": "wk", "batch_size": "b"}

    request_id: str
    label: int
    topk_ids: tuple[int, ...]
    topk_probs: tuple[float, ...]
    queue_ms: float  # received → batch start
    infer_ms: float  # the batch's forward pass
    total_ms: float  # received → reply published
    worker_id: str
    batch_size: int

    def __post_init__(self) -> None:
        _ident(self, "request_id")
        _int(self, "label", 0, MAX_CLASS_ID)
        _topk(self, "topk_ids", "topk_probs")
        for name in ("queue_ms", "infer_ms", "total_ms"):
            _float(self, name, 0.0)
        _ident(self, "worker_id")
        _int(self, "batch_size", 1, 1 << 20)


@dataclass(frozen=True)
class ErrorReply(Message):
    """A worker's refusal: ``code`` is an error code (``bad_mask``, ``busy``, ``expired``, …)."""

    KIND: ClassVar[str] = "err"
    WIRE: ClassVar[dict[str, str]] = {"request_id": "r", "code": "e", "message": "msg", "worker_id": "wk"}

    request_id: str | None  # None when the request was too broken to read its id
    code: str
    message: str
    worker_id: str

    def __post_init__(self) -> None:
        if self.request_id is not None:
            _ident(self, "request_id")
        _kind(self, "code")
        _str(self, "message", MAX_MESSAGE_CHARS)
        _ident(self, "worker_id")

    @classmethod
    def from_error(cls, exc: Exception, *, request_id: str | None, worker_id: str) -> ErrorReply:
        """The error reply for an exception; codes come from PatchCastError subclasses, else ``internal``."""
        code = getattr(exc, "code", "internal")
        return cls(request_id, code if isinstance(code, str) and _KIND_RE.fullmatch(code) else "internal",
                   str(exc)[:MAX_MESSAGE_CHARS], worker_id)


@dataclass(frozen=True)
class RegionRequest(Message):
    """A worker's request for a full-resolution region of a global request's image (to the device's
    reply topic, with the worker's region topic as the MQTT response topic)."""

    KIND: ClassVar[str] = "rgq"
    WIRE: ClassVar[dict[str, str]] = {
        "request_id": "r", "exchange": "x", "patch_size": "p", "grid": "g", "mask": "m", "topk_ids": "k",
        "topk_probs": "kp", "uncertainty": "u", "worker_id": "wk", "ttl_s": "tl"}

    request_id: str  # the global request's id; the region request repeats it
    exchange: str  # the worker's id for this exchange; the region request carries it
    patch_size: int  # of the full-resolution image
    grid: tuple[int, int]  # full-resolution grid (rows, cols)
    mask: bytes  # the window to send, over that grid (shared.bitmask)
    topk_ids: tuple[int, ...]  # the glance's answer: what the device may keep if the region fails
    topk_probs: tuple[float, ...]
    uncertainty: float  # the glance's min-entropy, which made the worker ask
    worker_id: str
    ttl_s: float  # the worker keeps the exchange this long

    def __post_init__(self) -> None:
        _ident(self, "request_id")
        _ident(self, "exchange")
        _int(self, "patch_size", 1, MAX_PATCH_SIZE)
        grid = _seq(self, "grid", int, 2)
        if len(grid) != 2 or not all(1 <= side <= MAX_SIDE for side in grid):
            raise BadGeometryError(f"grid {grid!r} must be two ints in 1..{MAX_SIDE}")
        rows, cols = grid
        mask = _bytes(self, "mask")
        if len(mask) != mask_nbytes(rows * cols):
            raise BadMaskError(f"mask has {len(mask)} bytes, expected {mask_nbytes(rows * cols)}")
        try:
            if unpack_mask(mask, rows * cols).size == 0:
                raise BadMaskError("mask keeps no patch")
        except ValueError as exc:
            raise BadMaskError(str(exc)) from exc
        _topk(self, "topk_ids", "topk_probs")
        if not self.topk_ids:
            raise BadFieldError("a region request carries the glance's top-k")
        _float(self, "uncertainty")
        _ident(self, "worker_id")
        _float(self, "ttl_s", 0.001, 3600.0)

    @property
    def indices(self) -> np.ndarray:
        return unpack_mask(self.mask, self.grid[0] * self.grid[1])


@dataclass(frozen=True)
class WorkerMetrics(Message):
    """A worker's periodic self-report over the last ``window_s`` seconds (retained, per worker)."""

    KIND: ClassVar[str] = "wm"
    WIRE: ClassVar[dict[str, str]] = {
        "worker_id": "wk", "model": "mo", "at": "at", "window_s": "win", "queue_depth": "qd",
        "queue_capacity": "qc", "oldest_queued_ms": "qo", "requests": "n", "requests_per_s": "rps",
        "batches": "nb", "batch_size_mean": "bsm", "batch_size_max": "bsx", "tokens_per_batch_mean": "tpb",
        "busy_fraction": "busy", "service_ms_p50": "s50", "service_ms_p95": "s95", "service_ms_p99": "s99",
        "errors_by_code": "err", "arrival_ms_p95": "al"}

    worker_id: str
    model: str
    at: float  # wall clock of the report, Unix seconds
    window_s: float
    queue_depth: int
    queue_capacity: int
    oldest_queued_ms: float
    requests: int
    requests_per_s: float
    batches: int
    batch_size_mean: float
    batch_size_max: int
    tokens_per_batch_mean: float
    busy_fraction: float  # share of the window the executor ran batches
    service_ms_p50: float  # received → reply published
    service_ms_p95: float
    service_ms_p99: float
    errors_by_code: Mapping[str, int] = field(default_factory=dict)
    # p95 of (worker receipt − device sent_at), wall clocks: time spent in the broker before the worker
    # saw the request. Optional on the wire (0 when absent), so older workers' metrics still decode.
    arrival_ms_p95: float = 0.0

    def __post_init__(self) -> None:
        _ident(self, "worker_id")
        _ident(self, "model")
        _float(self, "at", 0.0)
        _float(self, "window_s", 0.0)
        for name in ("queue_depth", "queue_capacity", "requests", "batches", "batch_size_max"):
            _int(self, name, 0, 2**53)
        for name in ("oldest_queued_ms", "requests_per_s", "batch_size_mean", "tokens_per_batch_mean",
                     "service_ms_p50", "service_ms_p95", "service_ms_p99", "arrival_ms_p95"):
            _float(self, name, 0.0)
        _float(self, "busy_fraction", 0.0, 1.0)
        _int_map(self, "errors_by_code", 64, 0, 2**53)


OutcomeStatus = Literal["edge", "server", "timeout", "error"]
OUTCOME_STATUSES: tuple[str, ...] = ("edge", "server", "timeout", "error")


@dataclass(frozen=True)
class Outcome(Message):
    """What happened to one image on a device: kept at the edge, answered by the server, or not."""

    KIND: ClassVar[str] = "out"
    WIRE: ClassVar[dict[str, str]] = {
        "device_id": "d", "request_id": "r", "at": "at", "status": "s", "patches": "np", "num_patches": "nn",
        "bytes": "nb", "latency_ms": "lat", "edge_label": "el", "final_label": "fl", "ground_truth": "y",
        "uncertainty": "u", "error_code": "e", "full_bytes": "fb"}

    device_id: str
    request_id: str
    at: float
    status: OutcomeStatus  # edge: not sent; server: reply used; timeout/error: fell back to the edge label
    patches: int  # patches sent (0 when not sent)
    num_patches: int
    bytes: int  # whole request message bytes (0 when not sent)
    latency_ms: float | None  # send → reply; None when not sent or no reply
    edge_label: int
    final_label: int
    ground_truth: int | None = None
    uncertainty: float | None = None
    error_code: str | None = None
    # the same requests with the full image as a JPEG payload: what patch selection saved (optional)
    full_bytes: int | None = None

    def __post_init__(self) -> None:
        _ident(self, "device_id")
        _ident(self, "request_id")
        _float(self, "at", 0.0)
        if self.status not in OUTCOME_STATUSES:
            raise BadFieldError(f"status must be one of {OUTCOME_STATUSES}, got {self.status!r}")
        n = _int(self, "num_patches", 1, MAX_SIDE * MAX_SIDE)
        sent = _int(self, "patches", 0, n)
        nbytes = _int(self, "bytes", 0, 2**53)
        if (self.status == "edge") != (sent == 0 and nbytes == 0):
            raise BadFieldError("status 'edge' means nothing was sent, and only it does")
        _opt_float(self, "latency_ms", 0.0)
        _int(self, "edge_label", 0, MAX_CLASS_ID)
        _int(self, "final_label", 0, MAX_CLASS_ID)
        _opt_int(self, "ground_truth", 0, MAX_CLASS_ID)
        _opt_float(self, "uncertainty")
        if self.error_code is not None:
            _kind(self, "error_code")
        _opt_int(self, "full_bytes", 0, 2**53)
        if self.status == "edge" and self.full_bytes:
            raise BadFieldError("an image kept at the edge sent nothing, so it has no full-image cost")

    @property
    def offloaded(self) -> bool:
        return self.status != "edge"


@dataclass(frozen=True)
class EdgeMetrics(Message):
    """A device's periodic summary of its outcomes over the last ``window_s`` seconds."""

    KIND: ClassVar[str] = "em"
    WIRE: ClassVar[dict[str, str]] = {
        "device_id": "d", "at": "at", "window_s": "win", "images": "n", "offloaded": "off", "replies": "rep",
        "timeouts": "to", "errors": "er", "bytes_sent": "nb", "patches_sent": "np", "latency_ms_p50": "l50",
        "latency_ms_p95": "l95", "latency_ms_p99": "l99", "labelled": "lab", "correct": "ok"}

    device_id: str
    at: float
    window_s: float
    images: int
    offloaded: int
    replies: int
    timeouts: int
    errors: int
    bytes_sent: int
    patches_sent: int
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    latency_ms_p99: float | None
    labelled: int = 0  # images with ground truth (evaluation runs)
    correct: int = 0  # of those, final label correct

    def __post_init__(self) -> None:
        _ident(self, "device_id")
        _float(self, "at", 0.0)
        _float(self, "window_s", 0.0)
        images = _int(self, "images", 0, 2**53)
        offloaded = _int(self, "offloaded", 0, images)
        answered = sum(_int(self, name, 0, offloaded) for name in ("replies", "timeouts", "errors"))
        if answered > offloaded:
            raise BadFieldError("replies + timeouts + errors exceed offloaded")
        _int(self, "bytes_sent", 0, 2**53)
        _int(self, "patches_sent", 0, 2**53)
        for name in ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99"):
            _opt_float(self, name, 0.0)
        labelled = _int(self, "labelled", 0, images)
        _int(self, "correct", 0, labelled)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


@dataclass(frozen=True)
class Availability(Message):
    """Retained presence of a device, worker, monitor or scaler; the offline form is its last will."""

    KIND: ClassVar[str] = "av"
    WIRE: ClassVar[dict[str, str]] = {"role": "ro", "ident": "i", "state": "s", "since": "at"}

    role: str
    ident: str
    state: Literal["online", "offline"]
    since: float

    def __post_init__(self) -> None:
        try:
            validate_role(self.role)
        except BadTopicError as exc:
            raise BadFieldError(exc.message) from exc
        _ident(self, "ident")
        if self.state not in ("online", "offline"):
            raise BadFieldError(f"state must be 'online' or 'offline', got {self.state!r}")
        _float(self, "since", 0.0)


MESSAGE_TYPES: tuple[type[Message], ...] = (
    PatchRequest, Reply, ErrorReply, RegionRequest, WorkerMetrics, Outcome, EdgeMetrics, Availability)
_BY_KIND: dict[str, type[Message]] = {cls.KIND: cls for cls in MESSAGE_TYPES}


# ---------------------------------------------------------------------------------------------
# Encoding and decoding


def _required(cls: type[Message]) -> frozenset[str]:
    """Fields without a default: always on the wire (as nil where the type allows None)."""
    return frozenset(f.name for f in fields(cls)  # type: ignore[arg-type]
                     if f.default is MISSING and f.default_factory is MISSING)


def encode(message: Message, *, limits: ProtocolLimits | None = DEFAULT_LIMITS) -> bytes:
    """msgpack bytes of a message; optional fields that are ``None`` are left out. Refuses messages over
    the size limit (the broker would drop the connection, and paho does not check)."""
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "t": message.KIND}
    required = _required(type(message))
    for name, key in message.WIRE.items():
        value = getattr(message, name)
        if value is not None or name in required:
            body[key] = dict(value) if isinstance(value, Mapping) else value
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
    kwargs: dict[str, Any] = {}
    required = _required(cls)
    for name, key in cls.WIRE.items():
        if key in obj:
            kwargs[name] = obj[key]
        elif name in required:
            raise MalformedError(f"{cls.KIND} message lacks field {key!r} ({name})")
    try:
        return cls(**kwargs)
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
        _precheck_request(obj, limits)
    message = _build(cls, obj)
    if isinstance(message, PatchRequest):
        check_request_limits(message, limits)
    elif isinstance(message, Reply | RegionRequest) and len(message.topk_ids) > limits.max_topk:
        raise TooLargeError(f"top-k of {len(message.topk_ids)} exceeds {limits.max_topk}")
    return message


def _precheck_request(obj: dict[str, Any], limits: ProtocolLimits) -> None:
    """Refuse an oversized geometry from the raw fields, before the mask is unpacked."""
    h, w, p = obj.get("h"), obj.get("w"), obj.get("p")
    if type(h) is int and type(w) is int and h * w > limits.max_pixels:
        raise TooLargeError(f"image {h}×{w} exceeds {limits.max_pixels} pixels")
    if type(p) is int and p > limits.max_patch_size:
        raise TooLargeError(f"patch size {p} exceeds {limits.max_patch_size}")


def _decode_as(data: bytes, limits: ProtocolLimits, *classes: type[Message]) -> Message:
    message = decode(data, limits=limits)
    if not isinstance(message, classes):
        raise MalformedError(f"expected {' or '.join(c.KIND for c in classes)}, got {message.KIND}")
    return message


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


def decode_request(data: bytes, *, limits: ProtocolLimits = DEFAULT_LIMITS) -> PatchRequest:
    """A validated request (structure, geometry, mask, codec and params; pixels not decoded yet)."""
    message = _decode_as(data, limits, PatchRequest)
    assert isinstance(message, PatchRequest)
    return message


def _shown(value: str, limit: int = 80) -> str:
    """An untrusted string for an error message: quoted and escaped (no control characters reach a
    log line) and cut to ``limit`` characters."""
    return repr(value[:limit]) + ("…" if len(value) > limit else "")


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
    return codec.decode(request.payload, (request.height, request.width), request.indices, request.patch_size,
                        request.codec_params)


def build_request(*, device_id: str, request_id: str, pixels: np.ndarray, indices: np.ndarray | list[int],
                  patch_size: int, codec: str, codec_params: Mapping[str, int] | None = None,
                  scores: np.ndarray | None = None, topk_ids: tuple[int, ...] | list[int] = (),
                  topk_probs: tuple[float, ...] | list[float] = (), uncertainty: float = 0.0,
                  uncertainty_kind: str = "min_entropy", sent_at: float, label: int | None = None,
                  deadline: float | None = None, downscale: int | None = None,
                  exchange: str | None = None) -> PatchRequest:
    """Encode the kept patches of ``pixels`` ((H, W, 3) uint8) and wrap them in a request."""
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
        deadline=deadline, downscale=downscale, exchange=exchange)
