"""One microVM: a firecracker process, the files it owns, and the verbs of its life.

``launch`` starts the process (unjailed under ``ip netns exec``, or under the jailer) with its API socket
in the VM's directory and waits until that socket answers; ``boot`` configures the machine and starts it;
``snapshot`` pauses it and writes its state and memory; ``restore`` loads a snapshot into a fresh process;
``kill`` ends the process. What the VM owns on disk is described by :class:`VmLayout`; the process is
identified by pid and start time, so that a restarted controller finds it again (or knows it has gone)
from those two numbers alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from browservm.logs import file_tail
from browservm.sandbox.firecracker.client import FirecrackerClient, FirecrackerError
from browservm.sandbox.firecracker.definitions import (
    BootSource,
    Drive,
    MachineConfiguration,
    MemoryBackend,
    NetworkInterface,
    NetworkOverride,
    SerialDevice,
    SnapshotCreateParams,
    SnapshotLoadParams,
    Vsock,
    VsockOverride,
)
from browservm.sandbox.firecracker.jailer import Jailer
from browservm.sandbox.vmm import VmmProcess

log = structlog.get_logger(__name__)

API_SOCKET = "firecracker.socket"
VSOCK_SOCKET = "vsock.sock"
CONSOLE = "console.log"
OVERLAY = "overlay.ext4"
SNAPSHOT_DIR = "snapshot"
SNAPSHOT_STATE = "snapshot/vm.state"
SNAPSHOT_MEMORY = "snapshot/memory"
VMM_LOG = "vmm.log"
JAILED_KERNEL, JAILED_INITRD, JAILED_ROOTFS = "vmlinux", "initrd", "rootfs.ext4"
"""Names of the image's files hard-linked into a jail."""

STOP_WAIT_S = 5.0
UNIX_PATH_MAX = 107
_INSTANCE_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


def instance_id(sandbox_id: str) -> str:
    """Firecracker's ``--id`` (and the jailer's) takes letters, digits and '-'; sandbox ids also use '_'."""
    vm_id = sandbox_id.replace("_", "-")
    if not _INSTANCE_ID.fullmatch(vm_id):
        raise ValueError(f"sandbox id {sandbox_id!r} cannot be a Firecracker id (letters, digits, '-', '_')")
    return vm_id


class VmError(FirecrackerError):
    """A VM could not be started, configured or stopped. ``detail`` is the tail of its logs."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class VmLayout:
    """Where a VM's files are on the host, and the paths the firecracker process knows them by."""

    dir: Path
    """The sandbox's directory: the VMM's log, and (unjailed) ``root``."""
    root: Path
    """The directory of the VM's own files (sockets, console, overlay, snapshot)."""
    jail_dir: Path | None = None
    """Jailed: ``<chroot_base>/firecracker/<id>``, whose ``root/`` is the chroot."""

    @classmethod
    def unjailed(cls, sandbox_dir: Path) -> VmLayout:
        return cls(dir=sandbox_dir, root=sandbox_dir / "vm")

    @classmethod
    def jailed(cls, sandbox_dir: Path, jail_dir: Path) -> VmLayout:
        return cls(dir=sandbox_dir, root=jail_dir / "root", jail_dir=jail_dir)

    def host(self, name: str) -> Path:
        return self.root / name

    def vmm(self, name: str) -> str:
        """The path the firecracker process opens: inside a jail, relative to its root."""
        return f"/{name}" if self.jail_dir is not None else str(self.root / name)

    @property
    def vmm_log(self) -> Path:
        return self.dir / VMM_LOG

    def too_long(self) -> list[Path]:
        """Unix socket paths over the kernel's limit (the vsock one also gets ``_<port>`` appended)."""
        sockets = [self.host(API_SOCKET), Path(f"{self.host(VSOCK_SOCKET)}_65535")]
        return [path for path in sockets if len(str(path)) > UNIX_PATH_MAX]

    def logs_tail(self) -> str:
        return f"--- console ---\n{file_tail(self.host(CONSOLE))}\n--- vmm ---\n{file_tail(self.vmm_log)}"


@dataclass(frozen=True, slots=True)
class VmConfig:
    """Everything ``boot`` sends before InstanceStart, in Firecracker's own terms."""

    machine: MachineConfiguration
    boot_source: BootSource
    drives: list[Drive]
    interfaces: list[NetworkInterface]
    vsock: Vsock
    serial: SerialDevice


class MicroVM(VmmProcess):
    def __init__(
        self,
        sandbox_id: str,
        layout: VmLayout,
        *,
        firecracker: str,
        netns: str,
        jailer: Jailer | None = None,
        pid: int | None = None,
        start_time: float | None = None,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.vm_id = instance_id(sandbox_id)
        self.layout = layout
        self.firecracker = firecracker
        self.netns = netns
        self.jailer = jailer
        super().__init__(pid, start_time)

    # ------------------------------------------------------------------ process

    def argv(self) -> list[str]:
        firecracker_args = ["--api-sock", self.layout.vmm(API_SOCKET)]
        if self.jailer is not None:
            return self.jailer.argv(self.firecracker, self.vm_id, self.netns, firecracker_args)
        # `ip netns exec` execs firecracker in place: the pid stays the VMM's.
        return ["ip", "netns", "exec", self.netns, self.firecracker, *firecracker_args, "--id", self.vm_id]

    def client(self) -> FirecrackerClient:
        return FirecrackerClient(self.layout.host(API_SOCKET))

    async def launch(self, timeout_s: float) -> None:
        """Start the firecracker process and wait until its API answers. Kills it again on failure."""
        # Firecracker refuses to start when its socket path exists (a VMM killed earlier left it).
        with contextlib.suppress(FileNotFoundError):
            self.layout.host(API_SOCKET).unlink()
        self.layout.dir.mkdir(parents=True, exist_ok=True)
        argv = self.argv()
        try:
            await asyncio.to_thread(self._spawn, argv, self.layout.vmm_log)
        except OSError as exc:
            raise VmError(f"cannot start {argv[0]}: {exc}") from exc
        log.info(
            "firecracker.launched", sandbox_id=self.sandbox_id, pid=self.pid, jailed=self.jailer is not None
        )
        started = time.monotonic()
        try:
            async with self.client() as client:
                info = await client.wait_ready(timeout_s, alive=self.alive)
        except FirecrackerError as exc:
            await self.kill()
            raise VmError(f"firecracker did not come up: {exc}", self.layout.logs_tail()) from exc
        log.info(
            "firecracker.api_ready",
            sandbox_id=self.sandbox_id,
            version=info.vmm_version,
            after_s=round(time.monotonic() - started, 3),
        )

    async def kill(self) -> None:
        """SIGKILL the VMM (the guest's disk is the overlay; nothing in its memory is kept) and wait."""
        if self.alive() and self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        await asyncio.to_thread(self._wait_gone, STOP_WAIT_S)
        if self.alive():
            raise VmError(f"firecracker pid {self.pid} did not exit after SIGKILL", self.layout.logs_tail())
        self.pid = self.start_time = None

    # ------------------------------------------------------------------ the VM

    async def boot(self, config: VmConfig) -> None:
        """Configure the machine and start it. Firecracker takes the pre-boot calls in any order."""
        async with self.client() as client:
            await client.put_machine_config(config.machine)
            await client.put_boot_source(config.boot_source)
            for drive in config.drives:
                await client.put_drive(drive)
            for interface in config.interfaces:
                await client.put_network_interface(interface)
            await client.put_vsock(config.vsock)
            await client.put_serial(config.serial)
            await client.start()
        log.info("firecracker.started", sandbox_id=self.sandbox_id)

    async def snapshot(self) -> None:
        """Pause and write a full snapshot (state and memory). Left paused; resumed again if writing fails."""
        self.layout.host(SNAPSHOT_DIR).mkdir(exist_ok=True)
        if self.jailer is not None:
            os.chown(self.layout.host(SNAPSHOT_DIR), self.jailer.uid, self.jailer.gid)
        async with self.client() as client:
            await client.pause()
            try:
                await client.create_snapshot(
                    SnapshotCreateParams(
                        snapshot_path=self.layout.vmm(SNAPSHOT_STATE),
                        mem_file_path=self.layout.vmm(SNAPSHOT_MEMORY),
                        snapshot_type="Full",
                    )
                )
            except FirecrackerError:
                await client.resume()
                raise
        log.info("firecracker.snapshot_created", sandbox_id=self.sandbox_id)

    def has_snapshot(self) -> bool:
        return self.layout.host(SNAPSHOT_STATE).is_file() and self.layout.host(SNAPSHOT_MEMORY).is_file()

    async def restore(
        self,
        *,
        resume: bool = True,
        network_overrides: list[NetworkOverride] | None = None,
        vsock_path: str | None = None,
    ) -> None:
        """Load the layout's snapshot into this (freshly launched) process.

        The vsock device binds its unix socket again on load, so a stale one is removed first. A clone
        restored beside its original passes its own TAP (``network_overrides``) and socket (``vsock_path``).
        """
        with contextlib.suppress(FileNotFoundError):
            self.layout.host(VSOCK_SOCKET).unlink()
        async with self.client() as client:
            await client.load_snapshot(
                SnapshotLoadParams(
                    snapshot_path=self.layout.vmm(SNAPSHOT_STATE),
                    mem_backend=MemoryBackend(
                        backend_type="File", backend_path=self.layout.vmm(SNAPSHOT_MEMORY)
                    ),
                    resume_vm=resume,
                    network_overrides=network_overrides,
                    vsock_override=VsockOverride(uds_path=vsock_path) if vsock_path else None,
                )
            )
        log.info("firecracker.snapshot_loaded", sandbox_id=self.sandbox_id, resumed=resume)

    def drop_snapshot(self) -> None:
        """After a restore: the VM maps the memory file privately, so unlinking it is safe (its blocks are
        freed when the VM exits) and a later hibernate writes a new one."""
        for name in (SNAPSHOT_STATE, SNAPSHOT_MEMORY):
            with contextlib.suppress(FileNotFoundError):
                self.layout.host(name).unlink()
