"""JSON logs through structlog, with the session and sandbox ids bound where they are known.

Secrets never reach a log line, whoever writes it: keys named like secrets are blanked, and every text
(structlog values, tracebacks, and the lines of other libraries such as uvicorn's ``"WebSocket
/v1/…/signal?token=…" [accepted]``) has viewer tokens, API keys, bearer values and secret-looking query
parameters replaced by ``[redacted]`` before it is written.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import structlog

REDACTED = "[redacted]"
REDACTED_KEYS = frozenset({"token", "secret", "password", "authorization", "credential", "api_key", "sdp"})

# Query parameters that carry secrets: our viewer token, OAuth codes and tokens, anything called a key.
_SECRET_QUERY = re.compile(
    r"(?i)([?&;](?:token|access_token|refresh_token|id_token|code|client_secret|password|secret|"
    r"api_key|key|credential|sig|signature)=)[^&#\s\"'<>]*"
)
_VIEWER_TOKEN = re.compile(r"\bv1\.[A-Za-z0-9_-]+\.\d{6,}\.[A-Za-z0-9_-]{16,}")
_API_KEY = re.compile(r"\bbvm_[A-Za-z0-9_-]{16,}")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+")


def redact_text(text: str) -> str:
    """``text`` with every secret it may hold replaced by ``[redacted]``."""
    text = _SECRET_QUERY.sub(rf"\1{REDACTED}", text)
    text = _VIEWER_TOKEN.sub(REDACTED, text)
    text = _API_KEY.sub(REDACTED, text)
    return _BEARER.sub(rf"\1{REDACTED}", text)


def file_tail(path: Path, size: int = 4096, *, missing: str | None = None) -> str:
    """The last ``size`` bytes of a log file (a VM's console, an agent's log) for a failure's detail,
    redacted like every log line: that detail reaches the API's error bodies and the controller's log.
    A file that does not exist gives ``missing``, by default a sentence that says so."""
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - size))
            return redact_text(file.read().decode(errors="replace"))
    except FileNotFoundError:
        return f"({path} does not exist)" if missing is None else missing


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: _redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(item) for item in value)
    return value


def _redact(_logger: object, _name: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    for key in list(event):
        event[key] = REDACTED if key.lower() in REDACTED_KEYS else _redact_value(event[key])
    return event


class RedactingFilter(logging.Filter):
    """Rewrites a standard-library record's final message with :func:`redact_text` (on a handler, so it
    covers every logger that propagates to it: uvicorn's, aiortc's, SQLAlchemy's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact_text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written, not when logging was configured (a command run
    in-process, as Typer's test runner does, swaps it for a stream it closes afterwards)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


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
            structlog.processors.format_exc_info,
            _redact,  # after the traceback is formatted, so it is cleaned too
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=numeric, stream=_Stderr(), format="%(message)s", force=True)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    for noisy in ("uvicorn.access", "aioice", "aiortc", "sqlalchemy.engine"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
