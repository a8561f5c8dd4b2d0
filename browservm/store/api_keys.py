"""Operator API keys. Only a SHA-256 of the secret is stored: keys are 256-bit random, so a slow hash
would add nothing but latency to every request."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from browservm.store.models import ApiKey, utcnow

SECRET_PREFIX = "bvm_"  # noqa: S105 (a marker, not a secret)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def create(db: AsyncSession, *, name: str, tenant: str = "default") -> tuple[ApiKey, str]:
    """Returns the record and the secret; the secret is shown once and never stored."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(name=name, tenant=tenant, prefix=secret[:12], secret_hash=hash_secret(secret))
    db.add(key)
    await db.flush()
    return key, secret


async def authenticate(db: AsyncSession, secret: str) -> ApiKey | None:
    query = select(ApiKey).where(ApiKey.secret_hash == hash_secret(secret), ApiKey.revoked_at.is_(None))
    return (await db.execute(query)).scalar_one_or_none()


async def touch(db: AsyncSession, key_id: str) -> None:
    await db.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=utcnow()))


async def all_keys(db: AsyncSession) -> Sequence[ApiKey]:
    return list((await db.execute(select(ApiKey).order_by(ApiKey.created_at))).scalars())


async def revoke(db: AsyncSession, key_id: str) -> bool:
    result = await db.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def any_active(db: AsyncSession) -> bool:
    query = select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)
    return (await db.execute(query)).first() is not None
