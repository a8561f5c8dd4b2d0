"""Sealed credential records. The store never sees plaintext: callers seal with the vault first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from browservm.store.models import Credential, utcnow
from browservm.vault import Sealed


async def add(
    db: AsyncSession,
    *,
    tenant: str,
    user_id: str,
    provider: str,
    session_id: str | None,
    account: dict[str, Any],
    key_id: str,
    nonce: bytes,
    ciphertext: bytes,
) -> Credential:
    """Store a new set and revoke the user's older sets for the same provider (one live login each)."""
    now = utcnow()
    await db.execute(
        update(Credential)
        .where(
            Credential.tenant == tenant,
            Credential.user_id == user_id,
            Credential.provider == provider,
            Credential.revoked_at.is_(None),
        )
        .values(revoked_at=now)
    )
    credential = Credential(
        tenant=tenant,
        user_id=user_id,
        provider=provider,
        session_id=session_id,
        account=account,
        key_id=key_id,
        nonce=nonce,
        ciphertext=ciphertext,
        validated_at=now,
    )
    db.add(credential)
    await db.flush()
    return credential


async def for_session(db: AsyncSession, session_id: str) -> Credential | None:
    """The set a session stored, if it got that far (a restarted controller finishes from there)."""
    query = (
        select(Credential).where(Credential.session_id == session_id).order_by(Credential.created_at.desc())
    )
    return (await db.execute(query)).scalars().first()


async def for_user(db: AsyncSession, *, tenant: str, user_id: str) -> Sequence[Credential]:
    query = (
        select(Credential)
        .where(Credential.tenant == tenant, Credential.user_id == user_id, Credential.revoked_at.is_(None))
        .order_by(Credential.created_at.desc())
    )
    return list((await db.execute(query)).scalars())


async def get(db: AsyncSession, credential_id: str, *, tenant: str) -> Credential | None:
    query = select(Credential).where(Credential.id == credential_id, Credential.tenant == tenant)
    return (await db.execute(query)).scalar_one_or_none()


async def mark_delivered(db: AsyncSession, credential_id: str, sandbox_id: str) -> None:
    await db.execute(
        update(Credential)
        .where(Credential.id == credential_id)
        .values(delivered_at=utcnow(), delivered_sandbox_id=sandbox_id)
    )


async def revoke(db: AsyncSession, credential_id: str, *, tenant: str) -> bool:
    result = await db.execute(
        update(Credential)
        .where(Credential.id == credential_id, Credential.tenant == tenant, Credential.revoked_at.is_(None))
        .values(revoked_at=utcnow(), ciphertext=b"", nonce=b"")
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def live_sealed(db: AsyncSession) -> Sequence[Credential]:
    """Every credential set that still holds a sealed blob (for key rotation)."""
    return list((await db.execute(select(Credential).where(Credential.revoked_at.is_(None)))).scalars())


async def replace_sealed(
    db: AsyncSession, credential_id: str, *, key_id: str, nonce: bytes, ciphertext: bytes
) -> None:
    await db.execute(
        update(Credential)
        .where(Credential.id == credential_id)
        .values(key_id=key_id, nonce=nonce, ciphertext=ciphertext)
    )


def sealed_of(record: Credential) -> Sealed:
    """The record's ciphertext as the vault opens it."""
    return Sealed(key_id=record.key_id, nonce=record.nonce, ciphertext=record.ciphertext)
