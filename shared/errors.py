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
