"""The warm pool: a session takes a browser sandbox that is already up, the pool refills within the
host's capacity, never at a waiting session's or a CLI VM's expense, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from browservm.controller.services import Services
from browservm.sandbox.process import ProcessBackend
from tests.controller.conftest import Controller, controller_settings, run_controller
from tests.controller.demo_login import sign_in
from tests.support.warm_pool import sandboxes_in, wait_warm

pytestmark = pytest.mark.browser


def metric(controller_metrics: str, line_start: str) -> float:
    for line in controller_metrics.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def metrics(controller: Controller) -> str:
    return (await controller.client.get("/metrics")).text


async def test_a_session_takes_the_warm_sandbox_and_the_pool_refills(
    tmp_path: Path, database_url: str
) -> None:
    settings = controller_settings(tmp_path, database_url, warm_pool_size=1, max_sandboxes=3)
    url = settings.effective_database_url
    async with run_controller(settings) as controller:
        (warm,) = await wait_warm(url)
        created = await controller.client.post("/v1/sessions", json={"user_id": "ada", "provider": "demo"})
        waiting = await controller.wait_status(created.json()["id"], "awaiting_user", "failed")
        assert waiting["status"] == "awaiting_user", waiting["reason"]
        assert waiting["sandbox_id"] == warm, "the session should run in the sandbox that was warm"
        assert metric(await metrics(controller), 'browservm_warm_pool_takes_total{result="hit"}') == 1

        (refilled,) = await wait_warm(url)
        assert refilled != warm, "each warm sandbox serves one session"
        await asyncio.sleep(2.5)  # two passes of the reconciler (every second here): warm is not leaked
        assert await sandboxes_in(url, "ready") == [refilled]

        done = await sign_in(controller, waiting["id"], "ada@example.com")
        assert done["account"]["email"] == "ada@example.com"
        async with asyncio.timeout(10):
            while warm not in await sandboxes_in(url, "destroyed"):
                await asyncio.sleep(0.1)
        assert await sandboxes_in(url, "ready") == [refilled]


async def test_the_pool_yields_slots_to_cli_vms_and_waiting_sessions(
    tmp_path: Path, database_url: str
) -> None:
    settings = controller_settings(tmp_path, database_url, warm_pool_size=1, max_sandboxes=2)
    url = settings.effective_database_url
    async with run_controller(settings) as controller:
        client = controller.client
        (warm,) = await wait_warm(url)
        assert (await client.post("/v1/users/alice/cli-vm")).status_code == 201  # the free slot
        # The host is full; the second CLI VM gets the warm sandbox's slot instead of a 429.
        bob = await client.post("/v1/users/bob/cli-vm")
        assert bob.status_code == 201, bob.text
        assert warm in await sandboxes_in(url, "destroyed")
        assert metric(await metrics(controller), 'browservm_warm_pool_takes_total{result="reclaimed"}') == 1

        # Full with two CLI VMs: a session waits, and the pool does not compete for the next free slot.
        created = (await client.post("/v1/sessions", json={"user_id": "ada", "provider": "demo"})).json()
        await asyncio.sleep(1.0)
        assert (await client.get(f"/v1/sessions/{created['id']}")).json()["status"] == "pending"
        assert (await client.delete("/v1/users/bob/cli-vm")).status_code == 204
        waiting = await controller.wait_status(created["id"], "awaiting_user", "failed")
        assert waiting["status"] == "awaiting_user", waiting["reason"]
        assert await sandboxes_in(url, "ready") == [], "no slot was free for the pool"

        # The session ends: its slot frees, and the pool takes it again.
        assert (await client.post(f"/v1/sessions/{created['id']}/cancel")).status_code == 200
        await wait_warm(url)


async def test_stopping_the_controller_destroys_the_warm_sandboxes(tmp_path: Path, database_url: str) -> None:
    settings = controller_settings(tmp_path, database_url, warm_pool_size=1, max_sandboxes=2)
    try:
        services = await Services.start(settings)
        try:
            (warm,) = await wait_warm(settings.effective_database_url)
            assert services.capacity.spare == 1 and services.capacity.in_use == 1
        finally:
            await services.stop()
        assert await ProcessBackend(settings.state_dir).list_orphans([]) == []
        assert await sandboxes_in(settings.effective_database_url, "destroyed") == [warm]
    finally:
        shutil.rmtree(settings.state_dir, ignore_errors=True)
