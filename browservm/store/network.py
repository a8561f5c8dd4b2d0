"""Guest addresses on a host's sandbox network: leased to a sandbox, released when it is destroyed."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from browservm.store.models import NetworkLease


class AddressesExhausted(Exception):
    """Every guest address of the subnet is leased."""


async def lease(
    db: AsyncSession, *, scope: str, sandbox_id: str, subnet: ipaddress.IPv4Network
) -> ipaddress.IPv4Address:
    """The sandbox's address: the one it already holds, or the lowest free one of ``subnet`` (its first
    host address is the gateway's). The unique constraints make a race between two writers fail, not
    double-book: the caller retries."""
    held = (
        await db.execute(select(NetworkLease).where(NetworkLease.sandbox_id == sandbox_id))
    ).scalar_one_or_none()
    if held is not None:
        return ipaddress.IPv4Address(held.address)
    taken = set((await db.execute(select(NetworkLease.address).where(NetworkLease.scope == scope))).scalars())
    hosts = subnet.hosts()
    next(hosts)  # the gateway
    for address in hosts:
        if str(address) not in taken:
            db.add(NetworkLease(scope=scope, address=str(address), sandbox_id=sandbox_id))
            await db.flush()
            return address
    raise AddressesExhausted(f"all {subnet.num_addresses - 3} guest addresses of {subnet} are leased")


async def address_of(db: AsyncSession, sandbox_id: str) -> ipaddress.IPv4Address | None:
    """The address the sandbox holds, if any."""
    held = (
        await db.execute(select(NetworkLease.address).where(NetworkLease.sandbox_id == sandbox_id))
    ).scalar_one_or_none()
    return ipaddress.IPv4Address(held) if held is not None else None


async def release(db: AsyncSession, sandbox_id: str) -> None:
    await db.execute(delete(NetworkLease).where(NetworkLease.sandbox_id == sandbox_id))


async def leases(db: AsyncSession, scope: str) -> Sequence[NetworkLease]:
    return list((await db.execute(select(NetworkLease).where(NetworkLease.scope == scope))).scalars())
