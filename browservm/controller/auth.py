"""Who is calling: operator API keys (bearer) and viewer tokens (one session, short-lived).

A viewer token is ``v1.<session_id>.<expiry>.<hmac>``: stateless, so any replica can check it, scoped to
one session, and it expires with the session. It is what the end user's page holds; the API key stays
on the operator's backend.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from browservm.controller.errors import ApiError


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    tenant: str


@dataclass(frozen=True, slots=True)
class ViewerClaims:
    session_id: str
    expires_at: int


class KeyUse:
    """When each API key was last recorded as used: written at most once a minute per key, not on every
    request. A write per request serialized SQLite's writers behind each other and stalled the API (up
    to "database is locked") when many requests came at once."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._written: dict[str, float] = {}

    def due(self, key_id: str) -> bool:
        now = time.monotonic()
        if now - self._written.get(key_id, -self.every_s) < self.every_s:
            return False
        self._written[key_id] = now
        return True


def load_secret(configured: str, state_dir: Path) -> bytes:
    if configured:
        return configured.encode()
    path = state_dir / "controller.key"
    if path.exists():
        return path.read_bytes().strip()
    state_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48).encode()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(value)
    os.replace(tmp, path)
    return value


def _sign(secret: bytes, payload: str) -> str:
    digest = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _same(a: str, b: str) -> bool:
    """Constant-time equality of two strings from anywhere: ``hmac.compare_digest`` refuses ``str`` with
    non-ASCII characters (TypeError), which a token or a path can hold."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def issue_viewer_token(secret: bytes, session_id: str, expires_at: float) -> str:
    payload = f"v1.{session_id}.{int(expires_at)}"
    return f"{payload}.{_sign(secret, payload)}"


def verify_viewer_token(secret: bytes, token: str, session_id: str) -> ViewerClaims:
    """Raise 401 for a token that is not ours or has expired, 403 for another session's token."""
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != "v1":
        raise ApiError(
            401, "invalid_token", "viewer token is malformed; ask the operator for a new viewer link"
        )
    payload = ".".join(parts[:3])
    if not _same(_sign(secret, payload), parts[3]):
        raise ApiError(401, "invalid_token", "viewer token signature does not match")
    try:
        expires_at = int(parts[2])
    except ValueError:
        raise ApiError(401, "invalid_token", "viewer token is malformed") from None
    if expires_at < time.time():
        raise ApiError(
            401, "token_expired", "viewer token has expired; ask the operator for a new viewer link"
        )
    if not _same(parts[1], session_id):
        raise ApiError(403, "wrong_session", "this viewer token belongs to another session")
    return ViewerClaims(session_id=session_id, expires_at=expires_at)
