"""Each rule the worker applies to a request's MQTT fields and ids, the admission estimate, and the
containment of a failure while publishing a reply (units: no broker)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from service_helpers import IMG, PATCH, async_test, service_config
from waiting import wait_until_async

from inference_worker.batcher import Batcher, ServiceEstimate
from inference_worker.service import InferenceWorker
from inference_worker.work import OutboxEntry
from shared.config import BatchingConfig
from shared.errors import BadPropertyError, BadTopicError, BusyError, ForeignIdError, PatchCastError
from shared.models import build_model
from shared.protocol import (
    DEFAULT_LIMITS,
    ErrorReply,
    build_request,
    check_properties,
    check_request_owner,
    check_response_topic,
)
from shared.topics import V1

OWN = V1.reply("cam-0001")


@pytest.mark.parametrize("topic", [None, "", "#", "+", "x/#", f"{OWN}/#", "patchcast/v1/reply/+",
                                   V1.reply("cam-0002"), f"{OWN}/x", OWN.upper(), " " + OWN])
def test_a_response_topic_other_than_the_devices_own_is_refused(topic: str | None) -> None:
    with pytest.raises(BadTopicError):
        check_response_topic(topic, OWN)


def test_the_devices_own_reply_topic_is_accepted() -> None:
    check_response_topic(OWN, OWN)


def test_an_untrusted_topic_in_the_error_message_is_escaped_and_cut() -> None:
    with pytest.raises(BadTopicError) as info:
        check_response_topic("evil\n\x1b[2J" + "a" * 5000, OWN)
    assert "\n" not in info.value.message and "\x1b" not in info.value.message and len(info.value.message) < 300


def test_correlation_data_is_bounded() -> None:
    limit = DEFAULT_LIMITS.max_correlation_bytes
    check_properties(None, ())
    check_properties(b"", ())
    check_properties(b"x" * limit, ())
    with pytest.raises(BadPropertyError):
        check_properties(b"x" * (limit + 1), ())


def test_user_properties_are_bounded_in_number_and_size() -> None:
    n, chars = DEFAULT_LIMITS.max_user_properties, DEFAULT_LIMITS.max_user_property_chars
    check_properties(None, [("k", "v")] * n)
    check_properties(None, [("k", "v" * (chars - 1))])
    with pytest.raises(BadPropertyError):
        check_properties(None, [("k", "v")] * (n + 1))
    with pytest.raises(BadPropertyError):
        check_properties(None, [("k", "v" * chars)])


def request(device: str, request_id: str):
    pixels = np.zeros((IMG, IMG, 3), dtype=np.uint8)
    return build_request(device_id=device, request_id=request_id, pixels=pixels, indices=[0, 5], patch_size=PATCH,
                         codec="raw", sent_at=1.0)


@pytest.mark.parametrize("request_id", ["cam-0002.000777", "cam-0001", "cam-0001.", "cam-00011.000001",
                                        "r000001", "cam-000.000001"])
def test_a_device_names_only_its_own_request_ids(request_id: str) -> None:
    with pytest.raises(ForeignIdError):
        check_request_owner(request("cam-0001", request_id), "cam-0001")


def test_own_request_ids_pass_and_the_payloads_device_must_be_the_topics() -> None:
    check_request_owner(request("cam-0001", "cam-0001.000777"), "cam-0001")
    check_request_owner(request("cam-0001", "cam-0001.000777.r1"), "cam-0001")  # a retry's id
    with pytest.raises(BadTopicError):
        check_request_owner(request("cam-0002", "cam-0002.000777"), "cam-0001")


# ---- the admission estimate ------------------------------------------------------------------------


def test_the_estimate_fits_fixed_plus_per_token_time() -> None:
    est = ServiceEstimate(alpha=0.2)
    assert est.coefficients() is None and est.batch_s(100) == 0.0
    for tokens in [100, 400, 200, 800, 50, 600] * 5:
        est.add(tokens, 0.010 + 0.0001 * tokens)
    fixed, per_token = est.coefficients()  # type: ignore[misc]
    assert fixed == pytest.approx(0.010, rel=1e-6) and per_token == pytest.approx(0.0001, rel=1e-6)
    assert est.batch_s(1000) == pytest.approx(0.110)


def test_the_estimate_is_a_ratio_while_batches_do_not_differ() -> None:
    est = ServiceEstimate()
    est.add(100, 0.02)
    est.add(100, 0.02)
    assert est.coefficients() == (0.0, pytest.approx(0.0002))
    est.add(0, 1.0)  # nonsense is ignored
    est.add(10, float("nan"))
    assert est.batches == 2


def slow_batcher(run_s: float, capacity: int = 100) -> tuple[Batcher[int, int], list[list[int]]]:
    ran: list[list[int]] = []

    def run(items: Sequence[int]) -> list[int | PatchCastError]:
        ran.append(list(items))
        time.sleep(run_s)  # not a wait: a model that takes run_s per batch
        return list(items)

    limits = BatchingConfig(max_batch=2, max_tokens=10_000, max_delay_ms=0.0)
    return Batcher(run, limits, capacity=capacity, executor=ThreadPoolExecutor(1), admission=True), ran


@async_test(20)
async def test_admission_refuses_what_the_queue_ahead_cannot_finish_in_time() -> None:
    batcher, ran = slow_batcher(0.05)
    task = asyncio.create_task(batcher.run())
    # Before any batch has run there is nothing to go by: everything is admitted.
    await asyncio.wait_for(batcher.submit_nowait(0, 10, deadline=time.monotonic() + 0.001), 5)
    await asyncio.wait_for(batcher.submit_nowait(1, 10, deadline=time.monotonic() + 5), 5)
    # ~50 ms a batch of two: 10 queued requests are ~250 ms of work.
    queued = [batcher.submit_nowait(i, 10) for i in range(10)]
    with pytest.raises(BusyError, match="deadline cannot be met"):
        batcher.submit_nowait(99, 10, deadline=time.monotonic() + 0.1)
    late_ok = batcher.submit_nowait(100, 10, deadline=time.monotonic() + 2.0)
    assert await asyncio.wait_for(late_ok, 5) == 100
    await asyncio.wait_for(asyncio.gather(*queued), 5)
    assert 99 not in [i for batch in ran for i in batch]
    task.cancel()


@async_test(20)
async def test_a_request_whose_deadline_passes_while_queued_is_never_run() -> None:
    batcher, ran = slow_batcher(0.2)
    batcher.admission = False
    task = asyncio.create_task(batcher.run())
    first = [batcher.submit_nowait(i, 10) for i in range(2)]  # one batch of 200 ms
    await wait_until_async(lambda: ran, 5, 0.005, message="the first batch running")
    doomed = batcher.submit_nowait(7, 10, deadline=time.monotonic() + 0.05)
    with pytest.raises(PatchCastError) as info:
        await asyncio.wait_for(doomed, 5)
    assert info.value.code == "expired"
    await asyncio.wait_for(asyncio.gather(*first), 5)
    assert ran == [[0, 1]]
    assert batcher.completion_estimate(10) >= time.monotonic()
    task.cancel()


# ---- containment -----------------------------------------------------------------------------------


@async_test(60)
async def test_a_reply_that_cannot_be_published_is_counted_and_nothing_else(model_files, image_folder) -> None:
    edge_path, server_path = model_files
    cfg = service_config(1883, edge_path, server_path, image_folder)
    worker = InferenceWorker(cfg, build_model(cfg.models.server, role="server"), worker_id="contain-w")
    raised: list[type[BaseException]] = []

    async def publish(*args: object, **kwargs: object) -> None:
        error = [ValueError("Publish topic cannot contain wildcards."), RuntimeError("x"), KeyError("y")][len(raised)]
        raised.append(type(error))
        raise error

    worker.transport.publish = publish  # type: ignore[assignment]  # a publish that fails, three ways
    reply = ErrorReply("cam-0001.000001", "busy", "queue full", "contain-w")
    try:
        # Not connected: publish_nowait cannot start them, so each waits in its own task and fails there.
        async with asyncio.TaskGroup() as tg:
            for _ in range(3):
                await worker._publish_slots.acquire()
                worker._sending += 1
                worker._send(OutboxEntry(OWN, b"c", reply), tg)
        # Started at once, then no PUBACK in time: the callback counts it.
        timed_out: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def started(*args: object, on_done: Callable[[asyncio.Future[int]], None],
                    **kwargs: object) -> asyncio.Future[int]:
            timed_out.add_done_callback(on_done)  # as Transport.publish_nowait runs it once the publish ends
            return timed_out

        worker.transport.publish_nowait = started  # type: ignore[method-assign,assignment]
        await worker._publish_slots.acquire()
        worker._sending += 1
        worker._send(OutboxEntry(OWN, b"c", reply), tg)
        timed_out.set_exception(TimeoutError())
        await wait_until_async(lambda: worker._sending == 0, 5, 0.01, message="the failed acknowledgement handled")
    finally:
        worker._infer_pool.shutdown(wait=True)
        worker._decode_pool.shutdown(wait=True)
        worker.engine.close()
    assert raised == [ValueError, RuntimeError, KeyError]
    assert worker.stats.errors_by_code == {"reply_failed": 4}
    assert worker._sending == 0 and worker._sent_all.is_set()
