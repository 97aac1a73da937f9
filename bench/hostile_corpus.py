"""Hostile request messages for a worker pool: a corpus of many kinds and a raw sender.

    .venv/bin/python bench/hostile_corpus.py --broker 127.0.0.1:1883 --model cifar10-server --count 10000

Each :class:`HostileMessage` is one MQTT PUBLISH a buggy or compromised device could send on its own
request topic: wildcard, empty, missing or another device's response topic (the latter with the
other device's request id: an attempt to steer an answer into its pending request), oversized
correlation data or user properties, request ids that are not the sender's, and broken payloads of
every kind the protocol refuses. ``expect`` is the error code a worker counts for it
(``errors_by_code``); every kind but ``expired`` also gets an ErrorReply, on the sender's own reply
topic or, without a response topic, on the worker's errors topic.

The sender is a plain paho client (MQTT v5, QoS 1, paced), so that nothing of PatchCast's own client
stands between the corpus and the broker; ``mosquitto_pub`` sends the same properties
(``-D publish response-topic …``). The tests and the fault runs import this module.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.protocol import build_request, encode
from shared.topics import V1, Topics

OWN = "<own reply topic>"  # placeholder for the sender's own reply topic (an invalid topic itself: spaces, <>)


@dataclass(frozen=True)
class HostileMessage:
    kind: str
    topic: str
    payload: bytes
    expect: str  # the error code the worker counts for it
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Geometry:
    """The model's input, so that well-formed payloads are otherwise valid: ``img`` pixels square in
    ``patch``-pixel patches."""

    img: int = 32
    patch: int = 4


class Corpus:
    """Hostile messages from ``device`` (the sender: it publishes on its own request topic, which an
    ACL may pin it to) against ``model``'s pool; ``victim`` is the device whose replies it tries to
    steer or whose request ids it names."""

    def __init__(self, *, model: str, device: str, victim: str, geometry: Geometry = Geometry(),
                 topics: Topics = V1, worker_id: str | None = None, seed: int = 0) -> None:
        self.model, self.device, self.victim = model, device, victim
        self.geometry = geometry
        self.topics = topics
        self.worker_id = worker_id  # adds the region-topic kinds (they go to one worker)
        self.rng = np.random.default_rng(seed)
        self.topic = topics.request(model, device)
        self.own_reply = topics.reply(device)
        self._seq = itertools.count()
        g = geometry
        self._pixels = self.rng.integers(0, 256, (g.img, g.img, 3), dtype=np.uint8)
        n = (g.img // g.patch) ** 2
        self._template = msgpack.unpackb(encode(build_request(
            device_id=device, request_id=f"{device}.0", pixels=self._pixels, indices=np.arange(0, n, 3),
            patch_size=g.patch, codec="jpeg-mosaic", topk_ids=[3, 1], topk_probs=[0.5, 0.2], uncertainty=1.0,
            sent_at=time.time())))
        self._builders = {name[len("_k_"):]: getattr(self, name) for name in dir(self) if name.startswith("_k_")}
        if worker_id is None:
            self._builders = {k: v for k, v in self._builders.items() if not k.startswith("region_")}

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(sorted(self._builders))

    def _rid(self, device: str | None = None) -> str:
        return f"{device or self.device}.{next(self._seq):07d}"

    def _payload(self, **fields: object) -> bytes:
        """A request like a real one (fresh sent_at and deadline), ``fields`` replaced (None removes)."""
        now = time.time()
        body = dict(self._template, r=self._rid(), ts=now, dl=now + 30.0)
        for key, value in fields.items():
            if value is None:
                body.pop(key, None)
            else:
                body[key] = value
        return msgpack.packb(body, use_bin_type=True)

    def _msg(self, kind: str, expect: str, payload: bytes | None = None, *, topic: str | None = None,
             response_topic: str | None = OWN, correlation: bytes | None = None,
             user_properties: Sequence[tuple[str, str]] = ()) -> HostileMessage:
        """Defaults: a valid payload, this device's own reply topic, a short correlation id."""
        payload = self._payload() if payload is None else payload
        return HostileMessage(
            kind, topic or self.topic, payload, expect,
            response_topic=self.own_reply if response_topic == OWN else response_topic,
            correlation_data=f"c{next(self._seq)}".encode() if correlation is None else correlation,
            user_properties=tuple(user_properties))

    # ---- the MQTT envelope (valid payloads) ------------------------------------------------------
    def _k_wildcard_reply_topic(self) -> HostileMessage:
        topic = str(self.rng.choice(["x/#", "#", "+", f"{self.own_reply}/#", "patchcast/v1/reply/+"]))
        return self._msg("wildcard_reply_topic", "bad_topic", response_topic=topic)

    def _k_empty_reply_topic(self) -> HostileMessage:
        return self._msg("empty_reply_topic", "bad_topic", response_topic="")

    def _k_no_reply_topic(self) -> HostileMessage:
        return self._msg("no_reply_topic", "bad_topic", response_topic=None)

    def _k_foreign_reply_topic(self) -> HostileMessage:
        # Another device's reply topic and that device's request id: steering an answer into its request.
        victim_id = self._rid(self.victim)
        return self._msg("foreign_reply_topic", "bad_topic", self._payload(r=victim_id),
                         response_topic=self.topics.reply(self.victim), correlation=victim_id.encode())

    def _k_odd_reply_topic(self) -> HostileMessage:
        topic = str(self.rng.choice([f"{self.own_reply}/x", "$SYS/broker", "/" * 50, "a" * 5000,
                                     self.own_reply.upper(), "patchcast/v1/errors/worker/w"]))
        return self._msg("odd_reply_topic", "bad_topic", response_topic=topic)

    def _k_long_correlation(self) -> HostileMessage:
        size = int(self.rng.choice([129, 1000, 65_000]))
        return self._msg("long_correlation", "bad_property", correlation=bytes(self.rng.integers(0, 256, size,
                                                                                              dtype=np.uint8)))

    def _k_many_user_properties(self) -> HostileMessage:
        n = int(self.rng.integers(17, 400))
        return self._msg("many_user_properties", "bad_property", user_properties=[(f"k{i}", "v") for i in range(n)])

    def _k_huge_user_property(self) -> HostileMessage:
        size = int(self.rng.choice([1100, 20_000, 65_000]))  # an MQTT string holds at most 65,535 bytes
        copies = int(self.rng.integers(1, 8))
        return self._msg("huge_user_property", "bad_property", user_properties=[("k", "v" * size)] * copies)

    # ---- ownership -------------------------------------------------------------------------------
    def _k_foreign_request_id(self) -> HostileMessage:
        return self._msg("foreign_request_id", "foreign_id", self._payload(r=self._rid(self.victim)))

    def _k_unprefixed_request_id(self) -> HostileMessage:
        rid = str(self.rng.choice([f"r{next(self._seq)}", self.device, f"{self.device}x.1", f"{self.device}."]))
        return self._msg("unprefixed_request_id", "foreign_id", self._payload(r=rid))

    def _k_foreign_device_field(self) -> HostileMessage:
        return self._msg("foreign_device_field", "bad_topic", self._payload(d=self.victim, r=self._rid(self.victim)))

    # ---- payloads --------------------------------------------------------------------------------
    def _k_garbage(self) -> HostileMessage:
        size = int(self.rng.integers(0, 2000))  # 0xc1 is never valid msgpack: whatever follows, malformed
        return self._msg("garbage", "malformed", b"\xc1" + bytes(self.rng.integers(0, 256, size, dtype=np.uint8)))

    def _k_not_a_map(self) -> HostileMessage:
        return self._msg("not_a_map", "malformed", msgpack.packb([1, 2, 3]))

    def _k_ext_type(self) -> HostileMessage:
        return self._msg("ext_type", "malformed", msgpack.packb({"v": 1, "t": "req", "r": msgpack.ExtType(5, b"x")}))

    def _k_bad_version(self) -> HostileMessage:
        return self._msg("bad_version", "bad_version", self._payload(v=int(self.rng.integers(2, 1000))))

    def _k_bad_field(self) -> HostileMessage:
        key, value = [("h", "32"), ("ts", float("nan")), ("k", [True]), ("u", None), ("y", -1)][
            int(self.rng.integers(0, 5))]
        return self._msg("bad_field", "malformed" if value is None else "bad_field", self._payload(**{key: value}))

    def _k_bad_mask(self) -> HostileMessage:
        n = (self.geometry.img // self.geometry.patch) ** 2
        mask = [b"\xff" * 3, b"\x00" * ((n + 7) // 8), b"\xff" * ((n + 7) // 8 + 1)][int(self.rng.integers(0, 3))]
        return self._msg("bad_mask", "bad_mask", self._payload(m=mask))

    def _k_unknown_codec(self) -> HostileMessage:
        return self._msg("unknown_codec", "unknown_codec", self._payload(c="gif"))

    def _k_bad_geometry(self) -> HostileMessage:
        g = self.geometry
        side = g.img * 2
        return self._msg("bad_geometry", "bad_geometry", self._payload(
            h=side, w=side, g=[side // g.patch] * 2, m=b"\x80" + b"\x00" * (((side // g.patch) ** 2 + 7) // 8 - 1)))

    def _k_too_large(self) -> HostileMessage:
        return self._msg("too_large", "too_large", self._payload(k=list(range(2000)), kp=[0.0] * 2000))

    def _k_bad_payload(self) -> HostileMessage:
        return self._msg("bad_payload", "bad_payload", self._payload(x=bytes(self.rng.integers(
            0, 256, int(self.rng.integers(1, 500)), dtype=np.uint8))))

    def _k_expired(self) -> HostileMessage:
        now = time.time()
        return self._msg("expired", "expired", self._payload(ts=now - 60.0, dl=now - 30.0))

    # ---- region topics (need the worker id) --------------------------------------------------------
    def _k_region_without_exchange(self) -> HostileMessage:
        assert self.worker_id is not None
        return self._msg("region_without_exchange", "bad_topic",
                         topic=self.topics.region(self.worker_id, self.device))

    def _k_region_unknown_exchange(self) -> HostileMessage:
        assert self.worker_id is not None
        return self._msg("region_unknown_exchange", "no_exchange", self._payload(ex=f"x{next(self._seq)}"),
                         topic=self.topics.region(self.worker_id, self.device))

    # ---- the corpus ------------------------------------------------------------------------------
    def make(self, kind: str) -> HostileMessage:
        return self._builders[kind]()

    def messages(self, count: int) -> Iterator[HostileMessage]:
        """``count`` messages, every kind in turn (shuffled per round)."""
        kinds = list(self.kinds)
        made = 0
        while made < count:
            for i in self.rng.permutation(len(kinds)):
                if made == count:
                    return
                yield self.make(kinds[int(i)])
                made += 1


def expected_counts(messages: Iterable[HostileMessage]) -> collections.Counter[str]:
    return collections.Counter(m.expect for m in messages)


def send(messages: Iterable[HostileMessage], host: str, port: int, *, client_id: str, rate_hz: float = 1000.0,
         username: str | None = None, password: str | None = None, timeout_s: float = 60.0) -> int:
    """Publish ``messages`` with a raw paho client (MQTT v5, QoS 1, at most ``rate_hz`` a second) and
    wait for every PUBACK; returns how many were acknowledged."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if username:
        client.username_pw_set(username, password)
    client.max_inflight_messages_set(50)
    client.max_queued_messages_set(0)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    infos = []
    try:
        start = time.monotonic()
        for i, m in enumerate(messages):
            due = start + i / rate_hz
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            props = Properties(PacketTypes.PUBLISH)
            if m.response_topic is not None:
                props.ResponseTopic = m.response_topic
            if m.correlation_data is not None:
                props.CorrelationData = m.correlation_data
            if m.user_properties:
                props.UserProperty = list(m.user_properties)
            infos.append(client.publish(m.topic, m.payload, qos=1, properties=props))
        deadline = time.monotonic() + timeout_s
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        return sum(info.is_published() for info in infos)
    finally:
        client.loop_stop()
        client.disconnect()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT")
    ap.add_argument("--model", default="cifar10-server", help="model id of the pool (request topics)")
    ap.add_argument("--device", default="evil-0000", help="the sending device")
    ap.add_argument("--victim", default="cam-0000", help="the device it tries to steer replies into")
    ap.add_argument("--worker-id", help="also send region-topic kinds to this worker")
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=1000.0, help="messages per second")
    args = ap.parse_args(argv)
    host, _, port = args.broker.rpartition(":")
    corpus = Corpus(model=args.model, device=args.device, victim=args.victim, worker_id=args.worker_id,
                    geometry=Geometry(args.img, args.patch))
    messages = list(corpus.messages(args.count))
    acked = send(messages, host or "127.0.0.1", int(port), client_id=args.device, rate_hz=args.rate)
    print(f"sent {acked}/{len(messages)}; the worker should count: {dict(sorted(expected_counts(messages).items()))}")
    return 0 if acked == len(messages) else 1


if __name__ == "__main__":
    raise SystemExit(main())
