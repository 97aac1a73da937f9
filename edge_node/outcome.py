"""One image's fate on a device: the protocol's :class:`~shared.protocol.Outcome`, plus what only the
device knows (attempts, timings, the answering worker) for its fleet summary.

There is one outcome record in the project: the protocol's. :class:`OutcomeRecord` *is* an
``Outcome`` (same fields, same names, same checks in ``__post_init__``), so what a device publishes,
what the monitor folds and what the fleet summary counts are one value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from shared.errors import BadFieldError
from shared.protocol import Outcome

_OUTCOME_FIELDS = tuple(f.name for f in fields(Outcome))


@dataclass(frozen=True)
class OutcomeRecord(Outcome):
    """An :class:`Outcome` with the device-local facts the fleet summary needs (never on the wire)."""

    attempts: int = 0  # requests published for this image (0: kept at the edge)
    worker_id: str | None = None
    edge_ms: float = 0.0
    region: bool = False  # region offload: the worker asked for a region and the device sent it
    sent_at: float | None = None  # monotonic time of the image's first publish (None: never published)
    done_at: float = 0.0  # monotonic time the device settled the image's answer

    def __post_init__(self) -> None:
        super().__post_init__()
        if type(self.attempts) is not int or self.attempts < 0:
            raise BadFieldError(f"attempts must be an int ≥ 0, got {self.attempts!r}")
        if not math.isfinite(self.edge_ms) or self.edge_ms < 0:
            raise BadFieldError(f"edge_ms must be finite and ≥ 0, got {self.edge_ms!r}")

    def to_message(self) -> Outcome:
        """The published part: the protocol's Outcome, without the device-local fields."""
        return Outcome(**{name: getattr(self, name) for name in _OUTCOME_FIELDS})
