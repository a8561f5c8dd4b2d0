"""The firecracker backend end to end against the stand-in VMM: a real process started in place of
firecracker, a real TAP in a network namespace of our own, the real guest agent as the guest, the channel
over the vsock CONNECT handshake, and every API request checked against v1.16.1's document."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from browservm import protocol
from browservm.sandbox import make_backend, vmhost
from browservm.sandbox.base import (
    Liveness,
    NetworkSpec,
    Resources,
    SandboxError,
    SandboxHandle,
    SandboxSpec,
    SandboxUnsupported,
)
from browservm.sandbox.channel import Channel
from browservm.sandbox.firecracker import host
from browservm.sandbox.firecracker.backend import FirecrackerBackend
from browservm.settings import Settings, SettingsError, load_settings
from tests.sandbox.firecracker.conftest import ImageFiles, Standin, links_in
from tests.support.commands import shell

BOOT_S = 30.0
JAILED_UID = 10000


def spec(sandbox_id: str, netns: str, **extra: object) -> SandboxSpec:
    network = NetworkSpec(
        address="10.232.0.2", mac="02:fc:0a:e8:00:02", netns=netns, gateway="10.232.0.1", prefix_len=32
    )
    extra.setdefault("resources", Resources(vcpus=1, memory_mib=256))
    return SandboxSpec(sandbox_id=sandbox_id, role="cli", network=network, **extra)  # type: ignore[arg-type]


@pytest.fixture
def settings(short_dir: Path, standin: Standin, image: ImageFiles) -> Settings:
    return load_settings(
        state_dir=short_dir / "s",
        database_url="",
        firecracker_bin=str(standin.binary),
        vm_kernel=image.kernel,
        vm_rootfs=image.rootfs,
        vm_initrd=image.initrd,
    )


@pytest.fixture
async def backend(settings: Settings) -> AsyncIterator[FirecrackerBackend]:
    backend = FirecrackerBackend(settings)
    yield backend
    for sandbox_id in await backend.list_orphans([]):
        await backend.destroy_orphan(sandbox_id)
    await backend.close()


def processes_under(directory: Path) -> list[psutil.Process]:
    """Every process whose command line names something in ``directory`` (VMMs and their guests)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(directory) in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


async def run(channel: Channel, command: str) -> bytes:
    _code, output = await shell(channel, command)
    return output.encode()


async def test_a_cli_vm_boots_says_hello_runs_a_command_and_destroy_leaves_nothing(
    backend: FirecrackerBackend, standin: Standin, netns: str, short_dir: Path
) -> None:
    handle = await backend.create(spec("sbx_one", netns, env={"EXTRA": "from the kernel command line"}))
    assert await backend.probe(handle) == Liveness.ALIVE
    assert {"tap0", "br0", "eth0"} <= set(links_in(netns))  # the TAP bridged with the uplink
    channel = await backend.connect(handle, timeout_s=BOOT_S)
    try:
        assert (channel.hello.sandbox_id, channel.hello.role) == ("sbx_one", "cli")
        assert await run(channel, 'echo "$EXTRA"') == b"from the kernel command line\n"
    finally:
        await channel.close()

    requests = standin.assert_all_valid()
    configured = [r["operation"] for r in requests if r["method"] != "GET"]
    assert configured == [
        "putMachineConfiguration", "putGuestBootSource", "putGuestDriveByID", "putGuestDriveByID",
        "putGuestNetworkInterfaceByID", "putGuestVsock", "putSerialDevice", "createSyncAction",
    ]  # fmt: skip
    body = {r["operation"]: r["body"] for r in requests if r["body"]}
    assert body["putMachineConfiguration"] == {"vcpu_count": 1, "mem_size_mib": 256}
    boot_args = body["putGuestBootSource"]["boot_args"]
    assert "ip=10.232.0.2::10.232.0.1:255.255.255.255::eth0:off" in boot_args
    assert "browservm.sandbox_id=sbx_one browservm.role=cli browservm.listen=vsock:1024" in boot_args
    assert body["putGuestNetworkInterfaceByID"] == {
        "iface_id": "eth0",
        "host_dev_name": "tap0",
        "guest_mac": "02:fc:0a:e8:00:02",
    }
    console = Path(handle.runtime["root"]) / "console.log"
    assert "booting" in console.read_text(), "the serial console goes to the sandbox's log"

    await backend.destroy(handle)
    assert await backend.probe(handle) == Liveness.GONE
    assert processes_under(short_dir) == [], "no VMM, no guest"
    assert "tap0" not in links_in(netns)
    assert not Path(handle.runtime["dir"]).exists()
    assert list((short_dir / "s" / "firecracker").iterdir()) == []
    await backend.destroy(handle)  # idempotent


async def test_hibernate_snapshots_and_resume_restores_the_vm_with_its_files(
    backend: FirecrackerBackend, standin: Standin, netns: str, short_dir: Path
) -> None:
    handle = await backend.create(spec("sbx_cli", netns))
    channel = await backend.connect(handle, timeout_s=BOOT_S)
    await channel.request(
        protocol.WriteFiles(files=[protocol.FileBlob(path=".codex/auth.json", content_b64="e30=")])
    )
    await channel.close()

    hibernated = await backend.hibernate(handle)
    assert await backend.probe(hibernated) == Liveness.HIBERNATED
    assert processes_under(short_dir) == [], "compute released"
    assert "tap0" not in links_in(netns)
    root = Path(hibernated.runtime["root"])
    assert (root / "snapshot" / "vm.state").is_file()
    assert (root / "snapshot" / "memory").stat().st_size == 256 * 1024 * 1024

    resumed = await backend.resume(hibernated)
    assert await backend.probe(resumed) == Liveness.ALIVE
    assert resumed.runtime["pid"] != handle.runtime["pid"]
    assert "tap0" in links_in(netns)
    assert not (root / "snapshot" / "memory").exists(), "the memory file goes once loaded"
    channel = await backend.connect(resumed, timeout_s=BOOT_S)
    try:
        assert await run(channel, "cat .codex/auth.json") == b"{}"
    finally:
        await channel.close()

    requests = standin.assert_all_valid()
    operations = [r["operation"] for r in requests if r["method"] != "GET"]
    assert operations[-3:] == ["patchVm", "createSnapshot", "loadSnapshot"]
    body = {r["operation"]: r["body"] for r in requests if r["body"]}
    assert body["patchVm"] == {"state": "Paused"}
    assert body["createSnapshot"]["snapshot_type"] == "Full"
    assert body["loadSnapshot"]["resume_vm"] is True
    assert body["loadSnapshot"]["mem_backend"]["backend_type"] == "File"

    await backend.destroy(resumed)
    assert processes_under(short_dir) == []
    assert not root.exists()


async def test_a_vm_nobody_knows_is_destroyed_from_its_id(
    backend: FirecrackerBackend, settings: Settings, netns: str, short_dir: Path
) -> None:
    handle = await backend.create(spec("sbx_lost", netns))
    await backend.close()
    restarted = FirecrackerBackend(settings)  # its record lost: only the id is known
    assert await restarted.list_orphans([]) == ["sbx_lost"]
    await restarted.destroy_orphan("sbx_lost")
    assert processes_under(short_dir) == []
    assert not Path(handle.runtime["dir"]).exists()
    assert await restarted.list_orphans([]) == []
    await restarted.destroy_orphan("sbx_lost")  # idempotent


async def test_a_restarted_controller_adopts_a_running_vm(
    backend: FirecrackerBackend, settings: Settings, netns: str, short_dir: Path
) -> None:
    handle = await backend.create(spec("sbx_adopt", netns))
    await backend.close()
    restarted = FirecrackerBackend(settings)
    adopted = SandboxHandle(handle.sandbox_id, "firecracker", "cli", dict(handle.runtime))
    assert await restarted.probe(adopted) == Liveness.ALIVE
    assert await restarted.list_orphans([]) == ["sbx_adopt"]
    assert await restarted.list_orphans(["sbx_adopt"]) == []
    channel = await restarted.connect(adopted, timeout_s=BOOT_S)
    await channel.close()
    await restarted.destroy(adopted)
    assert processes_under(short_dir) == []
    assert "tap0" not in links_in(netns)


async def test_what_is_missing_is_refused_before_anything_is_made(
    backend: FirecrackerBackend, settings: Settings, netns: str, short_dir: Path
) -> None:
    with pytest.raises(SandboxError, match=r"spec\.network has no netns"):
        await backend.create(
            SandboxSpec(sandbox_id="sbx_nonet", role="cli", network=NetworkSpec(address="10.0.0.2"))
        )
    no_image = FirecrackerBackend(
        settings.model_copy(update={"vm_kernel": short_dir / "nowhere" / "vmlinux"})
    )
    with pytest.raises(SandboxError, match=r"BROWSERVM_VM_KERNEL=.*does not exist.*browservm image build"):
        await no_image.create(spec("sbx_noimage", netns))
    with pytest.raises(SandboxError, match=r"names namespace .* but no gateway, mac"):
        await backend.create(
            SandboxSpec("sbx_gw", "cli", network=NetworkSpec(address="10.9.0.2", netns=netns))
        )
    assert (
        not (short_dir / "s" / "firecracker").exists()
        or list((short_dir / "s" / "firecracker").iterdir()) == []
    )
    assert "tap0" not in links_in(netns)


async def test_a_failure_after_the_vmm_started_takes_everything_back(
    backend: FirecrackerBackend, netns: str, short_dir: Path
) -> None:
    with pytest.raises(SandboxError, match=r"kernel command line would be .* over Firecracker's 2048"):
        await backend.create(spec("sbx_big", netns, env={"BIG": "x" * 2000}))
    assert processes_under(short_dir) == []
    assert "tap0" not in links_in(netns)
    assert list((short_dir / "s" / "firecracker").iterdir()) == []


async def test_a_vmm_that_dies_at_start_is_reported_with_its_log(
    settings: Settings, netns: str, short_dir: Path
) -> None:
    broken = short_dir / "broken-firecracker"
    broken.write_text("#!/bin/sh\necho 'Error: RunWithApi(FailedToBindSocket)' >&2\nexit 1\n")
    broken.chmod(0o755)
    backend = FirecrackerBackend(settings.model_copy(update={"firecracker_bin": str(broken)}))
    with pytest.raises(SandboxError, match="firecracker did not come up") as failed:
        await backend.create(spec("sbx_dead", netns))
    assert "FailedToBindSocket" in failed.value.detail
    assert "tap0" not in links_in(netns)
    assert list((short_dir / "s" / "firecracker").iterdir()) == []


async def test_browser_sandboxes_do_not_hibernate(backend: FirecrackerBackend) -> None:
    with pytest.raises(SandboxUnsupported, match="only CLI sandboxes hibernate"):
        await backend.hibernate(SandboxHandle("sbx_b", "firecracker", "browser", {}))


async def test_this_host_is_refused_at_start_with_the_reason(settings: Settings, short_dir: Path) -> None:
    """``BROWSERVM_BACKEND=firecracker`` checks the host when the backend is built, not at the first VM."""
    chosen = settings.model_copy(update={"backend": "firecracker"})
    found = host.inspect(chosen)
    assert found.binary == str(settings.firecracker_bin) and found.version == "v1.16.1"
    if found.ok:
        pytest.skip("this host can run Firecracker: nothing to refuse")
    with pytest.raises(
        SettingsError, match="BROWSERVM_BACKEND=firecracker cannot run on this host"
    ) as refused:
        make_backend(chosen)
    if vmhost.kvm_module() == "kvm_pvm":
        assert "PVM only (kvm_pvm)" in str(refused.value)
    missing = chosen.model_copy(update={"firecracker_bin": str(short_dir / "no-firecracker")})
    with pytest.raises(SettingsError, match="not found or not executable"):
        make_backend(missing)
    readiness = await FirecrackerBackend(chosen).readiness()
    assert not readiness.ready and found.problems[0] in readiness.detail


@pytest.fixture
def jailed_settings(settings: Settings, short_dir: Path, api_document: Path) -> Settings:
    jailer = short_dir / "bin" / "jailer"
    jailer.write_text(
        f"#!/bin/sh\nexec '{sys.executable}' '{Path(__file__).with_name('standin_jailer.py')}' \"$@\"\n"
    )
    jailer.chmod(0o755)
    return settings.model_copy(
        update={
            "firecracker_jailer_bin": str(jailer),
            "firecracker_jailer_uid": JAILED_UID,
            "firecracker_jailer_gid": JAILED_UID,
            "firecracker_chroot_base": short_dir / "jail",
        }
    )


async def test_a_jailed_vm_sees_only_its_chroot_and_leaves_nothing(
    jailed_settings: Settings, standin: Standin, netns: str, short_dir: Path, image: ImageFiles
) -> None:
    backend = FirecrackerBackend(jailed_settings)
    handle = await backend.create(spec("sbx_jail", netns))
    jail = short_dir / "jail" / "firecracker" / "sbx-jail"
    root = jail / "root"
    assert handle.runtime["root"] == str(root)
    assert (root / "vmlinux").stat().st_ino == image.kernel.stat().st_ino, "the image is linked, not copied"
    assert (root / "rootfs.ext4").stat().st_ino == image.rootfs.stat().st_ino
    assert image.kernel.stat().st_uid == 0, "linking into the jail does not give the image away"
    assert (root / "overlay.ext4").stat().st_uid == JAILED_UID
    assert stat.S_ISCHR((root / "dev" / "net" / "tun").stat().st_mode)
    owner = subprocess.run(
        ["ip", "netns", "exec", netns, "cat", "/sys/class/net/tap0/owner"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert owner.stdout.strip() == str(JAILED_UID), "the jailed firecracker may attach to its TAP"

    channel = await backend.connect(handle, timeout_s=BOOT_S)
    try:
        assert await run(channel, "echo jailed") == b"jailed\n"
    finally:
        await channel.close()
    body = {r["operation"]: r["body"] for r in standin.assert_all_valid() if r["body"]}
    assert body["putGuestBootSource"]["kernel_image_path"] == "/vmlinux"
    assert body["putGuestBootSource"]["initrd_path"] == "/initrd"
    assert body["putGuestVsock"]["uds_path"] == "/vsock.sock"
    assert body["putSerialDevice"]["serial_out_path"] == "/console.log"

    # A restart of the jailer in the same chroot: its /dev must go first (mknod refuses what exists).
    resumed = await backend.resume(await backend.hibernate(handle))
    assert await backend.probe(resumed) == Liveness.ALIVE
    standin.assert_all_valid()

    await backend.destroy(resumed)
    assert not jail.exists()
    assert not Path(handle.runtime["dir"]).exists()
    assert processes_under(short_dir) == []
    assert "tap0" not in links_in(netns)
