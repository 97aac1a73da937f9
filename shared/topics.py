"""MQTT topic names of protocol v1: pure string functions, no broker.

Every topic starts with a versioned prefix (``patchcast/v1``) so a v2 can run on the same broker.
Ids that become topic levels (model, device, worker group, role, id) are validated: MQTT gives
``/`` ``+`` ``#`` meaning, a leading ``$`` is reserved for the broker, and an id that is too long
makes every topic (and every log line) long. See ``docs/protocol.md`` for the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import BadTopicError

PROTOCOL_PREFIX = "patchcast/v1"
MAX_ID_LEN = 64
# A conservative alphabet: safe in topics, file names, metrics labels and log lines.
_ID_RE = re.compile(r"[A-Za-z0-9_.:-]+")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:-]+(/[A-Za-z0-9_.:-]+)*")

ROLES = ("edge", "worker", "monitor", "scaler")


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid topic level id, else raise :class:`BadTopicError`.

    1..64 characters from ``A-Z a-z 0-9 _ . : -``; so never ``/``, ``+``, ``#``, ``$`` or spaces.
    """
    if not isinstance(value, str):
        raise BadTopicError(f"{what} must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_ID_LEN:
        raise BadTopicError(f"{what} must have 1..{MAX_ID_LEN} characters, got {len(value)}")
    if not _ID_RE.fullmatch(value):
        raise BadTopicError(f"{what} {value!r} may only contain letters, digits and '_' '.' ':' '-'")
    return value


def validate_role(value: object) -> str:
    role = validate_id(value, "role")
    if role not in ROLES:
        raise BadTopicError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix. ``Topics()`` is the v1 namespace; tests may use another prefix."""

    prefix: str = PROTOCOL_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX_RE.fullmatch(self.prefix) or len(self.prefix) > 4 * MAX_ID_LEN:
            raise BadTopicError(f"topic prefix {self.prefix!r} must be '/'-separated ids without wildcards")

    # Requests: one topic per (model, device), so ACLs can pin a device to its own topic.
    def request(self, model: str, device: str) -> str:
        return f"{self.prefix}/req/{validate_id(model, 'model')}/{validate_id(device, 'device id')}"

    def request_filter(self, model: str) -> str:
        """All devices' requests for ``model`` (a plain, non-shared subscription: monitors, tests)."""
        return f"{self.prefix}/req/{validate_id(model, 'model')}/+"

    def worker_subscription(self, group: str, model: str) -> str:
        """Shared subscription of a worker pool: the broker hands each request to one member."""
        return f"$share/{validate_id(group, 'worker group')}/{self.request_filter(model)}"

    # Replies (Reply or ErrorReply) go to the device's own topic; the request carries it as the
    # MQTT v5 response topic, so workers never need to build it.
    def reply(self, device: str) -> str:
        return f"{self.prefix}/reply/{validate_id(device, 'device id')}"

    # Region retransmission: a device sends the region a worker asked for to that worker alone (the
    # worker holds the exchange); the device level lets an ACL pin a device to its own topic.
    def region(self, worker: str, device: str) -> str:
        return f"{self.prefix}/region/{validate_id(worker, 'worker id')}/{validate_id(device, 'device id')}"

    def region_filter(self, worker: str) -> str:
        """What one worker subscribes to (plainly, not shared): regions sent to it by any device."""
        return f"{self.prefix}/region/{validate_id(worker, 'worker id')}/+"

    def parse_region(self, topic: str) -> tuple[str, str] | None:
        """``(worker, device)`` of a region topic; ``None`` for any other topic."""
        head = f"{self.prefix}/region/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        if len(parts) != 2:
            raise BadTopicError(f"{topic!r}: expected {head}<worker>/<device>")
        return validate_id(parts[0], "worker id"), validate_id(parts[1], "device id")

    def metrics(self, role: str, ident: str) -> str:
        return f"{self.prefix}/metrics/{validate_role(role)}/{validate_id(ident)}"

    def metrics_filter(self, role: str | None = None) -> str:
        return f"{self.prefix}/metrics/{'+' if role is None else validate_role(role)}/+"

    def availability(self, role: str, ident: str) -> str:
        """Retained ``Availability``; the same topic is the client's last will (state offline)."""
        return f"{self.prefix}/availability/{validate_role(role)}/{validate_id(ident)}"

    def availability_filter(self, role: str | None = None) -> str:
        return f"{self.prefix}/availability/{'+' if role is None else validate_role(role)}/+"

    def errors(self, role: str, ident: str) -> str:
        """ErrorReplies that have no reply topic to go to (e.g. a request without a response topic)."""
        return f"{self.prefix}/errors/{validate_role(role)}/{validate_id(ident)}"

    def errors_filter(self) -> str:
        return f"{self.prefix}/errors/+/+"

    def parse_request(self, topic: str) -> tuple[str, str]:
        """``(model, device)`` of a request topic; a worker checks the payload's device id against it."""
        head = f"{self.prefix}/req/"
        if not topic.startswith(head):
            raise BadTopicError(f"{topic!r} is not a request topic under {self.prefix!r}")
        parts = topic[len(head):].split("/")
        if len(parts) != 2:
            raise BadTopicError(f"{topic!r}: expected {head}<model>/<device>")
        return validate_id(parts[0], "model"), validate_id(parts[1], "device id")

    def parse_role_id(self, topic: str, kind: str) -> tuple[str, str]:
        """``(role, id)`` of a metrics, availability or errors topic (``kind`` is that level's name)."""
        head = f"{self.prefix}/{kind}/"
        if kind not in ("metrics", "availability", "errors") or not topic.startswith(head):
            raise BadTopicError(f"{topic!r} is not a {kind} topic under {self.prefix!r}")
        parts = topic[len(head):].split("/")
        if len(parts) != 2:
            raise BadTopicError(f"{topic!r}: expected {head}<role>/<id>")
        return validate_role(parts[0]), validate_id(parts[1])


V1 = Topics()
