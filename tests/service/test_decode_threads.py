"""The worker's pixel decoders (inference_worker.decoders): decoder threads (a future per submit, the
decoder's error in its own future, pending work cancelled at shutdown, nothing accepted after it) and
the decode in the batch (a deferred decode, run once on the thread that asks for it); which one the
config picks."""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import CancelledError

import pytest

from inference_worker.decoders import DecodeInBatch, DecodeThreads, new_decoder
from shared.config import WorkerConfig, load_config
from shared.errors import BadPayloadError, ConfigError


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


def test_the_default_decodes_in_the_batch_on_a_cpu_and_in_a_thread_on_cuda() -> None:
    assert WorkerConfig().decode_threads == "auto"
    assert WorkerConfig().decoder_threads == 0 and isinstance(new_decoder(WorkerConfig()), DecodeInBatch)
    assert WorkerConfig(device="cuda").decoder_threads == 1
    assert WorkerConfig(device="cuda:1", decode_threads=0).decoder_threads == 0
    assert WorkerConfig(decode_threads=3).decoder_threads == 3
    with pytest.raises(ConfigError, match="decode_threads"):
        WorkerConfig(decode_threads=-1)


def test_a_config_file_and_the_environment_set_decode_threads() -> None:
    assert load_config(environ={"PATCHCAST_WORKER__DECODE_THREADS": "2"}).worker.decoder_threads == 2
    assert load_config(environ={"PATCHCAST_WORKER__DECODE_THREADS": "auto"}).worker.decoder_threads == 0
    with pytest.raises(ConfigError, match="decode_threads"):
        load_config(environ={"PATCHCAST_WORKER__DECODE_THREADS": "many"})


def test_in_the_batch_a_decode_runs_once_on_the_thread_that_asks() -> None:
    pool = DecodeInBatch()
    calls: list[str] = []

    def decode(x: int) -> int:
        calls.append(threading.current_thread().name)
        if x == 3:
            raise BadPayloadError("payload does not decode")
        return x * 10

    pending = [pool.submit(decode, x) for x in range(5)]
    assert calls == []  # nothing decodes at submit (the event loop's side)
    asker = threading.Thread(target=lambda: [p.result() if p is not pending[3] else None for p in pending],
                             name="inference")
    asker.start()
    asker.join(5)
    assert calls == ["inference"] * 4
    assert [p.result() for p in pending if p is not pending[3]] == [0, 10, 20, 40]  # kept: not decoded again
    for _ in range(2):  # its own error, every time it is asked, decoded once
        with pytest.raises(BadPayloadError):
            pending[3].result()
    assert calls.count("MainThread") == 1
    assert not pending[0].cancel()  # decoded already
    later = pool.submit(decode, 7)
    assert later.cancel()  # a busy worker refuses the request before its pixels are decoded
    with pytest.raises(CancelledError):
        later.result()
    assert len(calls) == 5 and "pending" not in repr(later) and "cancelled" in repr(later)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(decode, 1)


def test_a_deferred_decode_lets_go_of_its_request_once_done() -> None:
    class Request:
        pass

    request = Request()
    ref = weakref.ref(request)
    pending = DecodeInBatch().submit(lambda r: 1, request)
    del request
    assert ref() is not None  # held until decoded
    assert pending.result() == 1
    assert ref() is None
