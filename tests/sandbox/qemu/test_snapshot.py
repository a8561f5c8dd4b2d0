"""Sandboxes restored from one saved guest: each wakes up as that guest was (its memory, its boot), then is
a sandbox of its own (its id, its address on the sandbox network, the host's time), and nothing of the
saved guest's runs or stays attached while the snapshot waits."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from browservm.sandbox.base import SandboxHandle
from browservm.sandbox.qemu import QemuBackend
from browservm.sandbox.vm_network import tap_exists
from tests.sandbox.qemu.conftest import BOOT_TIMEOUT_S
from tests.support.commands import shell
from tests.support.network import BackendNetwork
from tests.support.qemu import qemu_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STATE = "cat /proc/sys/kernel/random/boot_id; cat /tmp/in-memory; date +%s; ip -4 -o address show dev eth0"


async def test_clones_of_one_snapshot_wake_as_it_was_then_each_takes_its_own_identity(
    qemu_backend: QemuBackend, network: BackendNetwork, state_dir: Path
) -> None:
    spec = await network.spec("tmpl", "cli", vcpus=1, memory_mib=512)
    started = time.monotonic()
    template = await qemu_backend.create(spec)
    channel = await qemu_backend.connect(template, timeout_s=BOOT_TIMEOUT_S)
    boot_s = time.monotonic() - started
    code, before = await shell(channel, "echo saved > /tmp/in-memory; " + STATE)
    assert code == 0, before
    await channel.close()

    snapshot = await qemu_backend.snapshot(template)
    saved = Path(snapshot.runtime["dir"])
    assert (saved / "vmstate").stat().st_size > 1024 * 1024
    assert not qemu_processes(state_dir), "the saved guest no longer runs"
    assert not await tap_exists(network.netns("tmpl"))
    assert not (state_dir / "qemu" / "tmpl").exists(), "its sandbox is gone; the snapshot stays"

    clones: list[SandboxHandle] = []
    restore_s = []
    try:
        for name in ("clone1", "clone2"):
            clone_spec = await network.spec(name, "cli", vcpus=1, memory_mib=512)
            started = time.monotonic()
            clone = await qemu_backend.restore(snapshot, clone_spec)
            clones.append(clone)
            channel = await qemu_backend.connect(clone, timeout_s=BOOT_TIMEOUT_S)
            restore_s.append(time.monotonic() - started)
            try:
                assert channel.hello.sandbox_id == name, "the agent speaks as the clone"
                code, after = await shell(channel, STATE)
                assert code == 0, after
                boot_id, memory, clock, address = after.splitlines()
                assert [boot_id, memory] == before.splitlines()[:2], "the saved guest's boot and memory"
                assert abs(int(clock) - time.time()) < 10, f"the guest's clock is the host's: {clock}"
                assert f" {clone_spec.network.address}/" in address, address
                assert await tap_exists(network.netns(name))
                # Its own address works on the sandbox network: the host's gateway answers it (refused:
                # nothing listens on the port), which it would not for the saved guest's address.
                code, output = await shell(
                    channel,
                    f"python3 -c \"import socket; socket.create_connection(('{network.gateway}', "
                    f'{network.web_port}), 5)" 2>&1 | tail -1',
                )
                assert "ConnectionRefusedError" in output, output
            finally:
                await channel.close()
            console = (state_dir / "qemu" / name / "console.log").read_text(errors="replace")
            assert "browservm-identity: applied: sandbox " + name in console
        assert len(qemu_processes(state_dir)) == 2
    finally:
        for clone in clones:
            await qemu_backend.destroy(clone)
    print(
        f"\nqemu (TCG) boot to hello {boot_s:.1f} s, restore to hello "
        + ", ".join(f"{s:.1f}" for s in restore_s)
        + f" s (ratio {boot_s / max(restore_s):.1f}x)"
    )
    assert not qemu_processes(state_dir)
    assert not [name for name in ("clone1", "clone2") if await tap_exists(network.netns(name))]
    assert saved.is_dir(), "destroying its clones leaves the snapshot"
    assert await qemu_backend.prune_snapshots() == ["tmpl"]
    assert not saved.exists()
