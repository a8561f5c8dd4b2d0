"""The ``firecracker`` backend: each sandbox is a Firecracker microVM booted from the guest image.

Glue between :class:`~browservm.sandbox.base.SandboxBackend` and :mod:`.microvm`: a sandbox owns
``state_dir/firecracker/<id>/`` (the VMM's log and, unjailed, the VM's files under ``vm/``), a TAP in its
network namespace, and one firecracker process. The guest boots the image's ``vmlinux`` with the image's
ext4 as a read-only root and a per-sandbox overlay drive; its agent listens on vsock port
:data:`AGENT_VSOCK_PORT` and the controller reaches it through Firecracker's vsock socket.

What the guest needs to know arrives on its kernel command line (never by editing its disk):
``ip=`` (its address and gateway), ``browservm.sandbox_id``, ``browservm.role``, ``browservm.listen``
(``vsock:<port>``), ``browservm.overlay`` (the writable drive) and ``browservm.env`` (the agent's extra
environment, base64url of a JSON object). The guest image's init reads them from ``/proc/cmdline``.

``handle.runtime`` is a :class:`~.runtime.FirecrackerRuntime`: the directory, the jail, the pid and start
time, the network and whether the sandbox is hibernated: enough to probe, adopt and destroy it after a
controller restart.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import structlog

from browservm import protocol
from browservm.cleanup import Cleanup
from browservm.sandbox import vmhost
from browservm.sandbox.base import (
    BackendReadiness,
    Liveness,
    SandboxBackend,
    SandboxBootTimeout,
    SandboxError,
    SandboxHandle,
    SandboxSpec,
    SandboxUnsupported,
)
from browservm.sandbox.channel import Channel
from browservm.sandbox.disk import DiskError, create_overlay
from browservm.sandbox.firecracker import host
from browservm.sandbox.firecracker.client import FirecrackerError
from browservm.sandbox.firecracker.definitions import (
    BootSource,
    Drive,
    MachineConfiguration,
    NetworkInterface,
    SerialDevice,
    Vsock,
)
from browservm.sandbox.firecracker.jailer import Jailer
from browservm.sandbox.firecracker.microvm import (
    API_SOCKET,
    CONSOLE,
    JAILED_INITRD,
    JAILED_KERNEL,
    JAILED_ROOTFS,
    OVERLAY,
    VSOCK_SOCKET,
    MicroVM,
    VmConfig,
    VmLayout,
    instance_id,
)
from browservm.sandbox.firecracker.network import VmNetwork, attach_tap, detach_tap, network_of
from browservm.sandbox.firecracker.runtime import AGENT_VSOCK_PORT, FirecrackerRuntime
from browservm.sandbox.firecracker.vsock import VsockConnectError, connect_vsock
from browservm.settings import Settings, SettingsError

log = structlog.get_logger(__name__)

SANDBOX_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
GUEST_CID = 3
"""Firecracker's vsock is emulated per VM, not registered with the host kernel: every VM can be CID 3."""
API_READY_S = 10.0
KERNEL_CMDLINE_MAX = 2048
"""Firecracker's limit for the kernel command line on x86_64."""
BASE_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"
"""Serial console to the per-sandbox log; a guest panic ends the VM instead of hanging it."""


@dataclasses.dataclass(frozen=True, slots=True)
class BootFiles:
    kernel: Path
    rootfs: Path
    initrd: Path | None

    @classmethod
    def from_settings(cls, settings: Settings) -> BootFiles:
        """The image's files, or an error saying which is missing and how to get it."""
        problems = []
        for name, path in (
            ("BROWSERVM_VM_KERNEL", settings.vm_kernel),
            ("BROWSERVM_VM_ROOTFS", settings.vm_rootfs),
        ):
            if path is None:
                problems.append(f"{name} is not set")
            elif not path.is_file():
                problems.append(f"{name}={path} does not exist")
        if settings.vm_initrd is not None and not settings.vm_initrd.is_file():
            problems.append(f"BROWSERVM_VM_INITRD={settings.vm_initrd} does not exist")
        if problems:
            raise FileNotFoundError(
                "the guest image is missing: "
                + "; ".join(problems)
                + ". Build it with `browservm image build` "
                "and point BROWSERVM_VM_KERNEL (its uncompressed vmlinux), BROWSERVM_VM_ROOTFS (its ext4) "
                "and BROWSERVM_VM_INITRD at it"
            )
        assert settings.vm_kernel is not None and settings.vm_rootfs is not None
        return cls(kernel=settings.vm_kernel, rootfs=settings.vm_rootfs, initrd=settings.vm_initrd)


class FirecrackerBackend(SandboxBackend):
    name = "firecracker"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.firecracker = vmhost.resolve(settings.firecracker_bin) or settings.firecracker_bin
        self.jailer: Jailer | None = None
        if settings.firecracker_jailer_bin:
            assert settings.firecracker_jailer_uid is not None and settings.firecracker_jailer_gid is not None
            self.jailer = Jailer(
                binary=vmhost.resolve(settings.firecracker_jailer_bin) or settings.firecracker_jailer_bin,
                uid=settings.firecracker_jailer_uid,
                gid=settings.firecracker_jailer_gid,
                chroot_base=settings.firecracker_chroot_base,
            )
        self._vms: dict[str, MicroVM] = {}
        """VMs this controller started: their processes are reaped when they exit."""

    @classmethod
    def from_settings(cls, settings: Settings) -> FirecrackerBackend:
        """The backend for ``BROWSERVM_BACKEND=firecracker``; refuses a host that cannot run it."""
        found = host.inspect(settings)
        if not found.ok:
            raise SettingsError(
                "BROWSERVM_BACKEND=firecracker cannot run on this host:\n  - "
                + "\n  - ".join(found.problems)
                + "\nsee docs/firecracker.md, or use BROWSERVM_BACKEND=qemu or process"
            )
        return cls(settings)

    @property
    def sandboxes_dir(self) -> Path:
        return self.settings.state_dir / "firecracker"

    # ------------------------------------------------------------------ layout

    def _layout(self, sandbox_id: str) -> VmLayout:
        sandbox_dir = self.sandboxes_dir / sandbox_id
        if self.jailer is None:
            return VmLayout.unjailed(sandbox_dir)
        return VmLayout.jailed(sandbox_dir, self.jailer.jail_dir(self.firecracker, instance_id(sandbox_id)))

    def _vm(self, handle: SandboxHandle) -> MicroVM:
        if not handle.recorded:
            return self._found_vm(handle.sandbox_id)
        return self._vm_of(handle.sandbox_id, handle.runtime_as(FirecrackerRuntime))

    def _vm_of(self, sandbox_id: str, runtime: FirecrackerRuntime) -> MicroVM:
        vm = self._vms.get(sandbox_id)
        if vm is not None and vm.pid == runtime.pid:
            return vm
        return MicroVM(
            sandbox_id,
            runtime.layout,
            firecracker=self.firecracker,
            netns=runtime.network.netns,
            jailer=self.jailer,
            pid=runtime.pid,
            start_time=runtime.start_time,
        )

    def _found_vm(self, sandbox_id: str) -> MicroVM:
        """A VM known by its id alone: where its files are; its VMM is found by its command line."""
        layout = self._layout(self._checked_id(sandbox_id))
        return MicroVM(sandbox_id, layout, firecracker=self.firecracker, netns="", jailer=self.jailer)

    def _checked_id(self, sandbox_id: str) -> str:
        if not SANDBOX_ID.fullmatch(sandbox_id):
            raise SandboxError(
                sandbox_id, "a sandbox id must be 1-64 letters, digits, '_' or '-' (it names a directory)"
            )
        return sandbox_id

    # ------------------------------------------------------------------ the guest's configuration

    def _boot_args(self, spec: SandboxSpec, network: VmNetwork) -> str:
        env = base64.urlsafe_b64encode(json.dumps(dict(spec.env), separators=(",", ":")).encode()).decode()
        args = " ".join(
            [
                BASE_BOOT_ARGS,
                network.kernel_ip_arg(),
                f"browservm.sandbox_id={spec.sandbox_id}",
                f"browservm.role={spec.role}",
                f"browservm.listen=vsock:{AGENT_VSOCK_PORT}",
                "browservm.overlay=/dev/vdb",
                f"browservm.env={env}",
            ]
        )
        if len(args) >= KERNEL_CMDLINE_MAX:
            raise SandboxError(
                spec.sandbox_id,
                f"the kernel command line would be {len(args)} bytes, over Firecracker's {KERNEL_CMDLINE_MAX}: "
                "pass less in spec.env (large values belong on the channel)",
            )
        return args

    def _config(self, spec: SandboxSpec, network: VmNetwork, image: BootFiles, layout: VmLayout) -> VmConfig:
        vcpus, memory = spec.resources.vcpus, spec.resources.memory_mib
        jailed = layout.jail_dir is not None
        kernel = layout.vmm(JAILED_KERNEL) if jailed else str(image.kernel)
        rootfs = layout.vmm(JAILED_ROOTFS) if jailed else str(image.rootfs)
        initrd = None
        if image.initrd is not None:
            initrd = layout.vmm(JAILED_INITRD) if jailed else str(image.initrd)
        return VmConfig(
            machine=MachineConfiguration(vcpu_count=vcpus, mem_size_mib=memory),
            boot_source=BootSource(
                kernel_image_path=kernel, initrd_path=initrd, boot_args=self._boot_args(spec, network)
            ),
            drives=[
                # Root first: Firecracker appends `root=/dev/vda ro` to the command line for it.
                Drive(drive_id="rootfs", is_root_device=True, is_read_only=True, path_on_host=rootfs),
                Drive(
                    drive_id="overlay",
                    is_root_device=False,
                    is_read_only=False,
                    path_on_host=layout.vmm(OVERLAY),
                ),
            ],
            interfaces=[NetworkInterface(iface_id="eth0", host_dev_name=network.tap, guest_mac=network.mac)],
            vsock=Vsock(guest_cid=GUEST_CID, uds_path=layout.vmm(VSOCK_SOCKET)),
            serial=SerialDevice(serial_out_path=layout.vmm(CONSOLE)),
        )

    def _jail_links(self, image: BootFiles) -> dict[str, Path]:
        links = {JAILED_KERNEL: image.kernel, JAILED_ROOTFS: image.rootfs}
        if image.initrd is not None:
            links[JAILED_INITRD] = image.initrd
        return links

    def _owner(self) -> tuple[int, int] | None:
        return (self.jailer.uid, self.jailer.gid) if self.jailer is not None else None

    # ------------------------------------------------------------------ lifecycle

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        sandbox_id = self._checked_id(spec.sandbox_id)
        network = network_of(spec)
        named = spec.image
        try:
            if named is not None and named.kernel is not None and named.rootfs is not None:
                image = BootFiles(named.kernel, named.rootfs, named.initrd)
            else:
                image = BootFiles.from_settings(self.settings)
        except FileNotFoundError as exc:
            raise SandboxError(sandbox_id, str(exc)) from exc
        layout = self._layout(sandbox_id)
        if too_long := layout.too_long():
            raise SandboxError(
                sandbox_id,
                f"socket path {too_long[0]} is longer than a unix socket takes (107 bytes): use a shorter "
                "BROWSERVM_STATE_DIR" + (" or BROWSERVM_FIRECRACKER_CHROOT_BASE" if self.jailer else ""),
            )
        for existing in (layout.dir, layout.jail_dir):
            if existing is not None and existing.exists():
                raise SandboxError(sandbox_id, f"{existing} already exists: destroy that sandbox first")
        started = time.monotonic()
        detail = ""

        def keep_logs() -> None:
            nonlocal detail
            detail = layout.logs_tail()

        try:
            async with Cleanup("firecracker.undo_failed", sandbox_id=sandbox_id) as undo:
                layout.dir.mkdir(parents=True, mode=0o700)
                undo.push(asyncio.to_thread, shutil.rmtree, layout.dir, ignore_errors=True)
                if layout.jail_dir is not None:
                    undo.push(asyncio.to_thread, shutil.rmtree, layout.jail_dir, ignore_errors=True)
                layout.root.mkdir(parents=True, exist_ok=True)
                undo.callback(keep_logs)  # before the directories go
                await create_overlay(layout.host(OVERLAY), spec.resources.disk_mib)
                if self.jailer is not None:
                    await asyncio.to_thread(self.jailer.prepare, layout.root, self._jail_links(image))
                # Registered first: a TAP half made is removed too.
                undo.push(detach_tap, sandbox_id, network.netns, network.tap)
                await attach_tap(sandbox_id, network, owner=self._owner())
                vm = MicroVM(
                    sandbox_id, layout, firecracker=self.firecracker, netns=network.netns, jailer=self.jailer
                )
                undo.push(self._stop, sandbox_id, vm)
                await vm.launch(API_READY_S)
                self._vms[sandbox_id] = vm
                handle = SandboxHandle.of(
                    sandbox_id, self.name, spec.role, FirecrackerRuntime.of(layout, network, vm)
                )
                await vm.boot(self._config(spec, network, image, layout))
                undo.keep()
        except (FirecrackerError, DiskError, OSError) as exc:
            raise SandboxError(sandbox_id, f"cannot create the microVM: {exc}", detail=detail) from exc
        log.info(
            "sandbox.started",
            sandbox_id=sandbox_id,
            backend=self.name,
            after_s=round(time.monotonic() - started, 3),
        )
        return handle

    async def connect(self, handle: SandboxHandle, *, timeout_s: float) -> Channel:
        vm = self._vm(handle)
        layout = vm.layout
        if not vm.alive():
            raise SandboxError(handle.sandbox_id, "the microVM is not running", detail=layout.logs_tail())
        deadline = time.monotonic() + timeout_s
        try:
            reader, writer = await connect_vsock(
                layout.host(VSOCK_SOCKET),
                handle.runtime_as(FirecrackerRuntime).vsock_port,
                timeout_s=timeout_s,
                alive=vm.alive,
            )
        except TimeoutError as exc:
            raise SandboxBootTimeout(handle.sandbox_id, timeout_s, layout.logs_tail()) from exc
        except VsockConnectError as exc:
            raise SandboxError(handle.sandbox_id, str(exc), detail=layout.logs_tail()) from exc
        try:
            return await asyncio.wait_for(
                Channel.handshake(handle.sandbox_id, reader, writer), max(0.0, deadline - time.monotonic())
            )
        except TimeoutError as exc:
            writer.close()
            raise SandboxBootTimeout(handle.sandbox_id, timeout_s, layout.logs_tail()) from exc
        except (protocol.ProtocolError, ConnectionError, Exception) as exc:
            writer.close()
            raise SandboxError(
                handle.sandbox_id, f"the guest agent's handshake failed: {exc}", detail=layout.logs_tail()
            ) from exc

    async def destroy(self, handle: SandboxHandle) -> None:
        if not handle.recorded:
            await self.destroy_orphan(handle.sandbox_id)
            return
        runtime = handle.runtime_as(FirecrackerRuntime)
        await self._remove(handle.sandbox_id, self._vm_of(handle.sandbox_id, runtime), runtime.network)

    async def destroy_orphan(self, sandbox_id: str) -> None:
        """From its id: its directory and jail, and any VMM whose command line names them. Its TAP goes
        with its network namespace (the controller's)."""
        await self._remove(sandbox_id, self._found_vm(sandbox_id), None)

    async def _remove(self, sandbox_id: str, vm: MicroVM, network: VmNetwork | None) -> None:
        layout = vm.layout
        await self._stop(sandbox_id, vm)
        if network is not None:
            await detach_tap(sandbox_id, network.netns, network.tap)
        await asyncio.to_thread(shutil.rmtree, layout.dir, ignore_errors=True)
        if layout.jail_dir is not None:
            await asyncio.to_thread(shutil.rmtree, layout.jail_dir, ignore_errors=True)
        log.info("sandbox.destroyed", sandbox_id=sandbox_id, backend=self.name)

    async def _stop(self, sandbox_id: str, vm: MicroVM) -> None:
        """End the VMM, and any other naming the VM (one started but not yet recorded, a crash between
        the two), found by its command line."""
        await vm.kill()
        for stray in await asyncio.to_thread(self._vmm_processes, vm.layout, vm.vm_id):
            await MicroVM(
                sandbox_id, vm.layout, firecracker=self.firecracker, netns="", pid=stray.pid,
                start_time=stray.create_time(),
            ).kill()  # fmt: skip
        self._vms.pop(sandbox_id, None)

    def _vmm_processes(self, layout: VmLayout, vm_id: str) -> list[psutil.Process]:
        api_socket = str(layout.host(API_SOCKET)) if layout.jail_dir is None else None
        found = []
        for process in psutil.process_iter(["cmdline"]):
            cmdline: list[str] = process.info["cmdline"] or []
            unjailed = api_socket is not None and api_socket in cmdline
            if unjailed or (layout.jail_dir is not None and _jailed_vmm(cmdline, self.firecracker, vm_id)):
                found.append(process)
        return found

    async def probe(self, handle: SandboxHandle) -> Liveness:
        vm = self._vm(handle)
        if vm.alive():
            return Liveness.ALIVE
        hibernated = handle.recorded and handle.runtime_as(FirecrackerRuntime).hibernated
        if hibernated and vm.has_snapshot():
            return Liveness.HIBERNATED
        return Liveness.GONE

    async def hibernate(self, handle: SandboxHandle) -> SandboxHandle:
        if handle.role != "cli":
            raise SandboxUnsupported(
                handle.sandbox_id, "only CLI sandboxes hibernate; a browser sandbox is destroyed instead"
            )
        vm = self._vm(handle)
        if not vm.alive():
            raise SandboxError(handle.sandbox_id, "the microVM is not running", detail=vm.layout.logs_tail())
        try:
            await vm.snapshot()
        except FirecrackerError as exc:
            raise SandboxError(
                handle.sandbox_id, f"cannot snapshot the microVM: {exc}", detail=vm.layout.logs_tail()
            ) from exc
        await vm.kill()
        self._vms.pop(handle.sandbox_id, None)
        network = handle.runtime_as(FirecrackerRuntime).network
        await detach_tap(handle.sandbox_id, network.netns, network.tap)
        log.info("sandbox.hibernated", sandbox_id=handle.sandbox_id, backend=self.name)
        return SandboxHandle.of(
            handle.sandbox_id,
            self.name,
            handle.role,
            FirecrackerRuntime.of(vm.layout, network, None, hibernated=True),
        )

    async def resume(self, handle: SandboxHandle) -> SandboxHandle:
        vm = self._vm(handle)
        if vm.alive():
            return handle
        runtime = handle.runtime_as(FirecrackerRuntime)
        if not (runtime.hibernated and vm.has_snapshot()):
            raise SandboxError(handle.sandbox_id, f"{vm.layout.root} holds no snapshot to resume")
        network = runtime.network
        try:
            image = BootFiles.from_settings(self.settings)
        except FileNotFoundError as exc:
            raise SandboxError(handle.sandbox_id, str(exc)) from exc
        vm = MicroVM(
            handle.sandbox_id,
            vm.layout,
            firecracker=self.firecracker,
            netns=network.netns,
            jailer=self.jailer,
        )
        try:
            if self.jailer is not None:
                await asyncio.to_thread(self.jailer.prepare, vm.layout.root, self._jail_links(image))
            await attach_tap(handle.sandbox_id, network, owner=self._owner())
            await vm.launch(API_READY_S)
            await vm.restore(resume=True)
        except BaseException as exc:
            detail = vm.layout.logs_tail()
            # Still hibernated: the snapshot stays for another try; the process and TAP go.
            await vm.kill()
            await detach_tap(handle.sandbox_id, network.netns, network.tap)
            if isinstance(exc, (FirecrackerError, SandboxError, OSError)):
                raise SandboxError(
                    handle.sandbox_id, f"cannot resume the microVM: {exc}", detail=detail
                ) from exc
            raise
        vm.drop_snapshot()
        self._vms[handle.sandbox_id] = vm
        log.info("sandbox.resumed", sandbox_id=handle.sandbox_id, backend=self.name)
        return SandboxHandle.of(
            handle.sandbox_id, self.name, handle.role, FirecrackerRuntime.of(vm.layout, network, vm)
        )

    async def list_orphans(self, known: Sequence[str]) -> list[str]:
        found: set[str] = set()
        if self.sandboxes_dir.is_dir():
            found |= {entry.name for entry in self.sandboxes_dir.iterdir() if entry.is_dir()}
        return sorted(found - set(known))

    async def readiness(self) -> BackendReadiness:
        found = await asyncio.to_thread(host.inspect, self.settings)
        problems = list(found.problems)
        try:
            BootFiles.from_settings(self.settings)
        except FileNotFoundError as exc:
            problems.append(str(exc))
        if problems:
            return BackendReadiness(False, "; ".join(problems))
        jailed = "jailed" if self.jailer else "unjailed"
        return BackendReadiness(True, f"ok: Firecracker {found.version} on {found.kvm_module}, {jailed}")

    async def close(self) -> None:
        # The VMs keep running (a restarted controller adopts them); only their reaping stops here.
        self._vms.clear()


def _jailed_vmm(cmdline: list[str], firecracker: str, vm_id: str) -> bool:
    """A jailed firecracker runs as ``/<exec name> --id=<id> ...`` (the jailer's exec)."""
    if not cmdline or Path(cmdline[0]).name != Path(firecracker).name:
        return False
    return f"--id={vm_id}" in cmdline or any(
        arg == "--id" and value == vm_id for arg, value in itertools.pairwise(cmdline)
    )
