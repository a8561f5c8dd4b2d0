"""Fixtures that start real things: a database (SQLite, and PostgreSQL when configured), a controller."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from browservm.store.database import Database

POSTGRES_URL = os.environ.get("BROWSERVM_TEST_POSTGRES_URL", "")
REQUIRE_POSTGRES = os.environ.get("BROWSERVM_REQUIRE_POSTGRES") == "1"


def _postgres_param() -> object:
    if POSTGRES_URL or REQUIRE_POSTGRES:
        return pytest.param("postgres", marks=pytest.mark.postgres)
    return pytest.param(
        "postgres",
        marks=pytest.mark.skip(
            reason="set BROWSERVM_TEST_POSTGRES_URL (scripts/test.sh does) to run on PostgreSQL"
        ),
    )


@pytest.fixture(params=["sqlite", _postgres_param()])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'browservm.db'}"
        return
    if not POSTGRES_URL:
        pytest.fail("BROWSERVM_REQUIRE_POSTGRES=1 but BROWSERVM_TEST_POSTGRES_URL is not set")
    yield from _fresh_postgres(POSTGRES_URL)


def _fresh_postgres(base_url: str) -> Iterator[str]:
    import asyncio

    import asyncpg  # type: ignore[import-untyped]

    name = f"bvm_test_{secrets.token_hex(6)}"
    admin = base_url.replace("postgresql+asyncpg://", "postgresql://")

    async def run(sql: str) -> None:
        connection = await asyncpg.connect(admin)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    try:
        yield base_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    db = Database(database_url)
    await db.migrate()
    try:
        yield db
    finally:
        await db.close()
