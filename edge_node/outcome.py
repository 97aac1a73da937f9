"""One image's fate on a device: the protocol's Outcome plus what the fleet summary needs."""

from __future__ import annotations

import time
from dataclasses import dataclass

from shared.protocol import Outcome


@dataclass(frozen=True)
class OutcomeRecord:
    """One image's fate on a device (the protocol's Outcome plus what the summary needs)."""

    device_id: str
    request_id: str
    status: str  # edge | server | timeout | error (see shared.protocol.Outcome)
    patches: int
    num_patches: int
    bytes: int
    latency_ms: float | None
    edge_label: int
    final_label: int
    ground_truth: int | None
    uncertainty: float
    error_code: str | None = None
    attempts: int = 0  # requests published for this image (0: kept at the edge)
    worker_id: str | None = None
    edge_ms: float = 0.0
    full_bytes: int | None = None  # the same requests with the full image as a JPEG (when measured)
    region: bool = False  # region offload: the worker asked for a region and the device sent it
    sent_at: float | None = None  # monotonic time of the image's first publish (None: never published)
    done_at: float = 0.0  # monotonic time the device settled the image's answer

    def to_message(self) -> Outcome:
        return Outcome(device_id=self.device_id, request_id=self.request_id, at=time.time(),
                       status=self.status, patches=self.patches, num_patches=self.num_patches,  # type: ignore[arg-type]
                       bytes=self.bytes, latency_ms=self.latency_ms, edge_label=self.edge_label,
                       final_label=self.final_label, ground_truth=self.ground_truth,
                       uncertainty=self.uncertainty, error_code=self.error_code,
                       full_bytes=self.full_bytes if self.status != "edge" else None)
