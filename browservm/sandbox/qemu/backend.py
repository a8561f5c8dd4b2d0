"""The ``qemu`` backend: each sandbox is a QEMU microVM booted from the guest image.

Glue between :class:`~browservm.sandbox.base.SandboxBackend` and :mod:`.machine`. A sandbox owns
``state_dir/qemu/<id>/`` (:class:`~.machine.VmFiles`: console, QEMU's log, sockets, overlay, snapshot),
a host uid of its own that QEMU runs as, a TAP on a bridge in its network namespace (:mod:`.network`),
and one QEMU process. The guest boots the image's kernel and initramfs with its ext4 read-only as
``/dev/vda`` and the VM's own ext4 as ``/dev/vdb`` (the upper layer of the guest's root overlay); its
agent listens on the virtio-serial port :data:`~.machine.CHANNEL_PORT`, which QEMU joins to the unix
socket ``channel.sock``.

What the guest needs to know arrives on its kernel command line, never by editing its disk: ``ip=``,
``browservm.sandbox_id``, ``browservm.role``, ``browservm.listen`` (``serial:/dev/virtio-ports/...``),
``browservm.overlay`` and ``browservm.env`` (base64url JSON of the agent's extra environment).
Per-session settings travel over the channel after boot.

``handle.runtime`` is a :class:`~.runtime.QemuRuntime`: the directory, pid and start time, network and
machine (image files, command line, size, accelerator, uid), and whether the VM is hibernated: enough to
probe, adopt, resume and destroy it after a restart. A copy is kept in the directory (``sandbox.json``),
so an orphan found by its directory alone is removed whole.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import ValidationError

from browservm import protocol
from browservm.cleanup import Cleanup
from browservm.sandbox import vmhost
from browservm.sandbox.base import (
    BackendReadiness,
    GuestImage,
    Liveness,
    SandboxBackend,
    SandboxBootTimeout,
    SandboxError,
    SandboxHandle,
    SandboxSnapshot,
    SandboxSpec,
    SandboxUnsupported,
)
from browservm.sandbox.channel import Channel, ChannelClosed, NotHello
from browservm.sandbox.disk import DiskError, create_overlay
from browservm.sandbox.qemu import host
from browservm.sandbox.qemu.machine import (
    CHANNEL_PORT,
    HOST_PORT,
    QemuVM,
    VmConfig,
    VmError,
    VmFiles,
    VmImage,
    processes_in,
    processes_under,
)
from browservm.sandbox.qemu.runtime import QemuRuntime
from browservm.sandbox.vm_network import VmNetwork, attach_tap, detach_tap
from browservm.settings import Settings, SettingsError

log = structlog.get_logger(__name__)

SANDBOX_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
UID_BASE = 2_000_000_000
UID_COUNT = 100_000_000
"""Host uids for VMs: the process backend's range, far above any user's and container remaps."""
LAUNCH_READY_S = 15.0
RESTORE_TIMEOUT_S = 300.0
HIBERNATE_TIMEOUT_S = 300.0
CONNECT_POLL_S = 0.25
STALE_PAUSE_S = 0.5
IDENTITY_TIMEOUT_S = 60.0
"""For the guest's root helper to set a restored VM's identity (a few ms on KVM; seconds under TCG)."""
ENTROPY_BYTES = 64
HELLO_AFTER_LISTENING_S = 5.0
"""A listening agent greets a new connection within a poll of its port (50 ms); this is for a busy TCG host."""
PROBE_ID = 2**31 - 1
"""The id of the Ping that starts every connection; the controller's own requests count up from 1."""


def tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host's TSC rate. Under TCG the guest's TSC runs at it, and the kernel's own calibration
    against the emulated PIT fails on a busy host (it then hangs), so the guest is told instead."""
    with contextlib.suppress(OSError, ValueError):
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return None


ImageSource = VmImage | Callable[[], VmImage]


def image_from_settings(settings: Settings) -> VmImage:
    """``BROWSERVM_VM_KERNEL``/``_ROOTFS``/``_INITRD`` when set, else the current browser image."""
    if settings.vm_kernel is not None or settings.vm_rootfs is not None:
        if settings.vm_kernel is None or settings.vm_rootfs is None:
            raise LookupError("set both BROWSERVM_VM_KERNEL and BROWSERVM_VM_ROOTFS (or neither)")
        return VmImage(settings.vm_kernel, settings.vm_rootfs, settings.vm_initrd)
    from browservm.sandbox.image import current_image

    image = current_image(settings, "browser")
    if image is None:
        raise LookupError(
            f"no browser guest image in {settings.effective_image_dir}: build it with "
            "'browservm image build --variant browser' (scripts/run.sh does)"
        )
    return VmImage(image.vmlinux, image.rootfs, image.initramfs)


class QemuBackend(SandboxBackend):
    name = "qemu"
    supports_snapshots = True

    def __init__(
        self,
        state_dir: Path,
        image: ImageSource | None = None,
        *,
        qemu: str = "qemu-system-x86_64",
        accel: Literal["auto", "kvm", "tcg"] = "auto",
    ) -> None:
        self.state_dir = state_dir
        self._image = image
        self.qemu_setting = qemu
        self.qemu = vmhost.resolve(qemu) or qemu
        self.accel, self.accel_why = host.choose_accel(accel)
        self.accel_setting = accel
        self._seccomp: bool | None = None
        self._vms: dict[str, QemuVM] = {}
        """VMs this backend instance started: their processes are reaped when they exit."""
        log.info("qemu.accelerator", accel=self.accel, why=self.accel_why)

    @classmethod
    def from_settings(cls, settings: Settings) -> QemuBackend:
        """The backend for ``BROWSERVM_BACKEND=qemu``; refuses a host without QEMU."""
        found = host.inspect(settings.qemu_bin, settings.qemu_accel)
        if not found.ok:
            raise SettingsError(
                "BROWSERVM_BACKEND=qemu cannot run on this host:\n  - "
                + "\n  - ".join(found.problems)
                + "\nsee docs/qemu.md, or use BROWSERVM_BACKEND=process"
            )
        return cls(
            settings.state_dir,
            lambda: image_from_settings(settings),
            qemu=settings.qemu_bin,
            accel=settings.qemu_accel,
        )

    @property
    def sandboxes_dir(self) -> Path:
        return self.state_dir / "qemu"

    @property
    def snapshots_dir(self) -> Path:
        """Saved guests that warm sandboxes are restored from: root's alone (the launcher opens their
        files for each clone's QEMU)."""
        return self.state_dir / "qemu-snapshots"

    def image(self, named: GuestImage | None = None) -> VmImage:
        """The files a VM boots: ``named``'s (a spec's), else the backend's own now."""
        if named is not None and named.kernel is not None and named.rootfs is not None:
            image = VmImage(named.kernel, named.rootfs, named.initrd)
        elif self._image is None:
            raise LookupError("this qemu backend was given no guest image to boot")
        else:
            image = self._image if isinstance(self._image, VmImage) else self._image()
        missing = [
            str(p) for p in (image.kernel, image.rootfs, image.initrd) if p is not None and not p.is_file()
        ]
        if missing:
            raise LookupError(
                f"the guest image is incomplete: {', '.join(missing)} missing (browservm image build)"
            )
        return image

    def _files(self, sandbox_id: str) -> VmFiles:
        if not SANDBOX_ID.fullmatch(sandbox_id):
            raise SandboxError(
                sandbox_id, "a sandbox id must be 1-64 letters, digits, '_' or '-' (it names a directory)"
            )
        return VmFiles(self.sandboxes_dir / sandbox_id)

    def _vm(self, handle: SandboxHandle) -> QemuVM:
        if not handle.recorded:
            return self._found_vm(handle.sandbox_id, self._files(handle.sandbox_id))
        return self._vm_of(handle.sandbox_id, handle.runtime_as(QemuRuntime))

    def _vm_of(self, sandbox_id: str, runtime: QemuRuntime) -> QemuVM:
        vm = self._vms.get(sandbox_id)
        if vm is not None and vm.pid == runtime.pid:
            return vm
        return QemuVM(
            sandbox_id, runtime.files, qemu=self.qemu, pid=runtime.pid, start_time=runtime.start_time
        )

    def _found_vm(self, sandbox_id: str, files: VmFiles) -> QemuVM:
        """A VM known by its directory alone: its pid file, checked against where it runs."""
        pid, start_time = None, None
        with contextlib.suppress(ValueError, OSError):
            found = int(files.pidfile.read_text().strip())
            for process in processes_in(files.dir):
                if process.pid == found:
                    pid, start_time = found, process.create_time()
        return QemuVM(sandbox_id, files, qemu=self.qemu, pid=pid, start_time=start_time)

    def seccomp(self) -> bool:
        if self._seccomp is None:
            self._seccomp = host.has_seccomp(self.qemu)
        return self._seccomp

    # ------------------------------------------------------------------ the guest's configuration

    def _cmdline(self, spec: SandboxSpec, network: VmNetwork | None, accel: host.Accel) -> str:
        env = dict(spec.env)
        encoded = (
            base64.urlsafe_b64encode(json.dumps(env, separators=(",", ":")).encode()).decode().rstrip("=")
        )
        args = [
            "console=ttyS0 panic=-1 reboot=t quiet pci=off",
            f"browservm.sandbox_id={spec.sandbox_id}",
            f"browservm.role={spec.role}",
            f"browservm.listen=serial:/dev/virtio-ports/{CHANNEL_PORT}",
            "browservm.overlay=/dev/vdb",
            f"browservm.env={encoded}",
            f"browservm.identity=serial:/dev/virtio-ports/{HOST_PORT}",
        ]
        if accel == "tcg" and (khz := tsc_khz()) is not None:
            args.append(f"tsc_early_khz={khz}")
        if network is not None:
            args.append(network.kernel_ip_arg())
        return " ".join(args)

    def _groups(self, accel: host.Accel) -> tuple[int, ...]:
        if accel != "kvm":
            return ()
        group, _ = host.kvm_group()
        return (group,) if group is not None else ()

    def _pick_uid(self) -> int:
        taken = set()
        with contextlib.suppress(FileNotFoundError):
            for entry in self.sandboxes_dir.iterdir():
                with contextlib.suppress(OSError):
                    taken.add(entry.stat().st_uid)
        while (uid := UID_BASE + secrets.randbelow(UID_COUNT)) in taken:
            pass
        return uid

    def _record(self, of: SandboxSpec | SandboxHandle, files: VmFiles, runtime: QemuRuntime) -> SandboxHandle:
        """The handle of ``runtime``, its copy written to the VM's directory (``sandbox.json``)."""
        files.record.write_text(runtime.model_dump_json())
        return SandboxHandle.of(of.sandbox_id, self.name, of.role, runtime)

    # ------------------------------------------------------------------ lifecycle

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        files = self._files(spec.sandbox_id)
        if spec.network.egress_allow:
            raise SandboxUnsupported(
                spec.sandbox_id,
                "per-sandbox egress lists are not built yet (the sandbox network's policy applies to all)",
            )
        if too_long := files.too_long():
            raise SandboxError(
                spec.sandbox_id,
                f"socket path {too_long[0]} is longer than a unix socket takes (107 bytes): use a shorter "
                "BROWSERVM_STATE_DIR",
            )
        if files.dir.exists():
            raise SandboxError(spec.sandbox_id, f"{files.dir} already exists: destroy that sandbox first")
        try:
            image = await asyncio.to_thread(self.image, spec.image)
        except LookupError as exc:
            raise SandboxError(spec.sandbox_id, str(exc)) from exc
        network = VmNetwork.from_spec(spec)
        seccomp = await asyncio.to_thread(self.seccomp)
        config = VmConfig(
            sandbox_id=spec.sandbox_id,
            image=image,
            cmdline=self._cmdline(spec, network, self.accel),
            vcpus=spec.resources.vcpus,
            memory_mib=spec.resources.memory_mib,
            accel=self.accel,
            network=network,
            uid=self._pick_uid(),
            groups=self._groups(self.accel),
            seccomp=seccomp,
            host_port=True,
        )
        started = time.monotonic()
        handle, vm = await self._start(
            spec,
            files,
            config,
            disk=lambda: create_overlay(files.overlay, spec.resources.disk_mib, owner=config.uid),
            failure="cannot start the VM",
        )
        log.info(
            "sandbox.started",
            sandbox_id=spec.sandbox_id,
            backend=self.name,
            accel=config.accel,
            pid=vm.pid,
            uid=config.uid,
            after_s=round(time.monotonic() - started, 3),
        )
        return handle

    async def _start(
        self,
        spec: SandboxSpec,
        files: VmFiles,
        config: VmConfig,
        *,
        disk: Callable[[], Awaitable[None]],
        incoming: Path | None = None,
        settle: Callable[[QemuVM], Awaitable[None]] | None = None,
        failure: str,
    ) -> tuple[SandboxHandle, QemuVM]:
        """What create and restore share: the VM's directory (owned by ``config.uid``) and record, its
        disk (``disk`` makes it), its TAP, and QEMU (on the migration stream ``incoming`` if given), then
        ``settle``. Each undo is registered as its resource is taken; on a failure they run last first,
        and the failure is raised as :class:`SandboxError` (``failure``: what could not be done) with the
        VM's logs."""
        detail = ""

        def keep_logs() -> None:
            nonlocal detail
            detail = files.logs_tail()

        try:
            async with Cleanup("qemu.undo_failed", sandbox_id=spec.sandbox_id) as undo:
                # No await since the caller picked config.uid: the directory's owner marks it taken.
                self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
                os.chmod(self.sandboxes_dir, 0o711)  # noqa: S103 - QEMU runs in a directory of its own
                files.dir.mkdir(mode=0o700)
                undo.push(asyncio.to_thread, shutil.rmtree, files.dir, ignore_errors=True)
                undo.callback(keep_logs)  # before the directory goes
                os.chown(files.dir, config.uid, config.uid)
                self._record(spec, files, QemuRuntime.of(files, config, None))
                await disk()
                if config.network is not None:
                    # Registered first: a TAP half made is removed too.
                    undo.push(detach_tap, spec.sandbox_id, config.network.netns, config.network.tap)
                    await attach_tap(spec.sandbox_id, config.network)
                vm = QemuVM(spec.sandbox_id, files, qemu=self.qemu)
                self._vms[spec.sandbox_id] = vm
                undo.push(self._stop, spec.sandbox_id, files, vm)
                await vm.launch(config, incoming=incoming, ready_s=LAUNCH_READY_S)
                handle = self._record(spec, files, QemuRuntime.of(files, config, vm))
                if settle is not None:
                    await settle(vm)
                undo.keep()
        except (VmError, DiskError, OSError) as exc:
            raise SandboxError(spec.sandbox_id, f"{failure}: {exc}", detail=detail) from exc
        return handle, vm

    async def connect(self, handle: SandboxHandle, *, timeout_s: float) -> Channel:
        """Connect to the channel socket and wait for the agent's Hello.

        A serial line has no connections: the guest learns of a controller from QEMU telling it the host
        end opened or closed. A guest that did not look while the end closed and opened again (a
        controller that hung up and came straight back) takes the new controller for the old one and
        says no Hello. So every connection starts with a Ping: an agent that answers it before saying
        Hello is on such a stale line, and the backend hangs up for longer each time until the guest
        notices. A fresh agent says Hello first and its answer to the Ping is ignored."""
        vm = self._vm(handle)
        files = vm.files
        deadline = time.monotonic() + timeout_s
        pause = STALE_PAUSE_S
        while True:
            if not vm.alive():
                raise SandboxError(handle.sandbox_id, "the VM is not running", detail=files.logs_tail())
            try:
                reader, writer = await asyncio.open_unix_connection(str(files.channel))
            except OSError as exc:
                raise SandboxError(
                    handle.sandbox_id,
                    f"cannot connect to the VM's channel socket: {exc}",
                    detail=files.logs_tail(),
                ) from exc
            writer.write(protocol.encode_message(protocol.Ping(id=PROBE_ID)))
            try:
                return await self._handshake(handle, vm, reader, writer, deadline, timeout_s)
            except NotHello:
                writer.close()
                log.info("qemu.stale_channel", sandbox_id=handle.sandbox_id, pause_s=pause)
                if time.monotonic() + pause >= deadline:
                    raise SandboxBootTimeout(handle.sandbox_id, timeout_s, files.logs_tail()) from None
                await asyncio.sleep(pause)
                pause = min(pause * 2, 8.0)

    async def _handshake(
        self,
        handle: SandboxHandle,
        vm: QemuVM,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        deadline: float,
        timeout_s: float,
    ) -> Channel:
        # The agent says Hello once the guest has booted; QEMU ending meanwhile ends the wait at once.
        # An agent that listens (its console says so) but stays silent did not see this connection open
        # (as happens to the first one after a resume): hang up and come again.
        files = vm.files
        handshake = asyncio.ensure_future(Channel.handshake(handle.sandbox_id, reader, writer))
        listening_since: float | None = None
        try:
            while not handshake.done():
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    raise SandboxBootTimeout(handle.sandbox_id, timeout_s, files.logs_tail())
                await asyncio.wait({handshake}, timeout=min(CONNECT_POLL_S, remaining))
                if handshake.done():
                    break
                if not vm.alive():
                    raise SandboxError(
                        handle.sandbox_id,
                        "the VM ended before its agent said hello",
                        detail=files.logs_tail(),
                    )
                if listening_since is None and await asyncio.to_thread(files.agent_listening):
                    listening_since = now
                if listening_since is not None and now - listening_since > HELLO_AFTER_LISTENING_S:
                    raise NotHello("the agent listens but said no hello on this connection")
            try:
                return handshake.result()
            except ChannelClosed as exc:
                # QEMU hung up on this client (it does, once, on the first after loading a snapshot).
                if vm.alive():
                    raise NotHello(str(exc)) from exc
                raise
        except (SandboxError, NotHello):
            handshake.cancel()
            writer.close()
            raise
        except (protocol.ProtocolError, ConnectionError, Exception) as exc:
            writer.close()
            raise SandboxError(
                handle.sandbox_id, f"the guest agent's handshake failed: {exc}", detail=files.logs_tail()
            ) from exc

    async def destroy(self, handle: SandboxHandle) -> None:
        if not handle.recorded:
            await self.destroy_orphan(handle.sandbox_id)
            return
        runtime = handle.runtime_as(QemuRuntime)
        await self._remove(
            handle.sandbox_id, runtime.files, self._vm_of(handle.sandbox_id, runtime), runtime.network
        )

    async def destroy_orphan(self, sandbox_id: str) -> None:
        """From its directory: the record kept there (``sandbox.json``: QEMU's pid, the TAP's
        namespace), else QEMU's pid file; and any QEMU running in it."""
        files = self._files(sandbox_id)
        recorded = None
        with contextlib.suppress(OSError, ValidationError):
            recorded = QemuRuntime.model_validate_json(files.record.read_text())
        if recorded is not None and recorded.pid is not None:
            vm = self._vm_of(sandbox_id, recorded)
        else:
            vm = self._found_vm(sandbox_id, files)
        await self._remove(sandbox_id, files, vm, recorded.network if recorded else None)

    async def _remove(self, sandbox_id: str, files: VmFiles, vm: QemuVM, network: VmNetwork | None) -> None:
        await self._stop(sandbox_id, files, vm)
        if network is not None:
            await detach_tap(sandbox_id, network.netns, network.tap)
        await asyncio.to_thread(shutil.rmtree, files.dir, ignore_errors=True)
        log.info("sandbox.destroyed", sandbox_id=sandbox_id, backend=self.name)

    async def _stop(self, sandbox_id: str, files: VmFiles, vm: QemuVM) -> None:
        """End QEMU, and any other QEMU running in the VM's directory (one started but not yet recorded,
        a crash between the two)."""
        await vm.kill()
        for stray in await asyncio.to_thread(processes_in, files.dir):
            with contextlib.suppress(Exception):
                await QemuVM(
                    sandbox_id, files, qemu=self.qemu, pid=stray.pid, start_time=stray.create_time()
                ).kill()
        self._vms.pop(sandbox_id, None)

    async def probe(self, handle: SandboxHandle) -> Liveness:
        vm = self._vm(handle)
        if vm.alive():
            return Liveness.ALIVE
        hibernated = handle.recorded and handle.runtime_as(QemuRuntime).hibernated
        if hibernated and vm.files.snapshot.is_file():
            return Liveness.HIBERNATED
        return Liveness.GONE

    async def hibernate(self, handle: SandboxHandle) -> SandboxHandle:
        if handle.role != "cli":
            raise SandboxUnsupported(
                handle.sandbox_id, "only CLI sandboxes hibernate; a browser sandbox is destroyed instead"
            )
        vm = self._vm(handle)
        if not vm.alive():
            raise SandboxError(handle.sandbox_id, "the VM is not running", detail=vm.files.logs_tail())
        started = time.monotonic()
        try:
            await vm.hibernate(HIBERNATE_TIMEOUT_S)
        except Exception as exc:
            raise SandboxError(
                handle.sandbox_id, f"cannot save the VM's state: {exc}", detail=vm.files.logs_tail()
            ) from exc
        self._vms.pop(handle.sandbox_id, None)
        config = handle.runtime_as(QemuRuntime).machine(handle.sandbox_id)
        if config.network is not None:
            await detach_tap(handle.sandbox_id, config.network.netns, config.network.tap)
        asleep = self._record(handle, vm.files, QemuRuntime.of(vm.files, config, None, hibernated=True))
        log.info(
            "sandbox.hibernated",
            sandbox_id=handle.sandbox_id,
            backend=self.name,
            snapshot_mib=round(vm.files.snapshot.stat().st_size / 2**20, 1),
            after_s=round(time.monotonic() - started, 3),
        )
        return asleep

    async def resume(self, handle: SandboxHandle) -> SandboxHandle:
        vm = self._vm(handle)
        if vm.alive():
            return handle
        files = vm.files
        runtime = handle.runtime_as(QemuRuntime)
        if not (runtime.hibernated and files.snapshot.is_file()):
            raise SandboxError(handle.sandbox_id, f"{files.dir} holds no snapshot to resume")
        config = runtime.machine(handle.sandbox_id)
        missing = [str(p) for p in (config.image.kernel, config.image.rootfs) if not p.is_file()]
        if missing:
            raise SandboxError(
                handle.sandbox_id,
                f"the image this VM booted from is gone ({', '.join(missing)}): a hibernated VM resumes only "
                "on the files it was started with (do not prune them while it sleeps)",
            )
        started = time.monotonic()
        vm = QemuVM(handle.sandbox_id, files, qemu=self.qemu)
        try:
            if config.network is not None:
                await attach_tap(handle.sandbox_id, config.network)
            self._vms[handle.sandbox_id] = vm
            await vm.launch(config, incoming=files.snapshot, ready_s=LAUNCH_READY_S)
            await vm.wait_running(RESTORE_TIMEOUT_S)
        except BaseException as exc:
            detail = files.logs_tail()
            # Still hibernated: the snapshot stays for another try; the process and the TAP go.
            await vm.kill()
            self._vms.pop(handle.sandbox_id, None)
            if config.network is not None:
                await detach_tap(handle.sandbox_id, config.network.netns, config.network.tap)
            if isinstance(exc, (VmError, SandboxError, OSError)):
                raise SandboxError(handle.sandbox_id, f"cannot resume the VM: {exc}", detail=detail) from exc
            raise
        files.snapshot.unlink()
        awake = self._record(handle, files, QemuRuntime.of(files, config, vm))
        if config.host_port:
            try:  # its clock stopped while it slept
                await vm.tell_guest(_rebirth(None, None), IDENTITY_TIMEOUT_S)
            except VmError as exc:
                log.warning("qemu.clock_not_set", sandbox_id=handle.sandbox_id, error=str(exc))
        log.info(
            "sandbox.resumed",
            sandbox_id=handle.sandbox_id,
            backend=self.name,
            after_s=round(time.monotonic() - started, 3),
        )
        return awake

    # ------------------------------------------------------------------ snapshots

    async def snapshot(self, handle: SandboxHandle) -> SandboxSnapshot:
        """Save a running VM as ``snapshots_dir/<id>/`` (its migration stream, its overlay and the
        machine it needs), then end it. The VM's own directory and TAP go as with :meth:`destroy`."""
        vm = self._vm(handle)
        if not vm.alive():
            raise SandboxError(handle.sandbox_id, "the VM is not running", detail=vm.files.logs_tail())
        config = handle.runtime_as(QemuRuntime).machine(handle.sandbox_id)
        if not config.host_port:
            raise SandboxUnsupported(
                handle.sandbox_id, "this VM was started without the host port a restored clone needs"
            )
        directory = self.snapshots_dir / handle.sandbox_id
        self.snapshots_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            directory.mkdir(mode=0o700)
            await vm.hibernate(HIBERNATE_TIMEOUT_S, to=directory / "vmstate")
            # The disk exactly as the saved memory knows it: clones start from copies of it.
            await asyncio.to_thread(os.replace, vm.files.overlay, directory / "overlay.ext4")
            os.chown(directory / "overlay.ext4", 0, 0)
            saved = QemuRuntime.of(vm.files, config, None, hibernated=True).model_copy(
                update={"dir": directory}
            )
            (directory / "snapshot.json").write_text(saved.model_dump_json())
        except BaseException as exc:
            await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)
            await self.destroy(handle)
            if isinstance(exc, (VmError, OSError)):
                raise SandboxError(
                    handle.sandbox_id, f"cannot save the VM: {exc}", detail=vm.files.logs_tail()
                ) from exc
            raise
        await self.destroy(handle)
        snapshot = SandboxSnapshot.of(handle.sandbox_id, self.name, handle.role, saved)
        log.info(
            "qemu.snapshot_taken",
            snapshot_id=snapshot.snapshot_id,
            memory_mib=round((directory / "vmstate").stat().st_size / 2**20, 1),
            after_s=round(time.monotonic() - started, 3),
        )
        return snapshot

    async def restore(self, snapshot: SandboxSnapshot, spec: SandboxSpec) -> SandboxHandle:
        """A clone: its own directory, uid, overlay (a copy of the snapshot's: a reflink where the file
        system has them, else the written blocks only) and TAP; QEMU loads the saved machine, then the
        guest's root helper takes the spec's id, address, the time and fresh entropy."""
        saved = snapshot.runtime_as(QemuRuntime)
        source = saved.dir
        template = saved.machine(snapshot.snapshot_id)
        files = self._files(spec.sandbox_id)
        if files.dir.exists():
            raise SandboxError(spec.sandbox_id, f"{files.dir} already exists: destroy that sandbox first")
        if not (source / "vmstate").is_file():
            raise SandboxError(spec.sandbox_id, f"snapshot {snapshot.snapshot_id} is gone ({source})")
        missing = [str(p) for p in (template.image.kernel, template.image.rootfs) if not p.is_file()]
        if missing:
            raise SandboxError(
                spec.sandbox_id, f"the image snapshot {snapshot.snapshot_id} was taken on is gone: {missing}"
            )
        network = VmNetwork.from_spec(spec)
        if (network is None) != (template.network is None):
            raise SandboxError(
                spec.sandbox_id, "a snapshot restores only into a sandbox with a network if it had one"
            )
        config = dataclasses.replace(
            template,
            sandbox_id=spec.sandbox_id,
            network=network,
            nic_mac=template.nic_mac or (template.network.mac if template.network else None),
            uid=self._pick_uid(),
            groups=self._groups(template.accel),
        )
        started = time.monotonic()
        loaded = started

        async def take_identity(vm: QemuVM) -> None:
            nonlocal loaded
            await vm.wait_running(RESTORE_TIMEOUT_S)
            loaded = time.monotonic()
            await vm.tell_guest(_rebirth(spec.sandbox_id, network), IDENTITY_TIMEOUT_S)

        handle, vm = await self._start(
            spec,
            files,
            config,
            disk=lambda: _copy_disk(source / "overlay.ext4", files.overlay, owner=config.uid),
            incoming=source / "vmstate",
            settle=take_identity,
            failure=f"cannot restore snapshot {snapshot.snapshot_id}",
        )
        log.info(
            "sandbox.restored",
            sandbox_id=spec.sandbox_id,
            snapshot_id=snapshot.snapshot_id,
            pid=vm.pid,
            load_s=round(loaded - started, 3),
            after_s=round(time.monotonic() - started, 3),
        )
        return handle

    async def delete_snapshot(self, snapshot: SandboxSnapshot) -> None:
        directory = self.snapshots_dir / snapshot.snapshot_id
        await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)

    async def prune_snapshots(self) -> list[str]:
        if not self.snapshots_dir.is_dir():
            return []
        pruned = sorted(entry.name for entry in self.snapshots_dir.iterdir())
        for name in pruned:
            await asyncio.to_thread(shutil.rmtree, self.snapshots_dir / name, ignore_errors=True)
        if pruned:
            log.info("qemu.snapshots_pruned", snapshots=pruned)
        return pruned

    async def list_orphans(self, known: Sequence[str]) -> list[str]:
        found: set[str] = set()
        if self.sandboxes_dir.is_dir():
            found |= {entry.name for entry in self.sandboxes_dir.iterdir() if entry.is_dir()}
        found |= set(await asyncio.to_thread(processes_under, self.sandboxes_dir))
        return sorted(found - set(known))

    async def readiness(self) -> BackendReadiness:
        found = await asyncio.to_thread(host.inspect, self.qemu_setting, self.accel_setting)
        problems = list(found.problems)
        try:
            image = await asyncio.to_thread(self.image)
        except LookupError as exc:
            problems.append(str(exc))
            image = None
        if problems:
            return BackendReadiness(False, "; ".join(problems))
        seccomp = "-sandbox on" if found.seccomp else "no seccomp (-sandbox unavailable)"
        assert image is not None
        return BackendReadiness(
            True,
            f"ok: QEMU {found.version} microvm under {found.why}; unprivileged, {seccomp}; "
            f"kernel {image.kernel}",
        )

    async def close(self) -> None:
        # The VMs keep running (a restarted controller adopts them); only their reaping stops here.
        self._vms.clear()


def _rebirth(sandbox_id: str | None, network: VmNetwork | None) -> dict[str, Any]:
    """What the guest's root helper applies (:mod:`browservm.guest.identity`): the time now, fresh
    entropy, and for a clone its id and address."""
    message: dict[str, Any] = {
        "sandbox_id": sandbox_id,
        "time_ns": time.time_ns(),
        "entropy": base64.b64encode(secrets.token_bytes(ENTROPY_BYTES)).decode(),
    }
    if network is not None:
        message["network"] = {
            "address": network.address,
            "gateway": network.gateway,
            "prefix_len": network.prefix_len,
            "mac": network.mac,
        }
    return message


async def _copy_disk(source: Path, target: Path, *, owner: int) -> None:
    """A private copy of a snapshot's disk: a reflink where the file system has them, else only the
    blocks written (the disk is a sparse file)."""
    process = await asyncio.create_subprocess_exec(
        "cp", "--reflink=auto", "--sparse=always", str(source), str(target),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, error = await process.communicate()
    if process.returncode != 0:
        raise DiskError(f"cannot copy {source} to {target}: {error.decode(errors='replace').strip()}")
    os.chown(target, owner, owner)
    os.chmod(target, 0o600)
