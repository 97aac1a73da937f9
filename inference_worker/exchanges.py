"""The worker's open exchanges: glances it asked a device to complete with a region, and patch requests
it asked to top up with more of the patches they offered.

Bounded (``region.max_pending``: a full table makes the glance answer alone, nothing waits on it) and
timed (``region.timeout_s``: the worker forgets an exchange whose region did not come; the device,
holding the glance's answer from the RegionRequest, keeps that). Each exchange is claimed once: the
region that claims it must come from the device that was asked, for the request that was asked about,
with exactly the window that was asked for. Event-loop only (no locks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.errors import BadMaskError, UnknownExchangeError
from shared.protocol import PatchRequest


@dataclass(frozen=True, eq=False)
class Exchange:
    exchange_id: str
    device_id: str
    request_id: str
    mask: bytes  # the window asked for, over the model's full grid
    global_probs: np.ndarray  # the glance's class probabilities (C,) float32
    global_patches: np.ndarray | None  # the glance's upsampled patches (N, p, p, 3) uint8, for image fusion
    expires_at: float  # monotonic
    # A top-up (not a region): the first request's patch indices, ``global_patches`` holding their pixels
    # (K, p, p, 3); the answer is one forward on those and the asked-for patches together.
    first_indices: np.ndarray | None = None

    @property
    def tokens(self) -> int | None:
        """Patches the completing request adds to its own (a top-up's first ones), else None."""
        return None if self.first_indices is None else int(self.first_indices.size)


class ExchangeTable:
    def __init__(self, capacity: int, timeout_s: float) -> None:
        self.capacity = capacity
        self.timeout_s = timeout_s
        self._open: dict[str, Exchange] = {}

    def __len__(self) -> int:
        return len(self._open)

    def open(self, exchange: Exchange) -> bool:
        """Hold ``exchange`` until claimed or expired; False (nothing held) when the table is full."""
        if len(self._open) >= self.capacity:
            return False
        self._open[exchange.exchange_id] = exchange
        return True

    def claim(self, request: PatchRequest, now: float) -> Exchange:
        """The exchange a region request completes, removed from the table; raises ProtocolError when
        there is none (:class:`UnknownExchangeError`: never opened, answered, or past its time at ``now``,
        monotonic, even if the sweep has not run yet) or the request is not what was asked for."""
        assert request.exchange is not None
        exchange = self._open.get(request.exchange)
        if exchange is not None and exchange.expires_at <= now:
            del self._open[request.exchange]
            raise UnknownExchangeError(f"exchange {request.exchange!r} expired")
        if exchange is None:
            raise UnknownExchangeError(f"no open exchange {request.exchange!r} here (answered, expired or "
                                       "never opened)")
        if (request.device_id, request.request_id) != (exchange.device_id, exchange.request_id):
            raise UnknownExchangeError(f"exchange {request.exchange!r} belongs to another request")
        if request.mask != exchange.mask:
            raise BadMaskError(f"region of exchange {request.exchange!r} is not the window asked for")
        del self._open[request.exchange]
        return exchange

    def expire(self, now: float) -> int:
        """Drop the exchanges past their time; how many."""
        gone = [key for key, ex in self._open.items() if ex.expires_at <= now]
        for key in gone:
            del self._open[key]
        return len(gone)
