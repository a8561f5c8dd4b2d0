"""Fixtures that start real things: a database (SQLite, and PostgreSQL when configured), a controller.

The whole run happens in a network namespace of its own: controllers create their sandbox network (a
gateway, a veth and a namespace per sandbox, nftables rules) in the namespace they run in, and a test
run must never touch the machine's own. Started in the machine's namespace, pytest starts itself again
in a fresh one (``unshare --net``) that holds only a loopback (with 127.0.0.2, for aioice, which skips
127.0.0.1) and dies with the run, taking every device the tests made with it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from browservm.store.database import Database

NETNS_MARK = "BROWSERVM_TEST_NETNS"

# Sandboxes run the guest image (docs/image.md); scripts/test.sh builds the tests' images here, outside the
# checkout. Controllers the tests start, in process or as `browservm serve`, find it through the variable.
TEST_IMAGE_DIR = Path(
    os.environ.get("BROWSERVM_TEST_IMAGE_DIR")
    or Path(os.environ.get("BROWSERVM_CACHE") or Path.home() / ".cache" / "browservm") / "test-images"
)
os.environ.setdefault("BROWSERVM_IMAGE_DIR", str(TEST_IMAGE_DIR))


def _in_initial_network_namespace() -> bool:
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return False


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(NETNS_MARK) == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "address", "add", "127.0.0.2/8", "dev", "lo"], check=False, capture_output=True)
        return
    if os.geteuid() != 0 or not _in_initial_network_namespace():
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()
    os.chdir(config.invocation_params.dir)
    os.environ[NETNS_MARK] = "1"
    argv = ["unshare", "--net", "--", sys.executable, "-m", "pytest", *config.invocation_params.args]
    os.execvp("unshare", argv)


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
        yield make_url(base_url).set(database=name).render_as_string(hide_password=False)
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
