"""One small exception tree. Every error carries a machine-readable ``code`` that travels in
error replies and metrics (``errors_by_code``)."""

from __future__ import annotations


class PatchCastError(Exception):
    """Base of every error PatchCast raises on purpose."""

    code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(PatchCastError):
    """Invalid or unknown configuration."""

    code = "config"


class ModelError(PatchCastError):
    """A model could not be built or loaded (unknown name, bad checkpoint, shape mismatch)."""

    code = "model"


class DatasetError(PatchCastError):
    """An image source could not be read."""

    code = "dataset"


class ProtocolError(PatchCastError):
    """Untrusted wire data failed validation. Subclasses narrow the code."""

    code = "protocol"


class TransportError(PatchCastError):
    """The broker could not be reached or a broker call timed out."""

    code = "transport"


class InferenceError(PatchCastError):
    """A batch failed on the server model."""

    code = "inference"


class BusyError(PatchCastError):
    """A bounded queue was full: the request was refused, not dropped silently."""

    code = "busy"


class BrokerProcessError(PatchCastError):
    """A local broker process could not be found, started or reached."""

    code = "broker"


# Protocol failures, one class per machine-readable code. Decoders of untrusted bytes raise only these.


class TooLargeError(ProtocolError):
    """A message, field or decoded image exceeds a configured limit."""

    code = "too_large"


class MalformedError(ProtocolError):
    """The bytes are not a well-formed message (bad msgpack, wrong container type, missing field)."""

    code = "malformed"


class BadVersionError(ProtocolError):
    """The message's schema version or kind is not one this side speaks."""

    code = "bad_version"


class BadFieldError(ProtocolError):
    """A field has the wrong type or an out-of-range value."""

    code = "bad_field"


class BadGeometryError(ProtocolError):
    """Image size, patch size and grid do not agree, or exceed the limits."""

    code = "bad_geometry"


class BadMaskError(ProtocolError):
    """The selection bitmask has the wrong length, set padding bits or no kept patch."""

    code = "bad_mask"


class UnknownCodecError(ProtocolError):
    """The payload codec is not registered here."""

    code = "unknown_codec"


class BadPayloadError(ProtocolError):
    """The codec payload does not decode to exactly the kept patches."""

    code = "bad_payload"


class BadTopicError(ProtocolError):
    """A topic or an id used in a topic is invalid."""

    code = "bad_topic"


class BadPropertyError(ProtocolError):
    """An MQTT property of a request is out of bounds: correlation data too long, too many or too
    large user properties (a bad response topic is ``bad_topic``)."""

    code = "bad_property"


class ForeignIdError(ProtocolError):
    """A request id that is not the sending device's own (ids are ``<device id>.<suffix>``, the device
    being the one named by the request topic)."""

    code = "foreign_id"


class UnknownExchangeError(ProtocolError):
    """A region for an exchange this worker does not hold: never opened here, already answered, or
    expired (the device then keeps the glance's answer)."""

    code = "no_exchange"


class RefusedError(TransportError):
    """The broker answered a CONNECT, SUBSCRIBE or PUBLISH with a failure reason code (an ACL,
    credentials or client-id refusal). Reconnecting or waiting cannot fix it; ``reason_code`` is the
    MQTT v5 code (e.g. 0x87), ``code`` a name: ``not_authorized``, ``bad_credentials``,
    ``bad_client_id`` or ``refused`` (any other failure code)."""

    code = "refused"

    def __init__(self, message: str, *, reason_code: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.reason_code = reason_code


class TLSError(TransportError):
    """The TLS handshake with the broker failed: wrong CA, a certificate that does not name the
    host, a client certificate the broker refused, or a plain listener where TLS was expected."""

    code = "tls"
