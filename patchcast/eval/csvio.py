"""``points.csv`` of either evaluation: one row per operating point (a dataclass), written and read
back by field type. Floats are written with six decimals, the fields named ``short`` (parameters such
as η) with six significant digits; None is an empty cell."""

from __future__ import annotations

import csv
import typing
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def write_points(path: Path, cls: type, points: Sequence[Any], short: Iterable[str] = ()) -> None:
    """Write ``points`` (instances of the dataclass ``cls``) under a header row of its fields."""
    short = frozenset(short)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(cls)])
        w.writeheader()
        for p in points:
            row = asdict(p)
            for k, v in row.items():
                if v is None:
                    row[k] = ""
                elif isinstance(v, float):
                    row[k] = f"{v:.6g}" if k in short else f"{v:.6f}"
            w.writerow(row)


def _parser(hint: Any) -> tuple[type, bool]:
    """The scalar type of a field (str, int or float) and whether it may be None."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint)
    return base, optional


def read_points(path: Path, cls: type[T]) -> list[T]:
    """``points.csv`` back as ``cls`` instances (an empty cell of an optional field is None)."""
    hints = typing.get_type_hints(cls)
    parsers = {name: _parser(hint) for name, hint in hints.items() if name in {f.name for f in fields(cls)}}  # type: ignore[arg-type]
    out: list[T] = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            values: dict[str, Any] = {}
            for name, (base, optional) in parsers.items():
                cell = r[name]
                values[name] = None if optional and cell == "" else base(cell)
            out.append(cls(**values))
    return out
