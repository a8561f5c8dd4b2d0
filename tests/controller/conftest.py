"""A real controller on a loopback port, with the process sandbox backend, per test."""

from __future__ import annotations

import asyncio
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
from browservm.sandbox.base import SandboxHandle
from browservm.sandbox.process import ProcessBackend
from browservm.settings import Settings
from browservm.store import api_keys
from browservm.store.database import Database


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

    async def new_key(self, *, tenant: str = "default", name: str = "extra") -> str:
        db = Database(self.settings.effective_database_url)
        try:
            async with db.session() as s:
                _key, secret = await api_keys.create(s, name=name, tenant=tenant)
            return secret
        finally:
            await db.close()

    async def wait_status(self, session_id: str, *wanted: str, timeout_s: float = 60) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout_s
        body: dict[str, Any] = {}
        while asyncio.get_running_loop().time() < deadline:
            body = (await self.client.get(f"/v1/sessions/{session_id}")).json()
            if body["status"] in wanted:
                return body
            await asyncio.sleep(0.2)
        raise AssertionError(f"session never reached {wanted}; last: {body}")


def controller_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    port = free_port()
    values: dict[str, Any] = {
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
    }
    values.update(overrides)
    return Settings(**values)


async def run_controller(settings: Settings) -> AsyncIterator[Controller]:
    db = Database(settings.effective_database_url)
    await db.migrate()
    async with db.session() as s:
        _key, secret = await api_keys.create(s, name="test")
    await db.close()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=settings.port,
            log_config=None,
            lifespan="on",
            # Longer than any pause in a test, so a pooled connection is never closed under a request.
            timeout_keep_alive=120,
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    url = f"http://127.0.0.1:{settings.port}"
    client = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    try:
        yield Controller(url=url, key=secret, settings=settings, client=client)
    finally:
        await client.aclose()
        server.should_exit = True
        await task
        # A stopping controller leaves sandboxes running for the next one to adopt; tests clean up.
        backend = ProcessBackend(settings.state_dir)
        for orphan in await backend.list_orphans([]):
            await backend.destroy(
                SandboxHandle(sandbox_id=orphan, backend=backend.name, role="browser", runtime={})
            )
        shutil.rmtree(settings.state_dir, ignore_errors=True)


@pytest.fixture
async def controller(tmp_path: Path, database_url: str) -> AsyncIterator[Controller]:
    async for running in run_controller(controller_settings(tmp_path, database_url)):
        yield running
