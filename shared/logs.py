"""structlog setup: JSON lines for services (and anything not on a terminal), pretty console output
in a terminal. Library code only ever calls :func:`get_logger`; the composition root calls
:func:`configure` once per process."""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(format: Literal["auto", "json", "console"] = "auto", level: str = "info",
              stream: Any = None) -> None:
    stream = stream or sys.stderr
    use_console = format == "console" or (format == "auto" and hasattr(stream, "isatty") and stream.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer(colors=True) if use_console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Third-party libraries log through stdlib logging; keep them at warning and on the same stream.
    logging.basicConfig(stream=stream, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def get_logger(name: str, **context: Any) -> Any:
    # A lazy proxy: a module-level logger still picks up the configuration made later by configure().
    return structlog.get_logger(name, **context)
