"""MQTT v5 transport: a reconnecting client identity over :mod:`shared.mqtt_client` (one connection)
and :mod:`shared.mqtt_packets` (the wire format), and :func:`mqtt_ping`, a broker's readiness probe.

One :class:`Transport` per MQTT client identity (one per worker process, one per simulated
device). Its :meth:`Transport.run` coroutine owns the connection: connect under a timeout,
re-subscribe, publish the "birth" messages (retained availability), deliver messages to a
synchronous handler, and on any loss reconnect with jittered exponential backoff. Services run it
as a named task in their TaskGroup and call :meth:`publish` / :meth:`subscribe` from anywhere on
the same event loop.

Rules it enforces (see the measurements notes):

* TCP_NODELAY on the client socket (the broker sets it too): no 40 ms delayed-ACK stalls.
* At most ``max_in_flight`` publishes awaiting their PUBACK (:class:`Slots`), and never more than the
  broker's Receive Maximum.
* Every publish/subscribe under ``asyncio.timeout(publish_timeout_s)``.
* The broker's maximum packet size is checked *before* publishing: an over-size publish would
  make the broker drop the whole connection. It raises :class:`TransportError` code ``too_large``.
* Socket and protocol errors never leak: they become :class:`TransportError` (``raise … from``).
* A broker's refusal is an error, never a timeout: a failure reason code in CONNACK, SUBACK or
  PUBACK raises :class:`RefusedError` (``not_authorized``, ``bad_credentials``, ``bad_client_id``,
  ``refused``), logged and counted in :class:`TransportStats`; a failed TLS handshake (wrong CA,
  host name, refused client certificate, TLS against a plain listener) raises :class:`TLSError`.
  Neither is retried: :meth:`Transport.run` raises it, and :meth:`Transport.wait_connected` and
  :meth:`Transport.publish` raise it at once instead of waiting out their timeouts.
* TLS and mutual TLS from ``broker.tls*`` (:func:`tls_context`); the broker's certificate chain is
  always verified, its host name unless ``tls_verify_hostname`` is off.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import random
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from shared import mqtt_packets as mp
from shared.config import BrokerConfig
from shared.errors import ConfigError, RefusedError, TLSError, TransportError
from shared.logs import get_logger
from shared.mqtt_client import Connection, ConnectionLost
from shared.mqtt_packets import Incoming, Outgoing, PublishProperties

__all__ = ["NO_SUBSCRIBERS", "Incoming", "MessageHandler", "Outgoing", "PublishProperties", "Transport",
           "TransportStats", "login_as", "mqtt_ping", "publish_packet_size", "publish_properties",
           "read_credentials", "refusal", "tls_context"]

DEFAULT_MAX_IN_FLIGHT = 10  # publishes awaiting their PUBACK at once, per client
_FAILURE = 0x80  # MQTT v5 reason codes ≥ 0x80 are failures (e.g. 0x87 not authorised)
NO_SUBSCRIBERS = 0x10  # PUBACK "no matching subscribers": accepted, and delivered to nobody
# Reason codes → RefusedError codes (MQTT v5 §2.4); any other failure code is "refused".
_REFUSAL_CODES = {0x85: "bad_client_id", 0x86: "bad_credentials", 0x87: "not_authorized", 0x8A: "not_authorized",
                  0x8C: "bad_credentials"}
# An OpenSSL verdict in a connect error's text: the handshake failed, retrying cannot help.
_TLS_FAILURES = ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "ALERT", "NO_CERTIFICATE",
                 "certificate required", "unknown ca", "bad certificate")


def refusal(reason_code: int, what: str) -> RefusedError:
    """The :class:`RefusedError` for a failure reason code (``what``: the refused call, for the message)."""
    code = _REFUSAL_CODES.get(reason_code, "refused")
    return RefusedError(f"{what}: refused by the broker, reason code 0x{reason_code:02X} "
                        f"({mp.reason_name(reason_code)})", reason_code=reason_code, code=code)


def tls_context(cfg: BrokerConfig) -> ssl.SSLContext | None:
    """The client's TLS context from ``broker.tls*`` (``None`` when TLS is off).

    The broker's chain is verified against ``tls_ca_file`` (or the system CAs); TLS 1.2 at least;
    ``tls_cert_file``/``tls_key_file`` present a client certificate (mutual TLS). Unreadable or
    invalid files raise :class:`ConfigError` naming the file, before any connection is tried.
    """
    if not cfg.tls:
        return None
    for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        path = getattr(cfg, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"broker.{name} {path!r}: no such file")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.tls_ca_file or None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"broker.tls_ca_file {cfg.tls_ca_file!r} is not a PEM CA certificate: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = cfg.tls_verify_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cfg.tls_cert_file:
        try:
            ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file or None)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"broker.tls_cert_file {cfg.tls_cert_file!r} / tls_key_file {cfg.tls_key_file!r}: "
                              f"not a matching PEM certificate and key: {exc}") from exc
    return ctx


def read_credentials(path: str | Path) -> dict[str, str]:
    """``user password`` lines (``#`` comments, blank lines allowed), as ``patchcast broker
    add-device --credentials-out`` writes them: each simulated device's own login."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"credentials file {path}: {exc.strerror or exc}") from exc
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"credentials file {path}, line {n}: expected 'USER PASSWORD'")
        out[parts[0]] = parts[1]
    return out


def login_as(cfg: BrokerConfig, user: str, credentials: dict[str, str] | None) -> BrokerConfig:
    """``cfg`` logging in as ``user`` with its password from ``credentials`` (``cfg`` itself when
    ``credentials`` is ``None``); :class:`ConfigError` when the file has no line for ``user``."""
    if credentials is None:
        return cfg
    if user not in credentials:
        raise ConfigError(f"no credentials for {user!r} in the credentials file (patchcast broker add-device)")
    return replace(cfg, username=user, password=credentials[user])


MessageHandler = Callable[[Incoming], None]


def publish_packet_size(topic: str, payload: bytes, qos: int, properties: PublishProperties | None) -> int:
    """Exact size in bytes of the MQTT v5 PUBLISH packet this client sends."""
    return mp.publish_size(topic, len(payload), qos, properties.packed if properties is not None else mp.NO_PROPERTIES)


def publish_properties(*, response_topic: str | None = None, correlation_data: bytes | None = None,
                       expiry_s: float | None = None,
                       user_properties: Sequence[tuple[str, str]] = ()) -> PublishProperties | None:
    """PUBLISH properties for request/reply: response topic, correlation data, message expiry."""
    if response_topic is None and correlation_data is None and expiry_s is None and not user_properties:
        return None
    return PublishProperties(response_topic=response_topic, correlation_data=correlation_data,
                             expiry_s=_expiry_interval(expiry_s), user_properties=tuple(user_properties))


def _expiry_interval(expiry_s: float | None) -> int | None:
    # The interval is whole seconds on the wire; round up so a short deadline never becomes 0
    # (0 would not mean "expired", it is still a valid interval that expires at once).
    return None if expiry_s is None else max(1, int(-(-expiry_s // 1)))


class Slots:
    """A counting semaphore that can also be taken without awaiting (:meth:`try_take`), for
    :meth:`Transport.publish_nowait`. A slot given back passes straight to the oldest waiter."""

    def __init__(self, count: int) -> None:
        self.free = count
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def try_take(self) -> bool:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.try_take():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a slot, then cancelled: pass it on
                self.give()
            raise

    def give(self, _: object = None) -> None:
        """Give one slot back (usable as a future's done callback)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


@dataclass
class TransportStats:
    connects: int = 0
    disconnects: int = 0
    published: int = 0
    publish_failures: int = 0
    received: int = 0
    handler_errors: int = 0
    refusals: Counter[str] = field(default_factory=Counter)  # RefusedError/TLSError code → count


class Transport:
    """A long-lived MQTT v5 client identity with automatic reconnection.

    ``handler`` is called on the event loop for every message; it must be quick (validate and
    enqueue) and must not raise — exceptions are logged and counted, never stop the connection.
    """

    def __init__(self, config: BrokerConfig, *, client_id: str, handler: MessageHandler | None = None,
                 will: Outgoing | None = None, birth: Sequence[Outgoing] = (),
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 log_context: dict[str, str] | None = None) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be ≥ 1")
        self.config = config
        self.client_id = client_id
        self.handler = handler
        self.will = will
        self.birth = tuple(birth)
        self.stats = TransportStats()
        self._subscriptions: dict[str, int] = {}
        self._client: Connection | None = None
        self._tls = tls_context(config)  # ConfigError now for unreadable CA/certificate/key files
        self._failure: TransportError | None = None  # a refusal or TLS failure: final
        self._failed = asyncio.Event()
        self._connected = asyncio.Event()
        self._in_flight = Slots(max_in_flight)
        self._closing = False
        self._log = get_logger("patchcast.transport", client_id=client_id, **(log_context or {}))

    # ---- state -------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set() and self._client is not None

    @property
    def failure(self) -> TransportError | None:
        """The refusal or TLS failure that ended :meth:`run`, if any."""
        return self._failure

    @property
    def _where(self) -> str:
        return f"{'mqtts' if self._tls else 'mqtt'}://{self.config.host}:{self.config.port}"

    async def _until_connected(self) -> None:
        """Until connected; the final failure (refusal, TLS) as soon as there is one."""
        while not self._connected.is_set():
            if self._failure is not None:
                raise self._failure
            waiters = [asyncio.ensure_future(self._connected.wait()), asyncio.ensure_future(self._failed.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
        if self._failure is not None:
            raise self._failure

    async def wait_connected(self, wait_s: float | None = None) -> None:
        """Wait until connected (default: up to ``connect_timeout_s``; ``math.inf``: forever).
        :class:`RefusedError`/:class:`TLSError` at once when the broker refused this client,
        :class:`TransportError` code ``timeout`` when nothing answered in time."""
        limit = self.config.connect_timeout_s if wait_s is None else wait_s
        try:
            async with asyncio.timeout(None if limit == math.inf else limit):
                await self._until_connected()
        except TimeoutError as exc:
            raise TransportError(f"no connection to {self._where} (client {self.client_id})",
                                 code="timeout") from exc

    def _fail(self, exc: TransportError) -> TransportError:
        """Record a final failure: logged once, counted, and raised by every waiting call."""
        self._failure = exc
        self._failed.set()
        self.stats.refusals[exc.code] += 1
        self._log.error("mqtt_refused", broker=self._where, code=exc.code, error=exc.message)
        return exc

    def _connect_failure(self, exc: BaseException) -> TransportError | None:
        """A final failure for this connect error (refused, TLS), or ``None`` when worth retrying."""
        if isinstance(exc, RefusedError):
            return exc
        cause = exc.__cause__ if isinstance(exc, ConnectionLost) else None
        text = " ".join(str(e) for e in (exc, cause) if e is not None and str(e)) or type(exc).__name__
        tls_verdict = isinstance(exc, ssl.SSLError) or isinstance(cause, ssl.SSLError)
        if self._tls and (tls_verdict or any(marker.lower() in text.lower() for marker in _TLS_FAILURES)):
            return TLSError(f"TLS handshake with {self._where} failed: {text} (check broker.tls_ca_file, "
                            f"the certificate's host names, and the client certificate if the listener "
                            f"requires one)")
        if not self._tls and isinstance(exc, ConnectionLost) and exc.before_connack:
            # Either a TLS listener (set broker.tls) or a broker out of connections: the bytes do not tell.
            return TransportError(f"{self._where} closed the connection before answering CONNECT: a TLS listener "
                                  f"(set broker.tls = true and broker.tls_ca_file), or a broker at its connection "
                                  f"limit (its file descriptors, max_connections)?", code="closed_before_connack")
        return None

    # ---- connection loop ---------------------------------------------------------------------
    def _connect_packet(self) -> bytes:
        cfg = self.config
        return mp.connect_packet(self.client_id, keepalive_s=cfg.keepalive_s, username=cfg.username or None,
                                 password=cfg.password or None, will=self.will)

    async def _open(self) -> Connection:
        """One connection, up to its CONNACK; :class:`RefusedError` for a failure reason code."""
        cfg = self.config
        conn = Connection(handler=self._on_message, max_packet_bytes=cfg.max_packet_bytes)
        conn.on_handler_error = self._handler_failed
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                connack = await conn.open(cfg.host, cfg.port, self._connect_packet(), keepalive_s=cfg.keepalive_s,
                                          tls=self._tls, tls_timeout_s=cfg.connect_timeout_s)
        except BaseException:
            conn.drop()
            raise
        if connack.reason_code >= _FAILURE:
            conn.drop()
            who = f" user {cfg.username!r}" if cfg.username else " (anonymous)"
            raise refusal(connack.reason_code, f"connect as client {self.client_id!r}{who}")
        return conn

    def _on_message(self, message: Incoming) -> None:
        self.stats.received += 1
        if self.handler is not None:
            self.handler(message)

    def _handler_failed(self, message: Incoming, exc: BaseException) -> None:
        self.stats.handler_errors += 1
        self._log.error("mqtt_handler_failed", topic=message.topic, error=repr(exc), exc_info=exc)

    def backoff_delay(self, failures: int) -> float:
        """Jittered exponential backoff: ``min·2^failures`` capped at max, times U(0.5, 1)."""
        base = min(self.config.reconnect_max_s, self.config.reconnect_min_s * (2 ** min(failures, 30)))
        return base * random.uniform(0.5, 1.0)

    async def run(self) -> None:
        """Connect and stay connected until cancelled (or :meth:`close`).

        Raises :class:`RefusedError` when the broker refuses the CONNECT or a subscription (bad
        credentials, a client id this user may not take, an ACL) and :class:`TLSError` when the TLS
        handshake fails: reconnecting cannot fix those. Anything else is retried with backoff."""
        failures = 0
        while not self._closing:
            try:
                conn = await self._open()
            except (TransportError, TimeoutError, OSError) as exc:
                final = self._connect_failure(exc)
                if final is not None:
                    raise self._fail(final) from exc
                delay = self.backoff_delay(failures)
                failures += 1
                self._log.warning("mqtt_connect_failed", broker=self._where,
                                  error=str(exc) or type(exc).__name__, retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            failures = 0
            try:
                await self._serve(conn)
            except RefusedError as exc:
                self._fail(exc)  # an ACL problem: reconnecting cannot fix it
                raise
            except (TransportError, TimeoutError) as exc:
                self.stats.disconnects += 1
                self._log.warning("mqtt_connection_lost", error=str(exc) or type(exc).__name__)
            finally:
                self._connected.clear()
                self._client = None
                conn.drop(disconnect=True)
            if not self._closing:
                delay = self.backoff_delay(0)
                await asyncio.sleep(delay)

    async def _serve(self, conn: Connection) -> None:
        # Subscribe and announce before anyone may publish through this client.
        for topic_filter, qos in self._subscriptions.items():
            await self._subscribe_on(conn, topic_filter, qos)
        for msg in self.birth:
            async with asyncio.timeout(self.config.publish_timeout_s):
                code = await conn.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            if code >= _FAILURE:
                raise refusal(code, f"publish to {msg.topic}")
        self._client = conn
        self._connected.set()
        self.stats.connects += 1
        self._log.info("mqtt_connected", broker=self._where,
                       subscriptions=list(self._subscriptions))
        await conn.closed  # raises the ConnectionLost that ended it

    # ---- calls -------------------------------------------------------------------------------
    async def _subscribe_on(self, conn: Connection, topic_filter: str, qos: int) -> None:
        try:
            async with asyncio.timeout(self.config.publish_timeout_s):
                codes = await conn.subscribe([(topic_filter, qos)])
        except TimeoutError as exc:
            raise TransportError(f"subscribe {topic_filter!r} timed out", code="timeout") from exc
        for value in codes:
            if value >= _FAILURE:
                raise refusal(value, f"subscribe {topic_filter!r}")

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        self._subscriptions[topic_filter] = qos
        conn = self._client
        if conn is not None:
            try:
                await self._subscribe_on(conn, topic_filter, qos)
            except RefusedError as exc:
                self._subscriptions.pop(topic_filter, None)  # never retried: it would fail again
                self.stats.refusals[exc.code] += 1
                self._log.error("mqtt_refused", broker=self._where, code=exc.code, error=exc.message)
                raise

    async def unsubscribe(self, topic_filter: str) -> None:
        """Stop receiving ``topic_filter`` (also after reconnects)."""
        self._subscriptions.pop(topic_filter, None)
        conn = self._client
        if conn is None:
            return
        try:
            async with asyncio.timeout(self.config.publish_timeout_s):
                await conn.unsubscribe([topic_filter])
        except TimeoutError as exc:
            raise TransportError(f"unsubscribe {topic_filter!r} timed out", code="timeout") from exc

    def _check_packet(self, topic: str, size: int) -> int:
        conn = self._client
        limit = self.config.max_packet_bytes if conn is None else min(self.config.max_packet_bytes,
                                                                       conn.broker_max_packet)
        if size > limit:
            raise TransportError(f"message of {size} bytes exceeds the broker's maximum packet size "
                                 f"{limit} (topic {topic})", code="too_large")
        return size

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      response_topic: str | None = None, correlation_data: bytes | None = None,
                      expiry_s: float | None = None, user_properties: Sequence[tuple[str, str]] = ()) -> int:
        """Publish once (QoS 1: until the broker's PUBACK), waiting for a connection if needed; return the
        PUBACK's reason code (0, or :data:`NO_SUBSCRIBERS` when nobody subscribes to the topic: a
        device's request that no worker will see).

        Raises :class:`TransportError`: ``too_large`` before sending anything, ``timeout`` when no
        connection or acknowledgement came within ``publish_timeout_s``, ``transport`` otherwise;
        :class:`RefusedError` (e.g. ``not_authorized``) when the broker's PUBACK refuses it (QoS ≥ 1;
        a refused QoS 0 publish is dropped by the broker unseen), or when this client was refused.
        """
        packed = self._packed(topic, payload, qos, response_topic, correlation_data, expiry_s, user_properties)
        ack = self._start(topic, payload, qos, retain, packed)
        if ack is None:  # not at once: wait (bounded) for a connection and room to send
            try:
                async with asyncio.timeout(self.config.publish_timeout_s):
                    await self._in_flight.take()
                    try:
                        await self._until_connected()
                        conn = self._client
                        if conn is None:
                            raise TransportError("connection lost before publishing", code="transport")
                        await conn.room(qos)
                    except BaseException:
                        self._in_flight.give()
                        raise
            except TimeoutError as exc:
                self.stats.publish_failures += 1
                raise TransportError(f"publish to {topic} timed out after {self.config.publish_timeout_s} s",
                                     code="timeout") from exc
            except ConnectionLost as exc:
                self.stats.publish_failures += 1
                raise TransportError(f"publish to {topic}: {exc.message}") from exc
            ack = self._started(conn, topic, payload, qos, retain, packed)
        with contextlib.suppress(TimeoutError, ConnectionLost):
            await ack  # its outcome is read below
        return self.publish_result(topic, ack)

    def publish_nowait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                       response_topic: str | None = None, correlation_data: bytes | None = None,
                       on_done: Callable[[asyncio.Future[int]], None] | None = None) -> asyncio.Future[int] | None:
        """:meth:`publish` without a coroutine, for a hot path (a worker's replies): the publish starts now
        and the returned future resolves with the broker's acknowledgement; read it with
        :meth:`publish_result`, which raises what :meth:`publish` would. ``on_done(ack)`` runs when it
        ends, after its slot is given back (one done callback for both: one loop callback fewer per
        publish than adding it to the future). ``None`` when it cannot start at once (no connection,
        ``max_in_flight`` or the broker's Receive Maximum reached; ``on_done`` is then never called): await
        :meth:`publish` instead. ``too_large`` is raised before anything is sent."""
        packed = self._packed(topic, payload, qos, response_topic, correlation_data, None, ())
        return self._start(topic, payload, qos, retain, packed, on_done)

    def publish_result(self, topic: str, ack: asyncio.Future[int]) -> int:
        """The reason code of a finished publish (:meth:`publish_nowait`), counted in :attr:`stats`;
        :class:`TransportError` (``timeout``, ``transport``) or :class:`RefusedError` as :meth:`publish`."""
        if ack.cancelled():
            self.stats.publish_failures += 1
            raise TransportError(f"publish to {topic} cancelled")
        exc = ack.exception()
        if isinstance(exc, TimeoutError):
            self.stats.publish_failures += 1
            raise TransportError(f"publish to {topic}: no acknowledgement within {self.config.publish_timeout_s} s",
                                 code="timeout") from exc
        if isinstance(exc, ConnectionLost):
            self.stats.publish_failures += 1
            raise TransportError(f"publish to {topic}: {exc.message}") from exc
        if exc is not None:
            self.stats.publish_failures += 1
            raise TransportError(f"publish to {topic}: {exc!r}") from exc
        code = ack.result()
        if code >= _FAILURE:
            refused = refusal(code, f"publish to {topic}")
            self.stats.publish_failures += 1
            self.stats.refusals[refused.code] += 1
            self._log.warning("mqtt_publish_refused", topic=topic, code=refused.code, reason_code=code)
            raise refused
        self.stats.published += 1
        return code

    def _packed(self, topic: str, payload: bytes, qos: int, response_topic: str | None,
                correlation_data: bytes | None, expiry_s: float | None,
                user_properties: Sequence[tuple[str, str]]) -> bytes:
        """The PUBLISH's packed properties, after the size check (``too_large``)."""
        packed = mp.pack_publish_properties(response_topic, correlation_data, _expiry_interval(expiry_s),
                                            user_properties)
        self._check_packet(topic, mp.publish_size(topic, len(payload), qos, packed))
        return packed

    def _start(self, topic: str, payload: bytes, qos: int, retain: bool, packed: bytes,
               on_done: Callable[[asyncio.Future[int]], None] | None = None) -> asyncio.Future[int] | None:
        """The publish, started now when it can be (connected, a free slot, room at the broker); else ``None``."""
        conn = self._client
        if (conn is None or not self._connected.is_set() or self._failure is not None or not conn.can_start(qos)
                or not self._in_flight.try_take()):
            return None
        return self._started(conn, topic, payload, qos, retain, packed, on_done)

    def _started(self, conn: Connection, topic: str, payload: bytes, qos: int, retain: bool, packed: bytes,
                 on_done: Callable[[asyncio.Future[int]], None] | None = None) -> asyncio.Future[int]:
        """Start a publish on ``conn`` holding one of this transport's slots, given back when it ends."""
        try:
            ack = conn.start_publish(topic, payload, qos=qos, retain=retain, properties=packed,
                                     timeout_s=self.config.publish_timeout_s)
        except BaseException:
            self._in_flight.give()
            raise
        if on_done is None:
            ack.add_done_callback(self._in_flight.give)
        else:
            give = self._in_flight.give

            def ended(done: asyncio.Future[int]) -> None:
                give()
                on_done(done)

            ack.add_done_callback(ended)
        return ack

    async def publish_message(self, msg: Outgoing) -> None:
        await self.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)

    async def close(self, farewell: Sequence[Outgoing] = ()) -> bool:
        """Publish ``farewell`` (e.g. offline availability: a clean disconnect suppresses the will)
        and stop reconnecting. Cancel the :meth:`run` task afterwards to disconnect. True when every
        farewell message reached the broker (only then may the connection end with a DISCONNECT,
        which discards the will)."""
        said = self.connected
        if said:
            for msg in farewell:
                try:
                    await self.publish_message(msg)
                except TransportError as exc:
                    said = False
                    self._log.warning("mqtt_farewell_failed", topic=msg.topic, error=exc.message)
        self._closing = True
        return said

    def abort(self, *, disconnect: bool = False) -> None:
        """End the connection at once and stop reconnecting, without waiting for the broker: for stopping
        thousands of connections within seconds (a graceful disconnect costs each one a round trip).
        ``disconnect``: a DISCONNECT goes out first and the broker discards the will (after a farewell);
        without it the broker publishes the will. Cancel the :meth:`run` task afterwards, which then
        returns without waiting."""
        self._closing = True
        conn = self._client
        if conn is not None:
            conn.drop(disconnect=disconnect)


def mqtt_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when an MQTT v5 CONNECT gets a CONNACK (the broker is up; it may still refuse this
    anonymous probe, as the production profile does). Synchronous and without a client library: a
    readiness probe for whoever starts a broker (``patchcast.broker``), safe outside an event loop."""
    client_id = b"patchcast-probe"
    # CONNECT: protocol name "MQTT", level 5, flags clean start, keep-alive 5 s, no properties.
    variable = b"\x00\x04MQTT\x05\x02\x00\x05\x00" + len(client_id).to_bytes(2, "big") + client_id
    packet = bytes([0x10, len(variable)]) + variable
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(packet)
            head = s.recv(4)
            ok = len(head) >= 2 and head[0] == 0x20
            with contextlib.suppress(OSError):
                s.sendall(b"\xe0\x00")  # DISCONNECT, so the broker does not log a lost client
            return ok
    except OSError:
        return False
