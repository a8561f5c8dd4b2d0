"""The QEMU backend for real: the minimal image boots under TCG in a microVM on the sandbox network, its
agent says hello over the virtio-serial channel, runs commands, and everything goes at destroy, also
after the controller's side was lost (a kill -9 is a backend object dropped without a word)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from browservm.sandbox.base import Liveness, SandboxBootTimeout, SandboxError, SandboxHandle
from browservm.sandbox.qemu import QemuBackend
from browservm.sandbox.qemu.machine import VmImage
from tests.sandbox.qemu.conftest import BOOT_TIMEOUT_S
from tests.support.commands import shell
from tests.support.network import BackendNetwork
from tests.support.qemu import qemu_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def links(netns: str) -> dict[str, dict[str, object]]:
    out = subprocess.run(
        ["ip", "-n", netns, "-j", "-d", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {link["ifname"]: link for link in json.loads(out)}


async def test_a_vm_boots_says_hello_runs_a_command_and_is_destroyed(
    qemu_backend: QemuBackend, network: BackendNetwork, state_dir: Path
) -> None:
    spec = await network.spec("vm1", "cli", vcpus=1, memory_mib=512)
    netns = network.netns("vm1")
    assert set(links(netns)) == {"lo", "eth0"}
    started = time.monotonic()
    handle = await qemu_backend.create(spec)
    # The TAP and the bridge that joins it to the host's link, nothing with an address.
    found = links(netns)
    assert {"tap0", "br0", "eth0"} <= set(found)
    assert found["tap0"]["master"] == "br0" and found["eth0"]["master"] == "br0"
    assert found["eth0"]["address"] != spec.network.mac
    addresses = subprocess.run(
        ["ip", "-n", netns, "-4", "-o", "address"], capture_output=True, text=True, check=True
    ).stdout
    assert [line.split()[1] for line in addresses.splitlines()] == ["lo"]
    # QEMU runs as the sandbox's own unprivileged user, in its network namespace.
    (process,) = qemu_processes(state_dir)
    assert process.pid == handle.runtime["pid"]
    assert process.uids().real == process.uids().effective == handle.runtime["config"]["uid"] >= 2_000_000_000
    assert Path(f"/proc/{process.pid}/ns/net").stat().st_ino == Path(f"/run/netns/{netns}").stat().st_ino
    assert await qemu_backend.probe(handle) is Liveness.ALIVE

    # A wait that gives up early says so with what the console shows, and spoils nothing for the next.
    with pytest.raises(SandboxBootTimeout) as early:
        await qemu_backend.connect(handle, timeout_s=0.5)
    assert early.value.detail
    channel = await qemu_backend.connect(handle, timeout_s=BOOT_TIMEOUT_S)
    boot_s = time.monotonic() - started
    try:
        assert channel.hello.sandbox_id == "vm1"
        assert channel.hello.role == "cli"
        code, output = await shell(
            channel, "id -un; cat /proc/cmdline; cat /proc/net/fib_trie /proc/net/route"
        )
        assert code == 0, output
        lines = output.splitlines()
        assert lines[0] == "user"
        assert "browservm.sandbox_id=vm1" in lines[1]
        assert f"|-- {spec.network.address}" in output
        gateway_hex = "".join(f"{int(part):02X}" for part in reversed(network.gateway.split(".")))
        assert any(
            line.split()[1:3] == ["00000000", gateway_hex] for line in lines if line.startswith("eth0")
        )
        # The guest's virtio NIC carries its address and MAC on the host's link, where the host's policy
        # lets it reach the test's web port on the gateway (nothing listens: refused, not dropped).
        code, output = await shell(
            channel,
            f"python3 -c \"import socket; socket.create_connection(('{network.gateway}', {network.web_port}), 5)\" "
            "2>&1 | tail -1",
        )
        assert "ConnectionRefusedError" in output, output
        neighbours = subprocess.run(
            ["ip", "-j", "neigh", "show", "dev", network.network.interface_of("vm1")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert {"dst": spec.network.address, "lladdr": spec.network.mac} in [
            {"dst": entry.get("dst"), "lladdr": entry.get("lladdr")} for entry in json.loads(neighbours)
        ]
        # ...and nothing else: another private address is dropped (a timeout, not a refusal).
        code, output = await shell(
            channel,
            "python3 -c \"import socket; socket.create_connection(('10.99.99.99', 80), 2)\" 2>&1 | tail -1",
        )
        assert "TimeoutError" in output or "timed out" in output, output
        console = Path(handle.runtime["dir"], "console.log").read_text()
        assert "browservm-init: starting the agent: sandbox vm1, role cli" in console
    finally:
        await channel.close()
    print(f"\nqemu (TCG): create to hello {boot_s:.1f} s")

    await qemu_backend.destroy(handle)
    assert not qemu_processes(state_dir)
    assert set(links(netns)) >= {"lo", "eth0"} and "tap0" not in links(netns)
    assert not Path(handle.runtime["dir"]).exists()
    assert await qemu_backend.probe(handle) is Liveness.GONE
    await qemu_backend.destroy(handle)  # idempotent


async def test_a_lost_controller_side_is_adopted_then_its_orphan_removed_whole(
    qemu_backend: QemuBackend, network: BackendNetwork, state_dir: Path, vm_image: VmImage
) -> None:
    spec = await network.spec("vm2", "cli", vcpus=1, memory_mib=512)
    netns = network.netns("vm2")
    first = QemuBackend(state_dir, vm_image, accel="tcg")
    handle = await first.create(spec)
    channel = await first.connect(handle, timeout_s=BOOT_TIMEOUT_S)
    assert (await shell(channel, "echo kept > note.txt"))[0] == 0
    # kill -9 of the controller, as the guest sees it: the host end of its port closes, and nothing is
    # destroyed; the VM runs on in its own session.
    await channel.close()
    del first, channel

    # A restarted controller adopts it from the stored runtime...
    second = QemuBackend(state_dir, vm_image, accel="tcg")
    assert await second.probe(SandboxHandle("vm2", "qemu", "cli", dict(handle.runtime))) is Liveness.ALIVE
    channel = await second.connect(SandboxHandle("vm2", "qemu", "cli", dict(handle.runtime)), timeout_s=60)
    assert await shell(channel, "cat note.txt") == (0, "kept\n")
    await channel.close()

    # ...or, knowing nothing of it, finds it as an orphan and removes all it held.
    third = QemuBackend(state_dir)
    assert await third.list_orphans([]) == ["vm2"]
    assert await third.list_orphans(["vm2"]) == []
    vm_dir = Path(handle.runtime["dir"])
    assert {p.name for p in vm_dir.iterdir()} >= {"overlay.ext4", "channel.sock", "qmp.sock", "console.log"}
    await third.destroy_orphan("vm2")
    assert not qemu_processes(state_dir)
    assert (
        not psutil.pid_exists(handle.runtime["pid"])
        or psutil.Process(handle.runtime["pid"]).status() == "zombie"
    )
    assert "tap0" not in links(netns)
    assert not vm_dir.exists()
    assert await third.list_orphans([]) == []


async def test_a_vm_that_cannot_start_fails_with_qemus_words_and_leaves_nothing(
    qemu_backend: QemuBackend, network: BackendNetwork, state_dir: Path, vm_image: VmImage, tmp_path: Path
) -> None:
    not_a_kernel = tmp_path / "vmlinux"
    not_a_kernel.write_text("not a kernel\n")
    backend = QemuBackend(state_dir, VmImage(not_a_kernel, vm_image.rootfs, vm_image.initrd), accel="tcg")
    spec = await network.spec("vm3", "browser", memory_mib=256)
    with pytest.raises(SandboxError) as failed:
        await backend.create(spec)
    assert "cannot start the VM" in str(failed.value)
    assert "qemu" in failed.value.detail.lower(), failed.value.detail
    assert not qemu_processes(state_dir)
    assert "tap0" not in links(network.netns("vm3"))
    assert not (state_dir / "qemu" / "vm3").exists()
