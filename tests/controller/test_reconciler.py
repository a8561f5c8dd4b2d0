"""The reconciler at start-up: what runs on the host and what the database says are made to agree."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil
from sqlalchemy import delete

from browservm.controller.services import network_config
from browservm.sandbox.network import SandboxNetwork
from browservm.sandbox.process import MARKER_ENV
from browservm.store.database import Database
from browservm.store.models import CliVm, Sandbox
from tests.controller.conftest import controller_settings, remove_everything, run_controller


def marked(sandbox_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARKER_ENV) == str(sandbox_dir):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


async def forget(database_url: str, sandbox_id: str) -> None:
    """The sandbox's record is lost (a restore from an older backup, a hand-edited database)."""
    db = Database(database_url)
    try:
        async with db.session() as s:
            await s.execute(delete(CliVm).where(CliVm.sandbox_id == sandbox_id))
            await s.execute(delete(Sandbox).where(Sandbox.id == sandbox_id))
    finally:
        await db.close()


async def test_a_sandbox_the_database_lost_is_destroyed_whole_at_start(
    tmp_path: Path, database_url: str
) -> None:
    settings = controller_settings(tmp_path, database_url)
    try:
        async with run_controller(settings, clean_up=False) as controller:
            vm = await controller.api.cli_vms.create("alice")
        sandbox_dir = settings.state_dir / "sandboxes" / vm.sandbox_id
        netns = Path("/run/netns") / SandboxNetwork(network_config(settings)).netns_of(vm.sandbox_id)
        assert marked(sandbox_dir) and sandbox_dir.is_dir() and netns.exists(), "it outlives its controller"
        await forget(settings.effective_database_url, vm.sandbox_id)

        async with run_controller(settings) as _controller:
            async with asyncio.timeout(10):  # start-up's pass, or the first periodic one
                while marked(sandbox_dir) or sandbox_dir.exists() or netns.exists():
                    await asyncio.sleep(0.1)
    finally:
        await remove_everything(settings)
