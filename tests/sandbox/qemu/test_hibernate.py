"""A CLI VM hibernates by QEMU's migration to a file and resumes from it: no QEMU and no TAP while it
sleeps, and afterwards the same running guest (its boot, its memory, its files), not a reboot, whose
clock the host sets again (it stood still while the VM slept)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from browservm.sandbox.base import Liveness, SandboxUnsupported
from browservm.sandbox.qemu import QemuBackend
from browservm.sandbox.vm_network import tap_exists
from tests.sandbox.qemu.conftest import BOOT_TIMEOUT_S
from tests.support.commands import shell
from tests.support.network import BackendNetwork
from tests.support.qemu import qemu_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STATE = "cat /proc/sys/kernel/random/boot_id; cat /tmp/in-memory; cat note.txt; cat /proc/uptime"


async def test_a_cli_vm_hibernates_to_a_file_and_resumes_as_the_same_guest(
    qemu_backend: QemuBackend, network: BackendNetwork, state_dir: Path
) -> None:
    spec = await network.spec("cli1", "cli", vcpus=1, memory_mib=512)
    netns = network.netns("cli1")
    handle = await qemu_backend.create(spec)
    channel = await qemu_backend.connect(handle, timeout_s=BOOT_TIMEOUT_S)
    # /tmp is a tmpfs: it survives only if the guest's memory does.
    code, before = await shell(channel, "echo ram > /tmp/in-memory; echo disk > note.txt; " + STATE)
    assert code == 0, before
    await channel.close()

    started = time.monotonic()
    asleep = await qemu_backend.hibernate(handle)
    hibernate_s = time.monotonic() - started
    snapshot = Path(asleep.runtime["dir"]) / "snapshot.vmstate"
    assert snapshot.stat().st_size > 1024 * 1024
    assert not qemu_processes(state_dir), "compute is released"
    assert not await tap_exists(netns)
    assert await qemu_backend.probe(asleep) is Liveness.HIBERNATED
    # A restarted controller sees the same from the stored runtime alone.
    assert await QemuBackend(state_dir).probe(asleep) is Liveness.HIBERNATED
    await asyncio.sleep(6)  # long enough for a clock left as it was saved to be seen behind

    started = time.monotonic()
    awake = await qemu_backend.resume(asleep)
    channel = await qemu_backend.connect(awake, timeout_s=BOOT_TIMEOUT_S)
    resume_s = time.monotonic() - started
    try:
        assert channel.hello.sandbox_id == "cli1"
        code, after = await shell(channel, STATE)
        assert code == 0, after
        boot_id, memory, disk, uptime = after.splitlines()
        assert [boot_id, memory, disk] == before.splitlines()[:3], "the same boot, memory and files"
        assert float(uptime.split()[0]) >= float(before.splitlines()[3].split()[0])
        code, clock = await shell(channel, "date +%s")
        assert abs(int(clock) - time.time()) < 4, f"the guest's clock is the host's again: {clock}"
        assert awake.runtime["network"] == handle.runtime["network"]
        assert await tap_exists(netns)
        # Its network works again: the host's gateway answers (refused: nothing listens on the port).
        code, output = await shell(
            channel,
            f"python3 -c \"import socket; socket.create_connection(('{network.gateway}', {network.web_port}), 5)\" "
            "2>&1 | tail -1",
        )
        assert "ConnectionRefusedError" in output, output
    finally:
        await channel.close()
    assert not snapshot.exists(), "the snapshot goes once the VM runs from it"
    print(
        f"\nqemu (TCG) hibernate {hibernate_s:.1f} s ({snapshot.name} was written), "
        f"resume to hello {resume_s:.1f} s"
    )
    await qemu_backend.destroy(awake)
    assert not qemu_processes(state_dir)
    assert not await tap_exists(netns)


async def test_a_browser_vm_does_not_hibernate(qemu_backend: QemuBackend, network: BackendNetwork) -> None:
    spec = await network.spec("br1", "browser", memory_mib=256)
    handle = await qemu_backend.create(spec)
    try:
        with pytest.raises(SandboxUnsupported):
            await qemu_backend.hibernate(handle)
    finally:
        await qemu_backend.destroy(handle)
