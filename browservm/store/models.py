"""SQLAlchemy 2 models. Portable between SQLite (embedded default) and PostgreSQL (production).

Identifiers are prefixed random strings (``ses_…``, ``sbx_…``) so that a leaked id says what it is and
ids cannot be enumerated. Times are timezone-aware UTC.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(12).replace('-', 'x').replace('_', 'y')}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC; always returns aware datetimes (SQLite drops the zone on its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# A BIGINT autoincrement on PostgreSQL, the rowid alias on SQLite.
EventId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    name: Mapped[str] = mapped_column(String(100))
    tenant: Mapped[str] = mapped_column(String(100), default="default")
    prefix: Mapped[str] = mapped_column(String(16))
    """The first characters of the secret, shown in listings so an operator can tell keys apart."""
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Session(Base):
    __tablename__ = "sessions"
    __table_args__ = (
        Index("ix_sessions_tenant_user_created", "tenant", "user_id", "created_at"),
        Index("ix_sessions_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ses"))
    tenant: Mapped[str] = mapped_column(String(100))
    user_id: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), default="pending")
    reason: Mapped[str] = mapped_column(Text, default="")
    """Why a session failed, expired or was cancelled; empty otherwise."""
    sandbox_id: Mapped[str | None] = mapped_column(String(40), default=None)
    login_url: Mapped[str | None] = mapped_column(Text, default=None)
    account: Mapped[dict[str, Any]] = mapped_column(default=dict)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column(default=None)


class Sandbox(Base):
    __tablename__ = "sandboxes"
    __table_args__ = (Index("ix_sandboxes_state", "state"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("sbx"))
    backend: Mapped[str] = mapped_column(String(20))
    role: Mapped[str] = mapped_column(String(10))
    state: Mapped[str] = mapped_column(String(20), default="creating")
    reason: Mapped[str] = mapped_column(Text, default="")
    tenant: Mapped[str | None] = mapped_column(String(100), default=None)
    user_id: Mapped[str | None] = mapped_column(String(200), default=None)
    session_id: Mapped[str | None] = mapped_column(String(40), default=None)
    runtime: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The backend's own record of what it created (see ``SandboxHandle.runtime``)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class NetworkLease(Base):
    """A guest address on a host's sandbox network, held by one sandbox from attach to destroy.

    ``scope`` is the network's (one per controller state directory), so controllers of several hosts can
    share a database and each hand out the same subnet."""

    __tablename__ = "network_leases"
    __table_args__ = (UniqueConstraint("scope", "address"), UniqueConstraint("sandbox_id"))

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(String(40))
    address: Mapped[str] = mapped_column(String(45))
    sandbox_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CliVm(Base):
    """A user's persistent CLI sandbox: one per (tenant, user)."""

    __tablename__ = "cli_vms"
    __table_args__ = (UniqueConstraint("tenant", "user_id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("cvm"))
    tenant: Mapped[str] = mapped_column(String(100))
    user_id: Mapped[str] = mapped_column(String(200))
    sandbox_id: Mapped[str] = mapped_column(ForeignKey("sandboxes.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Credential(Base):
    """A sealed credential set. Never holds plaintext: ``ciphertext`` is AES-256-GCM under ``key_id``."""

    __tablename__ = "credentials"
    __table_args__ = (Index("ix_credentials_tenant_user", "tenant", "user_id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("crd"))
    tenant: Mapped[str] = mapped_column(String(100))
    user_id: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(40))
    session_id: Mapped[str | None] = mapped_column(String(40), default=None)
    account: Mapped[dict[str, Any]] = mapped_column(default=dict)
    key_id: Mapped[str] = mapped_column(String(40))
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    validated_at: Mapped[datetime | None] = mapped_column(default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    delivered_sandbox_id: Mapped[str | None] = mapped_column(String(40), default=None)
    """The CLI VM this set was written into: a resume of that VM leaves its own (maybe refreshed) copy."""
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class EgressAssignment(Base):
    """A user's exit: the pool, port and sticky session id their sessions leave through, until rotated.

    Holds no secret: a pool's password stays in the settings' file or environment, and the username is
    rendered from the pool's template when a session needs it."""

    __tablename__ = "egress_assignments"
    __table_args__ = (UniqueConstraint("tenant", "user_id"), Index("ix_egress_assignments_pool", "pool"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("egr"))
    tenant: Mapped[str] = mapped_column(String(100))
    user_id: Mapped[str] = mapped_column(String(200))
    pool: Mapped[str] = mapped_column(String(40))
    port: Mapped[int] = mapped_column(Integer)
    sticky: Mapped[str] = mapped_column(String(40), default="")
    """The ``{sticky}`` of the pool's username template; empty when it has none."""
    generation: Mapped[int] = mapped_column(Integer, default=0)
    """How often the user was rotated."""
    status: Mapped[str] = mapped_column(String(20), default="unchecked")
    """``unchecked``, ``ok`` (the last check through the proxy worked) or ``bad``."""
    exit_address: Mapped[str | None] = mapped_column(String(64), default=None)
    """The address the last good check came out from."""
    detail: Mapped[str] = mapped_column(Text, default="")
    """Why the last check failed; empty when it worked."""
    checked_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    rotated_at: Mapped[datetime | None] = mapped_column(default=None)


class Event(Base):
    """Append-only log of everything that happened to a session or sandbox."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_session_id_id", "session_id", "id"),)

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    tenant: Mapped[str | None] = mapped_column(String(100), default=None)
    session_id: Mapped[str | None] = mapped_column(String(40), default=None)
    sandbox_id: Mapped[str | None] = mapped_column(String(40), default=None)
    kind: Mapped[str] = mapped_column(String(60))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
