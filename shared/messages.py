"""The v1 wire messages: frozen dataclasses whose ``__post_init__`` is the single validator.

A message that exists is valid, whether built locally or decoded from the wire. ``KIND`` is a
message's ``"t"`` value and ``WIRE`` maps its field names to their short msgpack keys;
:mod:`shared.protocol` encodes and decodes them, ``docs/protocol.md`` is the contract.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np

from shared.bitmask import mask_nbytes, unpack_mask
from shared.codecs import get_codec
from shared.errors import BadFieldError, BadGeometryError, BadMaskError, BadTopicError
from shared.topics import validate_role
from shared.wire_fast import reply_fields, request_fields
from shared.wire_fields import (
    KIND_RE,
    MAX_CLASS_ID,
    MAX_DOWNSCALE,
    MAX_MESSAGE_CHARS,
    MAX_PATCH_SIZE,
    MAX_SIDE,
    bytes_field,
    float_field,
    ident_field,
    int_field,
    int_map_field,
    kind_field,
    opt_float,
    opt_int,
    seq_field,
    set_field,
    str_field,
    topk_fields,
)


class Message:
    """Base of all v1 messages: ``KIND`` is the ``"t"`` value, ``WIRE`` maps field names to keys."""

    KIND: ClassVar[str]
    WIRE: ClassVar[dict[str, str]]


M = TypeVar("M", bound=Message)

# Per message class: its optional fields' defaults, or None when one is a factory (built by __init__ then).
_DEFAULTS: dict[type[Message], dict[str, object] | None] = {}


def _defaults(cls: type[Message]) -> dict[str, object] | None:
    try:
        return _DEFAULTS[cls]
    except KeyError:
        pass
    defaults: dict[str, object] | None = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.default_factory is not MISSING:
            defaults = None
            break
        if f.default is not MISSING:
            defaults[f.name] = f.default  # type: ignore[index]
    _DEFAULTS[cls] = defaults
    return defaults


def construct(cls: type[M], values: dict[str, Any]) -> M:
    """``cls(**values)``, validated by its ``__post_init__`` as always, without the generated ``__init__``
    (a frozen dataclass's sets each field through ``object.__setattr__``: a quarter of a request's
    decode on a worker's event loop). ``values`` must name fields of ``cls`` only, every required one
    among them (the caller checks: :func:`shared.protocol.decode` does); a class with a default factory
    goes through ``__init__``. ``tests/protocol/test_message_construct.py`` holds both ways to the same
    fields and the same errors."""
    defaults = _defaults(cls)
    if defaults is None:
        return cls(**values)
    message = object.__new__(cls)
    state = message.__dict__
    state.update(defaults)
    state.update(values)
    message.__post_init__()  # type: ignore[attr-defined]
    return message


def _mask_field(obj: object, name: str, n: int) -> np.ndarray:
    """The sorted indices of bitmask field ``name`` over ``n`` patches; BadMaskError when it is not one."""
    data = bytes_field(obj, name)
    if len(data) != mask_nbytes(n):
        raise BadMaskError(f"{name} has {len(data)} bytes, expected ceil({n}/8) = {mask_nbytes(n)}")
    try:
        return unpack_mask(data, n)
    except ValueError as exc:  # its message names the mask already
        raise BadMaskError(str(exc) if name == "mask" else f"{name}: {exc}") from exc


@dataclass(frozen=True)
class PatchRequest(Message):
    """A device's request: the kept patches of one image plus what the server needs to answer it."""

    KIND: ClassVar[str] = "req"
    WIRE: ClassVar[dict[str, str]] = {
        "device_id": "d", "request_id": "r", "height": "h", "width": "w", "patch_size": "p", "grid": "g",
        "mask": "m", "codec": "c", "codec_params": "cp", "payload": "x", "topk_ids": "k", "topk_probs": "kp",
        "uncertainty": "u", "uncertainty_kind": "uk", "sent_at": "ts", "label": "y", "deadline": "dl",
        "downscale": "sc", "exchange": "ex", "offer": "of"}

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
    # The server's top-up (edge.offload = 'top_up'): a plain patch request may offer a larger selection of
    # the same image (a bitmask over the same grid, every sent patch in it and at least one more); a
    # worker unsure on the sent patches asks, by RegionRequest, for the offered ones it lacks.
    offer: bytes | None = None

    def __post_init__(self) -> None:
        if request_fields(self.__dict__):  # the common case in one pass (shared.wire_fast); else every check
            return
        ident_field(self, "device_id")
        ident_field(self, "request_id")
        p = int_field(self, "patch_size", 1, MAX_PATCH_SIZE)
        h = int_field(self, "height", 1, MAX_SIDE)
        w = int_field(self, "width", 1, MAX_SIDE)
        if h % p or w % p:
            raise BadGeometryError(f"image {h}×{w} is not a multiple of patch size {p}")
        grid = seq_field(self, "grid", int, 2)
        if grid != (h // p, w // p):
            raise BadGeometryError(f"grid {grid} does not match {h}×{w} / {p} = {(h // p, w // p)}")
        n = grid[0] * grid[1]
        kept = _mask_field(self, "mask", n)
        if kept.size == 0:
            raise BadMaskError("mask keeps no patch")
        codec = get_codec(str_field(self, "codec", 64))
        params = self.codec_params
        if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
            raise BadFieldError("codec_params must be a map with string keys")
        set_field(self, "codec_params", codec.resolve_params(params))
        if not bytes_field(self, "payload"):
            raise BadFieldError("payload is empty")
        topk_fields(self, "topk_ids", "topk_probs")
        float_field(self, "uncertainty")
        kind_field(self, "uncertainty_kind")
        sent = float_field(self, "sent_at", 0.0)
        opt_int(self, "label", 0, MAX_CLASS_ID)
        opt_float(self, "deadline", sent)
        if opt_int(self, "downscale", 2, MAX_DOWNSCALE) is not None:
            if kept.size != n:
                raise BadMaskError("a downscaled (global) request keeps every patch")
            if self.exchange is not None:
                raise BadFieldError("a request is either global (downscale) or a region (exchange), not both")
        if self.exchange is not None:
            ident_field(self, "exchange")
        if self.offer is not None:
            self._check_offer(kept, n)

    def _check_offer(self, kept: np.ndarray, n: int) -> None:
        if self.downscale is not None or self.exchange is not None:
            raise BadFieldError("only a plain patch request offers more patches (not a global or region one)")
        offered = _mask_field(self, "offer", n)
        if offered.size <= kept.size or np.setdiff1d(kept, offered, assume_unique=True).size:
            raise BadMaskError("an offer holds every sent patch and at least one more")

    @property
    def offered(self) -> np.ndarray:
        """Sorted indices of the offered patches not sent (int64; empty without an offer)."""
        if self.offer is None:
            return np.zeros(0, dtype=np.int64)
        return np.setdiff1d(unpack_mask(self.offer, self.num_patches), self.indices, assume_unique=True)

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
        """How many patches the request sends (its mask's set bits; a validated mask has no padding bits)."""
        return int.from_bytes(self.mask, "big").bit_count()

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
        if reply_fields(self.__dict__):  # the common case in one pass (shared.wire_fast); else every check
            return
        ident_field(self, "request_id")
        int_field(self, "label", 0, MAX_CLASS_ID)
        topk_fields(self, "topk_ids", "topk_probs")
        for name in ("queue_ms", "infer_ms", "total_ms"):
            float_field(self, name, 0.0)
        ident_field(self, "worker_id")
        int_field(self, "batch_size", 1, 1 << 20)


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
            ident_field(self, "request_id")
        kind_field(self, "code")
        str_field(self, "message", MAX_MESSAGE_CHARS)
        ident_field(self, "worker_id")

    @classmethod
    def from_error(cls, exc: Exception, *, request_id: str | None, worker_id: str) -> ErrorReply:
        """The error reply for an exception; codes come from PatchCastError subclasses, else ``internal``."""
        code = getattr(exc, "code", "internal")
        return cls(request_id, code if isinstance(code, str) and KIND_RE.fullmatch(code) else "internal",
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
        ident_field(self, "request_id")
        ident_field(self, "exchange")
        int_field(self, "patch_size", 1, MAX_PATCH_SIZE)
        grid = seq_field(self, "grid", int, 2)
        if len(grid) != 2 or not all(1 <= side <= MAX_SIDE for side in grid):
            raise BadGeometryError(f"grid {grid!r} must be two ints in 1..{MAX_SIDE}")
        rows, cols = grid
        mask = bytes_field(self, "mask")
        if len(mask) != mask_nbytes(rows * cols):
            raise BadMaskError(f"mask has {len(mask)} bytes, expected {mask_nbytes(rows * cols)}")
        try:
            if unpack_mask(mask, rows * cols).size == 0:
                raise BadMaskError("mask keeps no patch")
        except ValueError as exc:
            raise BadMaskError(str(exc)) from exc
        topk_fields(self, "topk_ids", "topk_probs")
        if not self.topk_ids:
            raise BadFieldError("a region request carries the glance's top-k")
        float_field(self, "uncertainty")
        ident_field(self, "worker_id")
        float_field(self, "ttl_s", 0.001, 3600.0)

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
        ident_field(self, "worker_id")
        ident_field(self, "model")
        float_field(self, "at", 0.0)
        float_field(self, "window_s", 0.0)
        for name in ("queue_depth", "queue_capacity", "requests", "batches", "batch_size_max"):
            int_field(self, name, 0, 2**53)
        for name in ("oldest_queued_ms", "requests_per_s", "batch_size_mean", "tokens_per_batch_mean",
                     "service_ms_p50", "service_ms_p95", "service_ms_p99", "arrival_ms_p95"):
            float_field(self, name, 0.0)
        float_field(self, "busy_fraction", 0.0, 1.0)
        int_map_field(self, "errors_by_code", 64, 0, 2**53)


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
        ident_field(self, "device_id")
        ident_field(self, "request_id")
        float_field(self, "at", 0.0)
        if self.status not in OUTCOME_STATUSES:
            raise BadFieldError(f"status must be one of {OUTCOME_STATUSES}, got {self.status!r}")
        n = int_field(self, "num_patches", 1, MAX_SIDE * MAX_SIDE)
        sent = int_field(self, "patches", 0, n)
        nbytes = int_field(self, "bytes", 0, 2**53)
        if (self.status == "edge") != (sent == 0 and nbytes == 0):
            raise BadFieldError("status 'edge' means nothing was sent, and only it does")
        opt_float(self, "latency_ms", 0.0)
        int_field(self, "edge_label", 0, MAX_CLASS_ID)
        int_field(self, "final_label", 0, MAX_CLASS_ID)
        opt_int(self, "ground_truth", 0, MAX_CLASS_ID)
        opt_float(self, "uncertainty")
        if self.error_code is not None:
            kind_field(self, "error_code")
        opt_int(self, "full_bytes", 0, 2**53)
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
        ident_field(self, "device_id")
        float_field(self, "at", 0.0)
        float_field(self, "window_s", 0.0)
        images = int_field(self, "images", 0, 2**53)
        offloaded = int_field(self, "offloaded", 0, images)
        answered = sum(int_field(self, name, 0, offloaded) for name in ("replies", "timeouts", "errors"))
        if answered > offloaded:
            raise BadFieldError("replies + timeouts + errors exceed offloaded")
        int_field(self, "bytes_sent", 0, 2**53)
        int_field(self, "patches_sent", 0, 2**53)
        for name in ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99"):
            opt_float(self, name, 0.0)
        labelled = int_field(self, "labelled", 0, images)
        int_field(self, "correct", 0, labelled)

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
        ident_field(self, "ident")
        if self.state not in ("online", "offline"):
            raise BadFieldError(f"state must be 'online' or 'offline', got {self.state!r}")
        float_field(self, "since", 0.0)


MESSAGE_TYPES: tuple[type[Message], ...] = (
    PatchRequest, Reply, ErrorReply, RegionRequest, WorkerMetrics, Outcome, EdgeMetrics, Availability)
