"""The requests a worker saw recently, so that a device's re-send is answered again, never computed twice.

A device re-sends an unanswered request under the same request id (``edge.retries``; the reply, or
the request, may have been lost with a broker restart). The worker remembers each
(device, request id) it accepted for ``worker.dedupe_ttl_s``:

* **pending** (accepted, not answered yet): a re-send is dropped; the first request's reply goes to
  the same reply topic with the same correlation data, so it answers the device;
* **answered**: a re-send gets the same :class:`~shared.protocol.Reply` again at once, without an
  inference;
* a request that failed (an error reply) is forgotten, so that its re-send is served afresh.

Bounded: at most ``worker.dedupe_capacity`` entries, the oldest dropped first, and an entry older
than the TTL counts as unseen. Behind a shared subscription a re-send may reach another worker of
the pool; that one computes it again, and the device keeps the first reply (docs/reliability.md).
Only plain patch requests are remembered: a region exchange is tried once.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass

from shared.config import WorkerConfig
from shared.protocol import PatchRequest, Reply

Key = tuple[str, str]  # (device id from the request topic, request id)


class Seen(enum.Enum):
    NEW = "new"
    PENDING = "pending"
    ANSWERED = "answered"


@dataclass
class DedupeStats:
    replayed: int = 0  # re-sends answered again from memory
    dropped: int = 0  # re-sends of a request still in progress (its first reply answers them)
    evicted: int = 0  # entries dropped to keep the bound before their TTL


@dataclass
class _Entry:
    expires_at: float
    reply: Reply | None = None


def dedupe_key(request: PatchRequest) -> Key | None:
    """The key a re-send of ``request`` shares with it, or None when it is not remembered (a region
    exchange's glance or region)."""
    if request.exchange is not None or request.downscale is not None:
        return None
    return request.device_id, request.request_id


class RecentRequests:
    """A bounded TTL map (device, request id) → pending | reply; event-loop only (no locking)."""

    def __init__(self, capacity: int, ttl_s: float) -> None:
        if capacity < 0 or ttl_s <= 0:
            raise ValueError("capacity must be ≥ 0 and ttl_s positive")
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.stats = DedupeStats()
        self._entries: collections.OrderedDict[Key, _Entry] = collections.OrderedDict()

    @classmethod
    def from_config(cls, config: WorkerConfig) -> RecentRequests:
        return cls(config.dedupe_capacity, config.dedupe_ttl_s)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, key: Key, now: float) -> tuple[Seen, Reply | None]:
        """Has this request been seen? Counts the re-sends it recognises."""
        entry = self._entries.get(key)
        if entry is None:
            return Seen.NEW, None
        if entry.expires_at <= now:
            del self._entries[key]
            return Seen.NEW, None
        if entry.reply is None:
            self.stats.dropped += 1
            return Seen.PENDING, None
        self.stats.replayed += 1
        return Seen.ANSWERED, entry.reply

    def begin(self, key: Key, now: float) -> None:
        """``key`` was accepted for inference."""
        if not self.capacity:
            return
        self._entries[key] = _Entry(now + self.ttl_s)
        self._entries.move_to_end(key)
        self._trim(now)

    def answer(self, key: Key, reply: Reply, now: float) -> None:
        """``key`` was answered with ``reply`` (remembered for a TTL from now)."""
        if not self.capacity:
            return
        self._entries[key] = _Entry(now + self.ttl_s, reply)
        self._entries.move_to_end(key)
        self._trim(now)

    def forget(self, key: Key) -> None:
        """``key`` failed: a re-send is served afresh."""
        self._entries.pop(key, None)

    def _trim(self, now: float) -> None:
        entries = self._entries
        while entries:  # expired entries at the old end first
            oldest = next(iter(entries.values()))
            if oldest.expires_at > now and len(entries) <= self.capacity:
                break
            if oldest.expires_at > now:
                self.stats.evicted += 1
            entries.popitem(last=False)
