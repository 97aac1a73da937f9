"""Field validators of the v1 wire messages, and v1's intrinsic bounds.

Each validator checks a frozen message's field by type first (``True`` is not an int), then by range,
and normalises it in place (tuples for arrays, floats for numbers). :mod:`shared.messages` calls them
from ``__post_init__``; every failure is a :class:`~shared.errors.BadFieldError`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from typing import Any

from shared.errors import BadFieldError, BadTopicError
from shared.topics import validate_id

# Intrinsic bounds of v1 (deployment limits, tighter, live in shared.protocol_limits.ProtocolLimits).
MAX_SIDE = 65_535  # JPEG's limit; image codecs cannot represent more
MAX_PATCH_SIZE = 256
MAX_TOPK = 1000
MAX_CLASS_ID = 2**31 - 1
MAX_MESSAGE_CHARS = 1024
MAX_DOWNSCALE = 16
KIND_RE = re.compile(r"[a-z0-9_]{1,32}")


def set_field(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclasses normalise fields only in __post_init__


def int_field(obj: object, name: str, lo: int, hi: int) -> int:
    value = getattr(obj, name)
    if type(value) is not int:  # exact type: bool and numpy ints are refused, not coerced
        raise BadFieldError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise BadFieldError(f"{name}={value} outside {lo}..{hi}")
    return value


def opt_int(obj: object, name: str, lo: int, hi: int) -> int | None:
    return None if getattr(obj, name) is None else int_field(obj, name, lo, hi)


def float_field(obj: object, name: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    value = getattr(obj, name)
    if type(value) not in (float, int):  # ints are fine on the wire (0, 1); bools are not
        raise BadFieldError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or not lo <= number <= hi:
        raise BadFieldError(f"{name}={value} is not finite or outside {lo}..{hi}")
    set_field(obj, name, number)
    return number


def opt_float(obj: object, name: str, lo: float = -math.inf, hi: float = math.inf) -> float | None:
    return None if getattr(obj, name) is None else float_field(obj, name, lo, hi)


def str_field(obj: object, name: str, max_len: int = MAX_MESSAGE_CHARS) -> str:
    value = getattr(obj, name)
    if not isinstance(value, str):
        raise BadFieldError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise BadFieldError(f"{name} has {len(value)} characters, at most {max_len}")
    return value


def ident_field(obj: object, name: str) -> str:
    try:
        return validate_id(getattr(obj, name), name)
    except BadTopicError as exc:
        raise BadFieldError(exc.message) from exc


def kind_field(obj: object, name: str) -> str:
    value = str_field(obj, name, 32)
    if not KIND_RE.fullmatch(value):
        raise BadFieldError(f"{name}={value!r} must match [a-z0-9_]{{1,32}}")
    return value


def bytes_field(obj: object, name: str) -> bytes:
    value = getattr(obj, name)
    if not isinstance(value, bytes | bytearray):
        raise BadFieldError(f"{name} must be bytes, got {type(value).__name__}")
    set_field(obj, name, bytes(value))
    return bytes(value)


def seq_field(obj: object, name: str, item: type, max_len: int) -> tuple[Any, ...]:
    value = getattr(obj, name)
    if not isinstance(value, list | tuple):
        raise BadFieldError(f"{name} must be an array, got {type(value).__name__}")
    if len(value) > max_len:
        raise BadFieldError(f"{name} has {len(value)} items, at most {max_len}")
    if item is int and all(type(v) is int for v in value):  # the common case, at once
        ints = tuple(value)
        set_field(obj, name, ints)
        return ints
    out = []
    for v in value:
        if item is float and type(v) in (float, int) and math.isfinite(v):
            out.append(float(v))
        elif item is int and type(v) is int:
            out.append(v)
        else:
            raise BadFieldError(f"{name} items must be finite {item.__name__}s, got {type(v).__name__}")
    result = tuple(out)
    set_field(obj, name, result)
    return result


def int_map_field(obj: object, name: str, max_len: int, lo: int, hi: int) -> dict[str, int]:
    value = getattr(obj, name)
    if not isinstance(value, Mapping):
        raise BadFieldError(f"{name} must be a map, got {type(value).__name__}")
    if len(value) > max_len:
        raise BadFieldError(f"{name} has {len(value)} entries, at most {max_len}")
    out: dict[str, int] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not KIND_RE.fullmatch(k):
            raise BadFieldError(f"{name} keys must match [a-z0-9_]{{1,32}}, got {k!r}")
        if type(v) is not int or not lo <= v <= hi:
            raise BadFieldError(f"{name}[{k!r}] must be an int in {lo}..{hi}, got {v!r}")
        out[k] = v
    set_field(obj, name, dict(sorted(out.items())))
    return out


def topk_fields(obj: object, ids_name: str, probs_name: str) -> None:
    ids = seq_field(obj, ids_name, int, MAX_TOPK)
    probs = seq_field(obj, probs_name, float, MAX_TOPK)
    if len(ids) != len(probs):
        raise BadFieldError(f"{ids_name} and {probs_name} differ in length ({len(ids)} vs {len(probs)})")
    if any(not 0 <= i <= MAX_CLASS_ID for i in ids) or len(set(ids)) != len(ids):
        raise BadFieldError(f"{ids_name} must be distinct class ids in 0..{MAX_CLASS_ID}")
    if any(not 0.0 <= p <= 1.0 for p in probs) or sum(probs) > 1.0 + 1e-3:
        raise BadFieldError(f"{probs_name} must be probabilities summing to at most 1")
    if any(a < b for a, b in itertools.pairwise(probs)):
        raise BadFieldError(f"{probs_name} must be sorted, highest first")
