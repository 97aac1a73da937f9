"""The worker's decoder threads (inference_worker.decoders.DecodeThreads): a future per submit, the
decoder's error in its own future, pending work cancelled at shutdown, nothing accepted after it."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest

from inference_worker.decoders import DecodeThreads, new_decoder
from shared.config import WorkerConfig
from shared.errors import BadPayloadError


def test_each_submit_gets_its_result_or_its_own_error() -> None:
    pool = DecodeThreads(2)
    try:
        def decode(x: int, *, scale: int = 1) -> int:
            if x == 3:
                raise BadPayloadError("payload does not decode")
            return x * scale

        futures = [pool.submit(decode, x, scale=10) for x in range(6)]
        assert [f.result(timeout=5) for f in futures if f is not futures[3]] == [0, 10, 20, 40, 50]
        with pytest.raises(BadPayloadError):
            futures[3].result(timeout=5)
        assert {t.name for t in threading.enumerate()} >= {"decode_0", "decode_1"}
    finally:
        pool.shutdown()
    assert not any(t.name.startswith("decode_") and t.is_alive() for t in threading.enumerate())


def test_shutdown_cancels_what_waits_and_refuses_new_work() -> None:
    pool = DecodeThreads(1)
    started, release = threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return release.wait(5)

    busy = pool.submit(hold)
    assert started.wait(5)
    waiting = [pool.submit(int, "7") for _ in range(3)]
    pool.shutdown(wait=False, cancel_futures=True)
    release.set()
    assert busy.result(timeout=5) is True  # the running one finishes
    for future in waiting:
        with pytest.raises(CancelledError):
            future.result(timeout=5)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(int, "1")


def test_a_cancelled_request_is_not_decoded() -> None:
    pool = DecodeThreads(1)
    release = threading.Event()
    ran: list[int] = []
    try:
        pool.submit(release.wait, 5)
        later = pool.submit(ran.append, 1)
        assert later.cancel()  # a busy worker refuses the request before its pixels are decoded
        marker = pool.submit(ran.append, 2)
        release.set()
        marker.result(timeout=5)
        assert ran == [2]
    finally:
        pool.shutdown()


def test_the_worker_config_picks_threads_or_processes() -> None:
    pool = new_decoder(WorkerConfig(decode_threads=2))
    try:
        assert isinstance(pool, DecodeThreads) and pool.submit(sum, [1, 2]).result(timeout=5) == 3
    finally:
        pool.shutdown()
    with pytest.raises(ValueError):
        DecodeThreads(0)
