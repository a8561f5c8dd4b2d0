"""JSON logs through structlog, with the session and sandbox ids bound where they are known."""

from __future__ import annotations

import logging
import sys

import structlog

REDACTED_KEYS = frozenset({"token", "secret", "password", "authorization", "credential", "api_key", "sdp"})


def _redact(_logger: object, _name: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    # Secrets never reach a log line, whoever passed them.
    for key in list(event):
        if key.lower() in REDACTED_KEYS:
            event[key] = "[redacted]"
    return event


def configure(level: str = "info", *, json: bool = True) -> None:
    numeric = logging.getLevelName(level.upper())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(message)s")
    for noisy in ("uvicorn.access", "aioice", "aiortc", "sqlalchemy.engine"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
