"""The server's top-up on the wire: a plain PatchRequest's offer (``of``), a bitmask over its grid holding
every sent patch and at least one more. Hostile offers are refused with their error class and code, as
for the other fields; a decoder that predates ``of`` skips it.

Everything here is exact (no tolerances): bytes and ints that msgpack carries unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
from protocol_helpers import code_of, make_request, pack, wire

from shared import protocol as P
from shared.bitmask import pack_mask
from shared.errors import BadFieldError, BadMaskError
from shared.wire_fast import request_fields

N = 16  # make_request's 64×64 image in 16-px patches: a 4×4 grid; keep_every=2 keeps 0, 2, …, 14


def offered(**overrides: object) -> P.PatchRequest:
    kw: dict[str, object] = {"offer": np.arange(N)}
    kw.update(overrides)
    return make_request("raw", **kw)


def test_an_offer_round_trips_and_names_the_patches_not_sent() -> None:
    request = offered()
    assert wire(request)["of"] == pack_mask(np.arange(N), N)
    back = P.decode_request(P.encode(request))
    assert back == request and back.offer == request.offer
    np.testing.assert_array_equal(back.offered, np.arange(1, N, 2))
    assert make_request("raw").offered.size == 0 and "of" not in wire(make_request("raw"))


def test_a_request_with_an_offer_leaves_the_fast_path_for_the_validator() -> None:
    fields = dict(offered().__dict__)
    assert request_fields(fields) is False  # the full validator decides (and accepted it above)


@pytest.mark.parametrize(("offer", "message"), [
    (pack_mask(np.arange(1, N, 2), N), "every sent patch"),  # misses the sent ones
    (pack_mask(np.arange(0, N, 2), N), "at least one more"),  # the sent ones and nothing else
    (b"\xff", "expected"),  # one byte for 16 patches
    (b"\xff\xff\x80", "expected"),  # three
])
def test_offers_that_are_not_a_larger_selection_are_refused(offer: bytes, message: str) -> None:
    body = wire(make_request("raw"))
    body["of"] = offer
    assert code_of(pack(body)) == "bad_mask"
    with pytest.raises(BadMaskError, match=message):
        P.decode_request(pack(body))


def test_an_offer_of_the_wrong_type_is_refused() -> None:
    body = wire(make_request("raw"))
    body["of"] = "everything"
    assert code_of(pack(body)) == "bad_field"


def test_only_a_plain_request_offers_more() -> None:
    every = np.arange(N)
    with pytest.raises(BadFieldError, match="plain patch request"):
        make_request("raw", keep_every=1, downscale=2, offer=every)  # a glance keeps every patch already
    with pytest.raises(BadFieldError, match="plain patch request"):
        make_request("raw", exchange="xa1b2c3.7", offer=every)


def test_a_decoder_that_predates_the_offer_skips_it(monkeypatch: pytest.MonkeyPatch) -> None:
    request = offered()
    body = wire(request)
    assert "of" in body
    old = {k: v for k, v in P.PatchRequest.WIRE.items() if k != "offer"}
    monkeypatch.setattr(P.PatchRequest, "WIRE", old)
    back = P.decode_request(pack(body))
    assert back.offer is None and back.mask == request.mask and back.payload == request.payload
