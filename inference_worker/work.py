"""What flows through a worker: a request waiting for its batch, a batch's answer, an outbox entry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from inference_worker.decoders import Pending
from inference_worker.exchanges import Exchange
from shared.protocol import Message, PatchRequest


@dataclass(eq=False)
class WorkItem:
    """A validated request waiting for inference; its pixels decode on a decoder thread meanwhile, or on the
    inference thread as its batch is assembled (``worker.decode_threads``)."""

    request: PatchRequest
    pixels: Pending[np.ndarray]
    # The patches the model sees, when not the request's own (a global request's full grid); the request's
    # own are unpacked from its mask when first asked for, on the inference thread.
    patch_indices: np.ndarray | None
    response_topic: str  # the sending device's own reply topic (from the request topic)
    correlation: bytes | None
    arrived: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # monotonic; past it no answer is published
    # Region retransmission: a global request whose device offers a region (the batch then reads the
    # server's attention), or the region of an open exchange (fused with its glance).
    offers_region: bool = False
    exchange: Exchange | None = None
    # The server's top-up: the offered patches this request did not send (None: no offer). Unsure on the
    # sent ones, the worker asks for these and answers on all of them.
    offer: np.ndarray | None = None

    @property
    def indices(self) -> np.ndarray:
        """Sorted indices of the patches the model sees for this request."""
        return self.request.indices if self.patch_indices is None else self.patch_indices


@dataclass(frozen=True)
class Prediction:
    label: int
    topk_ids: tuple[int, ...]
    topk_probs: tuple[float, ...]
    batch_started: float  # monotonic
    infer_ms: float
    batch_size: int
    # A glance too uncertain to answer: the window to ask for, and what the exchange keeps.
    window: np.ndarray | None = None
    uncertainty: float = 0.0
    probs: np.ndarray | None = None
    global_patches: np.ndarray | None = None
    first_indices: np.ndarray | None = None  # a top-up: the sent patches' indices (global_patches: their pixels)


@dataclass(frozen=True)
class OutboxEntry:
    topic: str
    correlation: bytes | None
    message: Message | None  # None: a Reply built from ``prediction`` at publish time
    arrived: float | None = None  # for service time; None for refusals of unreadable requests
    item: WorkItem | None = None
    prediction: Prediction | None = None
    response_topic: str | None = None  # MQTT response topic of the message (a RegionRequest's)
    deadline: float | None = None  # monotonic; a message not published by then is dropped
