"""A controller with ``BROWSERVM_BACKEND=qemu``: a CLI VM made through the public API is a QEMU microVM
(TCG here) that runs commands, hibernates and resumes as a VM, and goes at delete."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from browservm.sandbox.image import BuildResult
from tests.controller.conftest import Controller, controller_settings, run_controller
from tests.sandbox.image.conftest import image_caches, image_store, minimal_build
from tests.support.qemu import qemu_processes

__all__ = ["image_caches", "image_store", "minimal_build"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
async def qemu_controller(tmp_path: Path, minimal_build: BuildResult) -> AsyncIterator[Controller]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    image = minimal_build.image
    settings = controller_settings(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'browservm.db'}",
        backend="qemu",
        qemu_accel="tcg",
        vm_kernel=image.vmlinux,
        vm_rootfs=image.rootfs,
        vm_initrd=image.initramfs,
        cli_memory_mib=512,
        sandbox_boot_timeout_s=240,
        run_coturn=False,
        turn_urls=[],
    )
    async with run_controller(settings) as running:
        yield running
    assert not qemu_processes(settings.state_dir)


async def test_a_cli_vm_through_the_api_is_a_qemu_vm_that_runs_commands_and_hibernates(
    qemu_controller: Controller,
) -> None:
    api = qemu_controller.api
    ready = (await qemu_controller.client.get("/readyz")).json()
    assert "QEMU" in ready["checks"]["backend"] and "TCG" in ready["checks"]["backend"], ready

    await api.cli_vms.create("dana")
    assert (await api.cli_vms.get("dana")).state == "running"
    (vm,) = qemu_processes(qemu_controller.settings.state_dir)
    assert vm.uids().real != 0

    result = await api.cli_vms.exec("dana", ["sh", "-c", "echo kept > note.txt; cat /proc/cmdline"])
    output = "".join(chunk.data for chunk in result.output)
    assert result.exit_code == 0, output
    assert "browservm.listen=serial:/dev/virtio-ports/org.browservm.agent" in output

    assert (await api.cli_vms.hibernate("dana")).state == "hibernated"
    assert not qemu_processes(qemu_controller.settings.state_dir)
    assert (await api.cli_vms.resume("dana")).state == "running"
    result = await api.cli_vms.exec("dana", ["cat", "note.txt"])
    assert "".join(chunk.data for chunk in result.output) == "kept\n"
    assert result.exit_code == 0

    await api.cli_vms.delete("dana")
    assert not qemu_processes(qemu_controller.settings.state_dir)
