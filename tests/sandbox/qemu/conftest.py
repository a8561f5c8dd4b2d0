"""A QEMU backend booting the minimal image under TCG, and a check that a test left nothing behind."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from browservm.sandbox.image import BuildResult
from browservm.sandbox.qemu import QemuBackend
from browservm.sandbox.qemu.machine import VmImage
from tests.sandbox.image.conftest import image_caches, image_store, minimal_build
from tests.support.qemu import qemu_processes

__all__ = ["image_caches", "image_store", "minimal_build"]

BOOT_TIMEOUT_S = 240.0
"""Software emulation on a shared 2-core machine: ~15 s when quiet, several times that under load."""


@pytest.fixture
def vm_image(minimal_build: BuildResult) -> VmImage:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    image = minimal_build.image
    return VmImage(image.vmlinux, image.rootfs, image.initramfs)


@pytest.fixture
async def qemu_backend(state_dir: Path, vm_image: VmImage) -> AsyncIterator[QemuBackend]:
    backend = QemuBackend(state_dir, vm_image, accel="tcg")
    yield backend
    for sandbox_id in await QemuBackend(state_dir).list_orphans([]):
        await backend.destroy_orphan(sandbox_id)
    await backend.close()
    assert not qemu_processes(state_dir), "a test left QEMU running"
