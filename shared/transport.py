"""MQTT v5 transport: the only module that imports aiomqtt or paho, and the only one that speaks MQTT
(:func:`mqtt_ping`, a broker's readiness probe, included).

One :class:`Transport` per MQTT client identity (one per worker process, one per simulated
device). Its :meth:`Transport.run` coroutine owns the connection: connect under a timeout,
re-subscribe, publish the "birth" messages (retained availability), deliver messages to a
synchronous handler, and on any loss reconnect with jittered exponential backoff. Services run it
as a named task in their TaskGroup and call :meth:`publish` / :meth:`subscribe` from anywhere on
the same event loop.

Rules it enforces (see the measurements notes):

* TCP_NODELAY on the client socket (the broker sets it too): no 40 ms delayed-ACK stalls.
* At most ``max_in_flight`` publishes awaiting their PUBACK (a semaphore), and aiomqtt's
  "pending publish calls" warning silenced: it fires per publish and costs throughput.
* Every publish/subscribe under ``asyncio.timeout(publish_timeout_s)``.
* The broker's maximum packet size is checked *before* publishing: an over-size publish would
  make the broker drop the whole connection. It raises :class:`TransportError` code ``too_large``.
* aiomqtt/paho errors never leak: they become :class:`TransportError` (``raise … from``).
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
import contextlib
import logging
import math
import random
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.config import BrokerConfig
from shared.errors import ConfigError, RefusedError, TLSError, TransportError
from shared.logs import get_logger

DEFAULT_MAX_IN_FLIGHT = 10  # aiomqtt warns (and slows down) beyond 10 pending calls
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
    try:
        name = str(paho.ReasonCode(PacketTypes.CONNACK, identifier=reason_code))
    except Exception:  # a code paho does not name
        name = "failure"
    code = _REFUSAL_CODES.get(reason_code, "refused")
    return RefusedError(f"{what}: refused by the broker, reason code 0x{reason_code:02X} ({name})",
                        reason_code=reason_code, code=code)


def _reason_value(code: Any) -> int:
    value = getattr(code, "value", code)
    return int(value) if isinstance(value, int) else _FAILURE


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


_DISCONNECT_NORMAL = b"\xe0\x00"  # MQTT DISCONNECT, remaining length 0: reason 0x00, normal disconnection


class _Client(aiomqtt.Client):
    """aiomqtt's client plus what it drops: the PUBACK reason code, and a connection the broker
    closes before its CONNACK (aiomqtt would wait out its timeout)."""

    _MAX_REMEMBERED = 1024  # PUBACK failures of publishes nobody waits for any more (timed out)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.puback_failures: dict[int, int] = {}
        self.last_error = ""  # paho's last error-level log line, e.g. a TLS alert on the socket
        self._client.on_log = self._on_log

    def _on_log(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        if level == paho.MQTT_LOG_ERR:
            self.last_error = buf

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        value = _reason_value(reason_code)
        if value:  # a refusal, or NO_SUBSCRIBERS
            if len(self.puback_failures) >= self._MAX_REMEMBERED:
                self.puback_failures.clear()
            self.puback_failures[mid] = value
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any = None) -> None:
        if not self._connected.done():  # closed before the CONNACK: fail the connect now
            detail = f"; {self.last_error}" if self.last_error else ""
            self._connected.set_exception(aiomqtt.MqttError(
                f"the broker closed the connection before its CONNACK ({reason_code}{detail})"))
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def drop(self, *, disconnect: bool = False) -> None:
        """Close the socket now and mark the client disconnected, so that leaving it does not wait.
        ``disconnect``: write a DISCONNECT first (a clean end: the broker discards the will); without
        it the broker publishes the will, as for a device that lost power."""
        paho_client = self._client
        with contextlib.suppress(OSError, AttributeError):
            sock = paho_client._sock
            # Written straight to the socket: paho's own disconnect() would schedule a write on the loop
            # for a socket closed by then. Only between packets (nothing of paho's left to write).
            if disconnect and sock is not None and not paho_client._out_packet:
                sock.send(_DISCONNECT_NORMAL)
            paho_client._sock_close()  # unregisters the socket from aiomqtt's loop, then closes it
        if not self._disconnected.done():
            self._disconnected.set_result(None)

    def pending_failure(self) -> BaseException | None:
        """What ended the connection attempt, when the socket reader saw it (e.g. a TLS alert)."""
        disconnected = self._disconnected
        if disconnected.done() and not disconnected.cancelled():
            return disconnected.exception()
        return None

    async def publish_checked(self, topic: str, payload: bytes, *, qos: int, retain: bool,
                              properties: Properties | None, ack_timeout_s: float) -> int:
        """Publish like :meth:`aiomqtt.Client.publish`; return the PUBACK reason code (0: accepted)."""
        info = self._client.publish(topic, payload, qos, retain, properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        try:
            if not info.is_published():
                confirmation = asyncio.Event()
                with self._pending_call(info.mid, confirmation, self._pending_publishes):
                    await self._wait_for(confirmation.wait(), timeout=ack_timeout_s)
        finally:
            code = self.puback_failures.pop(info.mid, 0)
        return code


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


@dataclass(frozen=True)
class Outgoing:
    """A message to publish later: birth (on every connect), will, or farewell messages."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False

    def __post_init__(self) -> None:
        if self.qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {self.qos}")
        if not self.topic or any(c in self.topic for c in "+#"):
            raise ValueError(f"invalid publish topic {self.topic!r}")


@dataclass(frozen=True)
class Incoming:
    """One received message with the MQTT v5 properties PatchCast uses."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    expiry_s: int | None = None  # remaining message-expiry interval as delivered by the broker
    user_properties: tuple[tuple[str, str], ...] = ()
    retain: bool = False
    received_at: float = field(default_factory=time.monotonic)


MessageHandler = Callable[[Incoming], None]


class _DropPendingCallsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pending publish calls" not in record.getMessage()


def _quiet_mqtt_logger() -> logging.Logger:
    logger = logging.getLogger("patchcast.mqtt")
    if not any(isinstance(f, _DropPendingCallsWarning) for f in logger.filters):
        logger.addFilter(_DropPendingCallsWarning())
    logger.setLevel(logging.WARNING)
    return logger


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_packet_size(topic: str, payload: bytes, qos: int, properties: Properties | None) -> int:
    """Exact size in bytes of the MQTT v5 PUBLISH packet paho would send."""
    props = properties.pack() if properties is not None else b"\x00"
    remaining = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + len(props) + len(payload)
    return 1 + _varint_len(remaining) + remaining


def publish_properties(*, response_topic: str | None = None, correlation_data: bytes | None = None,
                       expiry_s: float | None = None,
                       user_properties: Sequence[tuple[str, str]] = ()) -> Properties | None:
    """PUBLISH properties for request/reply: response topic, correlation data, message expiry."""
    if response_topic is None and correlation_data is None and expiry_s is None and not user_properties:
        return None
    props = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    if expiry_s is not None:
        # The interval is whole seconds on the wire; round up so a short deadline never becomes 0
        # (0 would not mean "expired", it is still a valid interval that expires at once).
        props.MessageExpiryInterval = max(1, int(-(-expiry_s // 1)))
    if user_properties:
        props.UserProperty = list(user_properties)
    return props


def _incoming(message: aiomqtt.Message) -> Incoming:
    props = message.properties
    raw = message.payload
    payload = raw if isinstance(raw, bytes | bytearray) else str(raw).encode()
    user = tuple(getattr(props, "UserProperty", ()) or ()) if props is not None else ()
    return Incoming(
        topic=message.topic.value,
        payload=bytes(payload),
        response_topic=getattr(props, "ResponseTopic", None) if props is not None else None,
        correlation_data=getattr(props, "CorrelationData", None) if props is not None else None,
        expiry_s=getattr(props, "MessageExpiryInterval", None) if props is not None else None,
        user_properties=tuple((str(k), str(v)) for k, v in user),
        retain=bool(message.retain),
    )


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
        self._client: _Client | None = None
        self._tls = tls_context(config)  # ConfigError now for unreadable CA/certificate/key files
        self._failure: TransportError | None = None  # a refusal or TLS failure: final
        self._failed = asyncio.Event()
        self._connected = asyncio.Event()
        self._in_flight = asyncio.Semaphore(max_in_flight)
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

    def _connect_failure(self, exc: BaseException, client: _Client) -> TransportError | None:
        """A final failure for this connect error (refused, TLS), or ``None`` when worth retrying."""
        if isinstance(exc, MqttConnectError) and _reason_value(exc.rc) >= _FAILURE:
            return refusal(_reason_value(exc.rc), f"connect as client {self.client_id!r}"
                           f"{f' user {self.config.username!r}' if self.config.username else ' (anonymous)'}")
        cause = client.pending_failure() if isinstance(exc, TimeoutError | aiomqtt.MqttError) else None
        text = " ".join(str(e) for e in (exc, cause) if e is not None)
        if self._tls and any(marker.lower() in text.lower() for marker in _TLS_FAILURES):
            return TLSError(f"TLS handshake with {self._where} failed: {text} (check broker.tls_ca_file, "
                            f"the certificate's host names, and the client certificate if the listener "
                            f"requires one)")
        if not self._tls and "before its CONNACK" in text:
            # Either a TLS listener (set broker.tls) or a broker out of connections: the bytes do not tell.
            return TransportError(f"{self._where} closed the connection before answering CONNECT: a TLS listener "
                                  f"(set broker.tls = true and broker.tls_ca_file), or a broker at its connection "
                                  f"limit (its file descriptors, max_connections)?", code="closed_before_connack")
        return None

    # ---- connection loop ---------------------------------------------------------------------
    def _new_client(self) -> _Client:
        cfg = self.config
        will = None
        if self.will is not None:
            will = aiomqtt.Will(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        return _Client(
            cfg.host, cfg.port, identifier=self.client_id, protocol=aiomqtt.ProtocolVersion.V5,
            username=cfg.username or None, password=cfg.password or None, will=will,
            keepalive=cfg.keepalive_s, timeout=cfg.publish_timeout_s, logger=_quiet_mqtt_logger(),
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)], tls_context=self._tls,
            tls_insecure=None if self._tls is None else not cfg.tls_verify_hostname)

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
            client = self._new_client()
            try:
                async with asyncio.timeout(self.config.connect_timeout_s):
                    await client.__aenter__()
            except (aiomqtt.MqttError, TimeoutError, OSError) as exc:
                final = self._connect_failure(exc, client)
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
                await self._serve(client)
            except (aiomqtt.MqttError, TimeoutError) as exc:
                self.stats.disconnects += 1
                self._log.warning("mqtt_connection_lost", error=str(exc) or type(exc).__name__)
            except RefusedError as exc:
                self._fail(exc)  # an ACL problem: reconnecting cannot fix it
                raise
            except TransportError as exc:
                self.stats.disconnects += 1
                self._log.warning("mqtt_connection_lost", error=exc.message)
            finally:
                self._connected.clear()
                self._client = None
                with contextlib.suppress(aiomqtt.MqttError, TimeoutError, OSError, RuntimeError):
                    async with asyncio.timeout(2.0):
                        await client.__aexit__(None, None, None)
            if not self._closing:
                delay = self.backoff_delay(0)
                await asyncio.sleep(delay)

    async def _serve(self, client: _Client) -> None:
        # Subscribe and announce before anyone may publish through this client.
        for topic_filter, qos in self._subscriptions.items():
            await self._subscribe_on(client, topic_filter, qos)
        for msg in self.birth:
            async with asyncio.timeout(self.config.publish_timeout_s):
                code = await client.publish_checked(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain,
                                                    properties=None, ack_timeout_s=self.config.publish_timeout_s)
            if code >= _FAILURE:
                raise refusal(code, f"publish to {msg.topic}")
        self._client = client
        self._connected.set()
        self.stats.connects += 1
        self._log.info("mqtt_connected", broker=self._where,
                       subscriptions=list(self._subscriptions))
        async for message in client.messages:
            self.stats.received += 1
            if self.handler is None:
                continue
            try:
                self.handler(_incoming(message))
            except Exception:  # a handler bug must not take the connection down
                self.stats.handler_errors += 1
                self._log.exception("mqtt_handler_failed", topic=message.topic.value)

    # ---- calls -------------------------------------------------------------------------------
    async def _subscribe_on(self, client: _Client, topic_filter: str, qos: int) -> None:
        try:
            async with asyncio.timeout(self.config.publish_timeout_s):
                codes = await client.subscribe(topic_filter, qos=qos)
        except TimeoutError as exc:
            raise TransportError(f"subscribe {topic_filter!r} timed out", code="timeout") from exc
        for code in codes:
            value = _reason_value(code)
            if value >= _FAILURE:
                raise refusal(value, f"subscribe {topic_filter!r}")

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        self._subscriptions[topic_filter] = qos
        client = self._client
        if client is not None:
            try:
                await self._subscribe_on(client, topic_filter, qos)
            except RefusedError as exc:
                self._subscriptions.pop(topic_filter, None)  # never retried: it would fail again
                self.stats.refusals[exc.code] += 1
                self._log.error("mqtt_refused", broker=self._where, code=exc.code, error=exc.message)
                raise
            except aiomqtt.MqttError as exc:
                raise TransportError(f"subscribe {topic_filter!r}: {exc}") from exc

    async def unsubscribe(self, topic_filter: str) -> None:
        """Stop receiving ``topic_filter`` (also after reconnects)."""
        self._subscriptions.pop(topic_filter, None)
        client = self._client
        if client is None:
            return
        try:
            async with asyncio.timeout(self.config.publish_timeout_s):
                await client.unsubscribe(topic_filter)
        except TimeoutError as exc:
            raise TransportError(f"unsubscribe {topic_filter!r} timed out", code="timeout") from exc
        except aiomqtt.MqttError as exc:
            raise TransportError(f"unsubscribe {topic_filter!r}: {exc}") from exc

    def check_size(self, topic: str, payload: bytes, qos: int, properties: Properties | None) -> int:
        size = publish_packet_size(topic, payload, qos, properties)
        if size > self.config.max_packet_bytes:
            raise TransportError(f"message of {size} bytes exceeds the broker's maximum packet size "
                                 f"{self.config.max_packet_bytes} (topic {topic})", code="too_large")
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
        props = publish_properties(response_topic=response_topic, correlation_data=correlation_data,
                                   expiry_s=expiry_s, user_properties=user_properties)
        self.check_size(topic, payload, qos, props)
        try:
            async with asyncio.timeout(self.config.publish_timeout_s):
                async with self._in_flight:
                    await self._until_connected()
                    client = self._client
                    if client is None:
                        raise TransportError("connection lost before publishing", code="transport")
                    code = await client.publish_checked(topic, payload, qos=qos, retain=retain, properties=props,
                                                        ack_timeout_s=self.config.publish_timeout_s + 1.0)
            if code >= _FAILURE:
                exc = refusal(code, f"publish to {topic}")
                self.stats.publish_failures += 1
                self.stats.refusals[exc.code] += 1
                self._log.warning("mqtt_publish_refused", topic=topic, code=exc.code, reason_code=code)
                raise exc
        except TimeoutError as exc:
            self.stats.publish_failures += 1
            raise TransportError(f"publish to {topic} timed out after {self.config.publish_timeout_s} s",
                                 code="timeout") from exc
        except aiomqtt.MqttError as exc:
            self.stats.publish_failures += 1
            raise TransportError(f"publish to {topic}: {exc}") from exc
        self.stats.published += 1
        return code if qos else 0

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
        client = self._client
        if client is not None:
            client.drop(disconnect=disconnect)


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
