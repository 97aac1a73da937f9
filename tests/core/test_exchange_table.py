"""The worker's open region exchanges (inference_worker.exchanges.ExchangeTable): bounded, timed, each
claimed once and only by the region that was asked for. Exact: no tolerances (ids, masks, counts)."""

from __future__ import annotations

import numpy as np
import pytest

from inference_worker.exchanges import Exchange, ExchangeTable
from shared.bitmask import pack_mask
from shared.errors import BadMaskError, ProtocolError, UnknownExchangeError
from shared.protocol import PatchRequest, build_request

GRID = 4  # 64×64 images in 16-px patches
WINDOW = [5, 6, 9, 10]


def exchange(exchange_id: str = "xab.1", *, device_id: str = "cam-01", request_id: str = "r-1",
             window: list[int] | None = None, expires_at: float = 100.0) -> Exchange:
    return Exchange(exchange_id=exchange_id, device_id=device_id, request_id=request_id,
                    mask=pack_mask(WINDOW if window is None else window, GRID * GRID),
                    global_probs=np.full(10, 0.1, dtype=np.float32), global_patches=None,
                    expires_at=expires_at)


def region(exchange_id: str = "xab.1", *, device_id: str = "cam-01", request_id: str = "r-1",
           window: list[int] | None = None) -> PatchRequest:
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    return build_request(device_id=device_id, request_id=request_id, pixels=pixels,
                         indices=np.array(WINDOW if window is None else window), patch_size=16, codec="raw",
                         sent_at=1.0, exchange=exchange_id)


def test_open_and_claim_once() -> None:
    table = ExchangeTable(capacity=4, timeout_s=5.0)
    assert len(table) == 0
    held = exchange()
    assert table.open(held) is True
    assert len(table) == 1
    claimed = table.claim(region(), 0.0)
    assert claimed is held
    assert len(table) == 0
    with pytest.raises(UnknownExchangeError) as info:
        table.claim(region(), 0.0)  # already answered
    assert info.value.code == "no_exchange" and isinstance(info.value, ProtocolError)


def test_claim_of_an_exchange_never_opened() -> None:
    table = ExchangeTable(capacity=4, timeout_s=5.0)
    table.open(exchange("xab.1"))
    with pytest.raises(UnknownExchangeError, match=r"xab\.2"):
        table.claim(region("xab.2"), 0.0)
    assert len(table) == 1
    assert table.claim(region("xab.1"), 0.0).exchange_id == "xab.1"


@pytest.mark.parametrize(("device_id", "request_id"), [("cam-02", "r-1"), ("cam-01", "r-2"), ("cam-02", "r-2")])
def test_a_region_from_another_device_or_request_is_refused_and_the_exchange_stays(device_id: str,
                                                                                   request_id: str) -> None:
    table = ExchangeTable(capacity=4, timeout_s=5.0)
    held = exchange()
    table.open(held)
    with pytest.raises(UnknownExchangeError, match="another request"):
        table.claim(region(device_id=device_id, request_id=request_id), 0.0)
    assert len(table) == 1
    assert table.claim(region(), 0.0) is held  # the rightful region still completes it


@pytest.mark.parametrize("window", [[5, 6, 9], [5, 6, 9, 10, 11], [0, 1, 4, 5], list(range(16))])
def test_a_region_with_another_window_is_refused_and_the_exchange_stays(window: list[int]) -> None:
    table = ExchangeTable(capacity=4, timeout_s=5.0)
    held = exchange()
    table.open(held)
    with pytest.raises(BadMaskError) as info:
        table.claim(region(window=window), 0.0)
    assert info.value.code == "bad_mask"
    assert len(table) == 1
    assert table.claim(region(), 0.0) is held


def test_a_full_table_opens_nothing_new() -> None:
    table = ExchangeTable(capacity=2, timeout_s=5.0)
    assert table.open(exchange("xab.1")) and table.open(exchange("xab.2", request_id="r-2"))
    assert table.open(exchange("xab.3", request_id="r-3")) is False
    assert len(table) == 2
    with pytest.raises(UnknownExchangeError):
        table.claim(region("xab.3", request_id="r-3"), 0.0)  # not held
    # Room again once one is claimed.
    table.claim(region("xab.1"), 0.0)
    assert table.open(exchange("xab.3", request_id="r-3")) is True
    assert len(table) == 2
    assert table.claim(region("xab.3", request_id="r-3"), 0.0).request_id == "r-3"


def test_expire_drops_only_the_expired_and_counts_them() -> None:
    table = ExchangeTable(capacity=8, timeout_s=5.0)
    for i, at in enumerate([10.0, 20.0, 30.0, 20.0]):
        table.open(exchange(f"xab.{i}", request_id=f"r-{i}", expires_at=at))
    assert table.expire(5.0) == 0 and len(table) == 4
    assert table.expire(20.0) == 3  # at its time is past its time: 10, 20, 20
    assert len(table) == 1
    for i in (0, 1, 3):
        with pytest.raises(UnknownExchangeError):
            table.claim(region(f"xab.{i}", request_id=f"r-{i}"), 0.0)
    assert table.expire(25.0) == 0
    assert table.claim(region("xab.2", request_id="r-2"), 0.0).expires_at == 30.0
    assert table.expire(1e9) == 0 and len(table) == 0


def test_expired_exchanges_free_their_room() -> None:
    table = ExchangeTable(capacity=1, timeout_s=5.0)
    assert table.open(exchange("xab.1", expires_at=10.0))
    assert not table.open(exchange("xab.2", request_id="r-2", expires_at=20.0))
    assert table.expire(10.0) == 1
    assert table.open(exchange("xab.2", request_id="r-2", expires_at=20.0))
    assert table.claim(region("xab.2", request_id="r-2"), 0.0).exchange_id == "xab.2"


def test_a_region_after_its_time_is_refused_even_before_the_sweep() -> None:
    table = ExchangeTable(capacity=4, timeout_s=5.0)
    table.open(exchange("xab.1", expires_at=10.0))
    table.open(exchange("xab.2", request_id="r-2", expires_at=30.0))
    with pytest.raises(UnknownExchangeError, match="expired"):
        table.claim(region("xab.1"), 10.0)  # at its time is past its time, as in expire()
    assert len(table) == 1, "the expired exchange is dropped on the spot"
    assert table.claim(region("xab.2", request_id="r-2"), 29.9).exchange_id == "xab.2"
