"""``browservm sessions create``: the command line on the client, against a real controller."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from browservm_client import AsyncClient
from tests.controller.conftest import Controller, controller_settings, run_controller

BIN = Path(sys.executable).parent / "browservm"


@pytest.fixture
async def controller(tmp_path: Path, database_url: str) -> AsyncIterator[Controller]:
    async with run_controller(controller_settings(tmp_path, database_url, max_sandboxes=1)) as running:
        yield running


async def _browservm(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(BIN), *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def test_create_prints_the_session_and_wait_reports_how_it_ended(controller: Controller) -> None:
    env = {**os.environ, "BROWSERVM_URL": controller.url, "BROWSERVM_API_KEY": controller.key}
    created = await _browservm(env, "sessions", "create", "--user", "cli-user", "--provider", "demo")
    out, err = await created.communicate()
    assert created.returncode == 0, err
    session_id, status, provider, user = out.decode().splitlines()[0].split()
    assert (status, provider, user) == ("pending", "demo", "cli-user")
    assert f"viewer: {controller.url}/view/{session_id}?token=" in out.decode()
    async with AsyncClient(controller.key, base_url=controller.url) as api:
        await api.sessions.cancel(session_id)  # frees the host's one sandbox slot

    # --wait follows the session until it ends; a cancelled sign-in is a failure (exit 1) that says why.
    waiting = await _browservm(
        env, "sessions", "create", "--user", "cli-user", "--provider", "demo", "--wait"
    )
    assert waiting.stdout is not None
    waited_id = (await waiting.stdout.readline()).decode().split()[0]
    async with AsyncClient(controller.key, base_url=controller.url) as api:
        await api.sessions.wait(waited_id, "awaiting_user", timeout=60)
        await api.sessions.cancel(waited_id)
    _rest, err = await asyncio.wait_for(waiting.communicate(), timeout=30)
    assert waiting.returncode == 1
    assert f"session {waited_id} ended cancelled" in err.decode()


async def test_create_without_a_key_or_controller_says_what_to_do(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROWSERVM_")}
    env["BROWSERVM_STATE_DIR"] = str(tmp_path)
    no_key = await _browservm(env, "sessions", "create", "--user", "u", "--provider", "demo")
    _out, err = await no_key.communicate()
    assert no_key.returncode == 2 and "BROWSERVM_API_KEY" in err.decode()

    env |= {"BROWSERVM_API_KEY": "bvm_x", "BROWSERVM_URL": "http://127.0.0.1:9"}
    unreachable = await _browservm(env, "sessions", "create", "--user", "u", "--provider", "demo")
    _out, err = await unreachable.communicate()
    assert unreachable.returncode == 1 and "cannot reach" in err.decode() and "BROWSERVM_URL" in err.decode()

    wrong = await _browservm(env, "sessions", "create", "--user", "u", "--provider", "netscape")
    _out, err = await wrong.communicate()
    assert wrong.returncode == 2 and "claude_code" in err.decode()


async def test_cancel_on_the_host_ends_the_running_flow_and_frees_its_slot(controller: Controller) -> None:
    # The command line writes the database only; the running controller notices within a reconcile pass.
    env = {**os.environ, "BROWSERVM_DATABASE_URL": controller.settings.effective_database_url}
    async with AsyncClient(controller.key, base_url=controller.url) as api:
        first = await api.sessions.create(user_id="cli-user", provider="demo")
        await api.sessions.wait(first.id, "awaiting_user", timeout=60)
        cancel = await _browservm(env, "sessions", "cancel", first.id)
        out, err = await cancel.communicate()
        assert cancel.returncode == 0, err
        assert out.decode().strip() == f"cancelled {first.id}"
        # The host runs one sandbox: a second session starts only once the first one's flow let it go.
        second = await api.sessions.create(user_id="cli-user", provider="demo")
        started = await api.sessions.wait(second.id, "awaiting_user", timeout=60)
        assert started.sandbox_id != (await api.sessions.get(first.id)).sandbox_id
        metrics = (await controller.client.get("/metrics")).text
        assert 'browservm_reconcile_actions_total{action="flow_stopped"} 1.0' in metrics.splitlines()
        await api.sessions.cancel(second.id)
