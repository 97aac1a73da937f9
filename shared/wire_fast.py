"""The common case of the two messages every request costs, checked in one pass.

A request in and a reply out are validated per request; through :mod:`shared.wire_fields` that is one
helper call, one ``getattr`` and one ``object.__setattr__`` per field, about a third of a worker's event
loop (docs/benchmarks.md, "Service overhead"). The functions here accept exactly the well-formed common
case — every field already of its wire type (floats as floats, ids as strings), nothing optional that
needs more than a ``None`` check — and say ``False`` otherwise, *without raising*; the message's full
validator then runs and raises the precise error, in its own order. They never accept what the full
validator refuses, and they leave the fields as it would (tuples for arrays, the codec's resolved
params): ``tests/protocol/test_wire_fast.py`` checks both on generated messages, hostile ones included.
"""

from __future__ import annotations

import math
from typing import Any

from shared.bitmask import mask_keeps_any
from shared.codecs import get_codec
from shared.topics import _ID_RE, MAX_ID_LEN
from shared.wire_fields import KIND_RE, MAX_CLASS_ID, MAX_PATCH_SIZE, MAX_SIDE, MAX_TOPK

_SEQUENCES = (list, tuple)
_id_match = _ID_RE.fullmatch
_kind_match = KIND_RE.fullmatch
_isfinite = math.isfinite


def is_id(value: object) -> bool:
    """What :func:`shared.topics.validate_id` accepts, as a bool."""
    return type(value) is str and 0 < len(value) <= MAX_ID_LEN and _id_match(value) is not None


def topk(ids: object, probs: object) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
    """``(ids, probs)`` as tuples when :func:`shared.wire_fields.topk_fields` would accept them unchanged
    but for the tuples: ints, floats (no ints standing for floats), distinct ids in range, probabilities
    in 0..1, highest first, summing to at most 1; else ``None``."""
    if type(ids) not in _SEQUENCES or type(probs) not in _SEQUENCES:
        return None
    n = len(ids)  # type: ignore[arg-type]
    if n != len(probs) or n > MAX_TOPK:  # type: ignore[arg-type]
        return None
    ids_t: tuple[Any, ...] = tuple(ids)  # type: ignore[arg-type]
    probs_t: tuple[Any, ...] = tuple(probs)  # type: ignore[arg-type]
    # Plain loops: for a top-5 they are ~3x cheaper than map/set pipelines.
    previous = 1.0
    for prob in probs_t:  # floats in 0..1, highest first (NaN fails the comparison)
        if type(prob) is not float or not 0.0 <= prob <= previous:
            return None
        previous = prob
    for class_id in ids_t:
        if type(class_id) is not int or not 0 <= class_id <= MAX_CLASS_ID:
            return None
    if len(set(ids_t)) != n or sum(probs_t) > 1.0 + 1e-3:
        return None
    return ids_t, probs_t


def _number(value: object, lo: float) -> bool:
    return type(value) is float and _isfinite(value) and value >= lo


def request_fields(f: dict[str, Any]) -> bool:
    """A plain patch request's fields (``PatchRequest.__dict__``): ``True``, with the arrays made tuples and
    the codec params resolved, when the full validator would accept them; ``False`` (nothing raised,
    maybe some arrays already tuples, which the validator accepts the same) to let it decide."""
    if f["downscale"] is not None or f["exchange"] is not None or f["offer"] is not None:
        return False
    p, h, w = f["patch_size"], f["height"], f["width"]
    if not (is_id(f["device_id"]) and is_id(f["request_id"]) and type(p) is int and type(h) is int
            and type(w) is int and 0 < p <= MAX_PATCH_SIZE and 0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE
            and not h % p and not w % p):
        return False
    grid, mask = f["grid"], f["mask"]
    rows, cols = h // p, w // p
    if (type(grid) not in _SEQUENCES or len(grid) != 2 or type(grid[0]) is not int or type(grid[1]) is not int
            or grid[0] != rows or grid[1] != cols or type(mask) is not bytes):
        return False
    if not mask_keeps_any(mask, rows * cols):  # unpacked when the indices are needed (off a worker's event loop)
        return False
    codec_name, params, payload = f["codec"], f["codec_params"], f["payload"]
    if type(codec_name) is not str or len(codec_name) > 64 or type(params) is not dict:
        return False
    if type(payload) is not bytes or not payload:
        return False
    kind, sent, label, deadline = f["uncertainty_kind"], f["sent_at"], f["label"], f["deadline"]
    if not (type(f["uncertainty"]) is float and _isfinite(f["uncertainty"]) and type(kind) is str
            and _kind_match(kind) is not None and _number(sent, 0.0)
            and (label is None or (type(label) is int and 0 <= label <= MAX_CLASS_ID))
            and (deadline is None or _number(deadline, sent))):
        return False
    pair = topk(f["topk_ids"], f["topk_probs"])
    if pair is None:
        return False
    try:
        resolved = get_codec(codec_name).resolve_params(params)
    except Exception:  # an unknown codec or param: the validator says which
        return False
    f["grid"], f["codec_params"] = (rows, cols), resolved
    f["topk_ids"], f["topk_probs"] = pair
    return True


def reply_fields(f: dict[str, Any]) -> bool:
    """A reply's fields (``Reply.__dict__``), as :func:`request_fields`."""
    label, batch = f["label"], f["batch_size"]
    if not (is_id(f["request_id"]) and is_id(f["worker_id"]) and type(label) is int and 0 <= label <= MAX_CLASS_ID
            and type(batch) is int and 0 < batch <= 1 << 20 and _number(f["queue_ms"], 0.0)
            and _number(f["infer_ms"], 0.0) and _number(f["total_ms"], 0.0)):
        return False
    pair = topk(f["topk_ids"], f["topk_probs"])
    if pair is None:
        return False
    f["topk_ids"], f["topk_probs"] = pair
    return True
