"""A real controller on a loopback port, with the process sandbox backend, per test."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from browservm.controller.app import create_app
from browservm.controller.server import uvicorn_config
from browservm.controller.services import network_config
from browservm.sandbox.base import SandboxBackend
from browservm.sandbox.network import SandboxNetwork
from browservm.sandbox.process import ProcessBackend
from browservm.sandbox.qemu import QemuBackend
from browservm.settings import Settings
from browservm.store import api_keys
from browservm.store.database import Database
from browservm_client import AsyncClient, SessionEnded, WaitTimeout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Controller:
    url: str
    key: str
    settings: Settings
    client: httpx.AsyncClient
    """Raw HTTP with the key, for tests of the API's HTTP behaviour."""
    api: AsyncClient
    """The Python client with the key, for tests that use the API as an operator does."""

    async def new_key(self, *, tenant: str = "default", name: str = "extra") -> str:
        db = Database(self.settings.effective_database_url)
        try:
            async with db.session() as s:
                _key, secret = await api_keys.create(s, name=name, tenant=tenant)
            return secret
        finally:
            await db.close()

    async def wait_status(self, session_id: str, *wanted: str, timeout_s: float = 60) -> dict[str, Any]:
        """The session (as the API's JSON) once it has reached one of ``wanted``."""
        try:
            session = await self.api.sessions.wait(session_id, *wanted, timeout=timeout_s)
        except (WaitTimeout, SessionEnded) as exc:
            raise AssertionError(str(exc)) from exc
        return session.model_dump(mode="json")


def free_subnet() -> str:
    """A /24 of its own for each test controller's sandbox network (the run's namespace is shared)."""
    return f"10.{secrets.randbelow(150) + 100}.{secrets.randbelow(256)}.0/24"


def controller_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    port = free_port()
    turn_port = free_port()
    values: dict[str, Any] = {
        "sandbox_subnet": free_subnet(),
        "demo_oauth_port": free_port(),
        "guest_dns": [],
        # Guests reach nothing but their host's TURN (docs/network.md): WebRTC is relayed, as in production.
        "run_coturn": True,
        "turn_secret": secrets.token_urlsafe(16),
        "turn_urls": [
            f"turn:127.0.0.1:{turn_port}?transport=udp",
            f"turn:127.0.0.1:{turn_port}?transport=tcp",
        ],
        # Short on purpose: unix socket paths are limited to 107 bytes.
        "state_dir": Path(tempfile.mkdtemp(prefix="bvm-")),
        "database_url": database_url,
        "host": "127.0.0.1",
        "port": port,
        "max_sandboxes": 2,
        "max_queued_sessions": 4,
        "session_ttl_s": 120,
        "reconcile_interval_s": 1,
        "warm_pool_size": 0,  # sessions boot their own sandbox unless a test asks for the pool
        "devtools_debug_port": True,  # tests sign in by typing into the sandbox's page over DevTools
        "log_json": False,
        "log_level": "warning",
        # Longer than any pause in a test, so a pooled connection is never closed under a request.
        "http_keep_alive_s": 120,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def run_controller(settings: Settings, *, clean_up: bool = True) -> AsyncIterator[Controller]:
    """A controller in this process. ``clean_up=False`` leaves its sandboxes running when it stops, as
    a restarted controller finds them (the caller removes them in the end)."""
    db = Database(settings.effective_database_url)
    await db.migrate()
    async with db.session() as s:
        _key, secret = await api_keys.create(s, name="test")
    await db.close()
    # The limits `browservm serve` applies (server.uvicorn_config), with the values of these settings.
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings, lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    url = f"http://127.0.0.1:{settings.port}"
    client = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    api = AsyncClient(secret, base_url=url)
    try:
        yield Controller(url=url, key=secret, settings=settings, client=client, api=api)
    finally:
        await api.close()
        await client.aclose()
        server.should_exit = True
        await task
        if clean_up:
            await remove_everything(settings)


async def remove_everything(settings: Settings) -> None:
    """A stopping controller leaves sandboxes (and their network) running for the next one to adopt;
    a test leaves nothing."""
    backend: SandboxBackend = ProcessBackend(settings.state_dir)
    if settings.backend == "qemu":
        backend = QemuBackend(settings.state_dir)
    for orphan in await backend.list_orphans([]):
        await backend.destroy_orphan(orphan)
    network = SandboxNetwork(network_config(settings))
    for sandbox_id in await network.attached():
        await network.detach(sandbox_id)
    await network.remove_host()
    shutil.rmtree(settings.state_dir, ignore_errors=True)


@pytest.fixture
async def controller(tmp_path: Path, database_url: str) -> AsyncIterator[Controller]:
    async with run_controller(controller_settings(tmp_path, database_url)) as running:
        yield running
