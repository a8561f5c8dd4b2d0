"""One QEMU microVM: its files, its command line, its process, and the verbs of its life.

A VM owns ``state_dir/qemu/<id>/`` (:class:`VmFiles`), owned by the VM's own unprivileged host user:
QEMU runs there and names everything relative to it (its QMP and channel sockets, the console log, its
pid file, the overlay), so neither the directory's parents nor the unix socket path limit matter to it.
The process is identified by pid and start time (a restarted controller finds it again, or knows it is
gone, from those two numbers) and, for strays, by its working directory.

Hibernation is QEMU's migration to a file: the VM's device state and memory go through a descriptor
handed over QMP (``getfd``, then ``migrate fd:``: no helper process, which ``-sandbox
spawn=deny`` would forbid, and QEMU 7.2 has no ``file:`` URI), QEMU quits; resume starts the same machine
with ``-incoming fd:N`` on that file. The guest runs while its memory is copied (QEMU stops it for the
last pass; an idle guest converges at once): a guest paused before it is saved comes back paused and,
once continued, misses the first opening of its serial port's host end, which leaves the channel mute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog

from browservm.logs import file_tail
from browservm.sandbox.qemu import launcher
from browservm.sandbox.qemu.host import Accel
from browservm.sandbox.qemu.qmp import Qmp, QmpError
from browservm.sandbox.vm_network import VmNetwork
from browservm.sandbox.vmm import VmmProcess

log = structlog.get_logger(__name__)

CHANNEL_PORT = "org.browservm.agent"
"""The virtio-serial port's name; the image's init links it as ``/dev/virtio-ports/<name>``."""
HOST_PORT = "org.browservm.host"
"""The second port: the host's line to the guest's root helper (``browservm.guest.identity``), which
sets a restored VM's clock, random generator, address and id. Only root in the guest can open it."""
GUEST_ANSWER_S = 2.0
"""How long one try waits for the helper's answer before the line is opened again (a line opened
across a restore may be lost: QEMU hangs up on the first client after loading a snapshot)."""
CONSOLE_HEAD_BYTES = 256 * 1024
"""Where the console's boot messages end, with room to spare (a quiet boot writes ~10 KiB)."""
STOP_WAIT_S = 5.0
UNIX_PATH_MAX = 107
MIGRATION_BANDWIDTH = 8 * 1024**3
"""Bytes per second: QEMU's default (32 MiB/s) is for live migration over a network, not a local file."""

# Descriptor numbers the launcher places for QEMU.
TAP_FD, ROOTFS_FD, KERNEL_FD, INITRD_FD, INCOMING_FD = 3, 4, 5, 6, 7


class VmError(Exception):
    """A VM could not be started or stopped. ``detail`` is the tail of its logs."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class VmFiles:
    dir: Path

    @property
    def console(self) -> Path:
        """The guest's serial console (kernel, initramfs, init and agent logs)."""
        return self.dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        """QEMU's own (and the launcher's) standard output and error."""
        return self.dir / "qemu.log"

    @property
    def overlay(self) -> Path:
        return self.dir / "overlay.ext4"

    @property
    def channel(self) -> Path:
        return self.dir / "channel.sock"

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def host(self) -> Path:
        """The host's end of :data:`HOST_PORT`."""
        return self.dir / "host.sock"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def snapshot(self) -> Path:
        """A hibernated VM's device state and memory (QEMU's migration stream)."""
        return self.dir / "snapshot.vmstate"

    @property
    def record(self) -> Path:
        """What destroy needs when the controller lost the handle's runtime (a crash before it was
        stored): the namespace of the TAP."""
        return self.dir / "sandbox.json"

    def logs_tail(self) -> str:
        """The console's tail, and QEMU's own messages if it said any (a bad option, a failed open)."""
        console = file_tail(self.console, missing="")
        qemu = file_tail(self.qemu_log, 1024, missing="").strip()
        parts = [console.rstrip()] if console.strip() else ["(the guest's console is empty)"]
        if qemu:
            parts.append(f"qemu: {qemu}")
        return "\n".join(parts)

    def agent_listening(self) -> bool:
        """Whether the agent has started listening on its port (its log line, early on the console)."""
        try:
            with self.console.open("rb") as console:
                return b"agent.listening" in console.read(CONSOLE_HEAD_BYTES)
        except FileNotFoundError:
            return False

    def too_long(self) -> list[Path]:
        """Socket paths the controller cannot connect to (QEMU itself binds them relative to its cwd)."""
        return [path for path in (self.channel, self.qmp, self.host) if len(str(path)) > UNIX_PATH_MAX]


@dataclass(frozen=True, slots=True)
class VmImage:
    kernel: Path
    rootfs: Path
    initrd: Path | None


@dataclass(frozen=True, slots=True)
class VmConfig:
    """Everything that makes the same machine twice (boot, and resume from a snapshot)."""

    sandbox_id: str
    image: VmImage
    cmdline: str
    vcpus: int
    memory_mib: int
    accel: Accel
    network: VmNetwork | None
    uid: int
    groups: tuple[int, ...] = ()
    seccomp: bool = True
    tcg_tb_mib: int = 256
    host_port: bool = False
    """Whether the machine has :data:`HOST_PORT` (VMs started before it existed have not, and a
    snapshot resumes only on the devices it was saved with)."""
    nic_mac: str | None = None
    """The NIC's MAC when it is not the network's (a clone keeps its snapshot's device; the guest then
    takes the network's MAC itself)."""


def qemu_argv(qemu: str, config: VmConfig, *, incoming: bool = False) -> list[str]:
    """The command line. Paths are relative to the VM's directory (QEMU's cwd), or descriptors the
    launcher placed (the image's files and the TAP: root opens them)."""
    if config.accel == "kvm":
        accel, cpu = ["-accel", "kvm"], "host"
    else:
        accel, cpu = ["-accel", f"tcg,thread=multi,tb-size={config.tcg_tb_mib}"], "max"
    argv = [
        qemu, "-name", f"browservm-{config.sandbox_id}", "-nodefaults", "-no-user-config",
        "-M", "microvm,isa-serial=on,rtc=on", *accel, "-cpu", cpu,
        "-smp", str(config.vcpus), "-m", str(config.memory_mib),
        "-display", "none", "-no-reboot",
        "-kernel", f"/proc/self/fd/{KERNEL_FD}", "-append", config.cmdline,
        "-chardev", "file,id=console,path=console.log", "-serial", "chardev:console",
        "-qmp", "unix:qmp.sock,server=on,wait=off",
        # The image's ext4 read-only as /dev/vda, the VM's own ext4 (the overlay's upper layer) as /dev/vdb.
        "-drive", f"id=root,file=/proc/self/fd/{ROOTFS_FD},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-drive", "id=overlay,file=overlay.ext4,format=raw,if=none,discard=unmap",
        "-device", "virtio-blk-device,drive=overlay",
        "-device", "virtio-rng-device",
        "-device", "virtio-serial-device",
        "-chardev", "socket,id=channel,path=channel.sock,server=on,wait=off",
        "-device", f"virtserialport,chardev=channel,name={CHANNEL_PORT}",
    ]  # fmt: skip
    if config.host_port:
        argv += [
            "-chardev", "socket,id=host,path=host.sock,server=on,wait=off",
            "-device", f"virtserialport,chardev=host,name={HOST_PORT}",
        ]  # fmt: skip
    if config.image.initrd is not None:
        argv += ["-initrd", f"/proc/self/fd/{INITRD_FD}"]
    if config.network is not None:
        argv += [
            "-netdev", f"tap,id=net0,fd={TAP_FD}",
            "-device", f"virtio-net-device,netdev=net0,mac={config.nic_mac or config.network.mac}",
        ]  # fmt: skip
    if config.seccomp:
        argv += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    if incoming:
        argv += ["-incoming", f"fd:{INCOMING_FD}"]
    return argv


class QemuVM(VmmProcess):
    def __init__(
        self,
        sandbox_id: str,
        files: VmFiles,
        *,
        qemu: str,
        pid: int | None = None,
        start_time: float | None = None,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.files = files
        self.qemu = qemu
        super().__init__(pid, start_time)

    def _launch_spec(self, config: VmConfig, incoming: Path | None) -> dict[str, Any]:
        files = {str(ROOTFS_FD): str(config.image.rootfs), str(KERNEL_FD): str(config.image.kernel)}
        if config.image.initrd is not None:
            files[str(INITRD_FD)] = str(config.image.initrd)
        if incoming is not None:
            files[str(INCOMING_FD)] = str(incoming)
        spec: dict[str, Any] = {
            "uid": config.uid,
            "gid": config.uid,
            "groups": list(config.groups),
            "files": files,
            "argv": qemu_argv(self.qemu, config, incoming=incoming is not None),
        }
        if config.network is not None:
            spec["tap"] = {"name": config.network.tap, "fd": TAP_FD}
        return spec

    async def launch(self, config: VmConfig, *, incoming: Path | None = None, ready_s: float = 15.0) -> None:
        """Start QEMU (in the sandbox's network namespace, as the VM's user) and wait until its QMP
        socket answers: a bad option or an unopenable file fails here, with QEMU's words. ``incoming``:
        the machine's state comes from that migration stream (root opens it) instead of a boot."""
        argv = [
            sys.executable,
            "-I",
            "-S",
            launcher.__file__,
            json.dumps(self._launch_spec(config, incoming)),
        ]
        if config.network is not None:
            argv = ["nsenter", f"--net=/run/netns/{config.network.netns}", "--", *argv]
        for stale in (self.files.qmp, self.files.channel, self.files.host, self.files.pidfile):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        try:
            process = self._spawn(argv, self.files.qemu_log, cwd=self.files.dir, LANG="C.UTF-8")
        except OSError as exc:
            raise VmError(f"cannot start QEMU: {exc}") from exc
        # Written here, not by QEMU's -pidfile: that resolves its path, whose parents QEMU's user cannot enter.
        self.files.pidfile.write_text(f"{self.pid}\n")
        deadline = time.monotonic() + ready_s
        while True:
            if process.poll() is not None:
                raise VmError(f"QEMU exited at start (status {process.returncode})", self.files.logs_tail())
            if self.files.qmp.exists():
                try:
                    await asyncio.to_thread(self._qmp_ping)
                    return
                except QmpError:
                    pass
            if time.monotonic() >= deadline:
                raise VmError(
                    f"QEMU's QMP socket did not answer within {ready_s:.0f} s", self.files.logs_tail()
                )
            await asyncio.sleep(0.05)

    def _qmp_ping(self) -> None:
        with Qmp(self.files.qmp, timeout_s=5.0) as qmp:
            qmp.execute("query-status")

    async def wait_running(self, timeout_s: float) -> None:
        """After ``-incoming``: until the migration stream is loaded and the guest runs (a guest saved
        paused is loaded paused: it is continued)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                raise VmError("QEMU exited while loading the snapshot", self.files.logs_tail())
            status, incoming = await asyncio.to_thread(self._status)
            if status == "running":
                return
            if incoming == "failed":
                raise VmError("QEMU could not load the snapshot", self.files.logs_tail())
            if status == "paused" and incoming == "completed":
                await asyncio.to_thread(self._cont)
                continue
            if status not in ("inmigrate", "prelaunch", "restore-vm", "paused"):
                raise VmError(f"QEMU is {status} after loading the snapshot", self.files.logs_tail())
            if time.monotonic() >= deadline:
                raise VmError(
                    f"the snapshot was not loaded within {timeout_s:.0f} s (QEMU is {status}, "
                    f"the migration {incoming})",
                    self.files.logs_tail(),
                )
            await asyncio.sleep(0.1)

    def _status(self) -> tuple[str, str]:
        with Qmp(self.files.qmp) as qmp:
            status = str(qmp.execute("query-status")["status"])
            incoming = str(qmp.execute("query-migrate").get("status", ""))
            return status, incoming

    def _cont(self) -> None:
        with Qmp(self.files.qmp) as qmp:
            qmp.execute("cont")

    async def hibernate(self, timeout_s: float, to: Path | None = None) -> None:
        """Write the guest's state and memory to ``to`` (default :attr:`VmFiles.snapshot`; QEMU stops
        it for the last pass), and end QEMU."""
        await asyncio.to_thread(self._migrate_to_file, timeout_s, to or self.files.snapshot)
        await asyncio.to_thread(self._wait_gone, STOP_WAIT_S)
        if self.alive():
            await self.kill()

    def _migrate_to_file(self, timeout_s: float, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with Qmp(self.files.qmp, timeout_s=timeout_s) as qmp:
                qmp.execute("migrate-set-parameters", {"max-bandwidth": MIGRATION_BANDWIDTH})
                qmp.execute("getfd", {"fdname": "snapshot"}, fd=fd)
                qmp.execute("migrate", {"uri": "fd:snapshot"})
                status = qmp.wait_migration(timeout_s)
                log.info(
                    "qemu.migrated",
                    sandbox_id=self.sandbox_id,
                    total_ms=status.get("total-time"),
                    bytes=os.fstat(fd).st_size,
                )
                with contextlib.suppress(QmpError):  # it may hang up before it answers
                    qmp.execute("quit")
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
        finally:
            os.close(fd)

    async def tell_guest(self, message: dict[str, Any], timeout_s: float) -> None:
        """Send one message to the guest's root helper over :data:`HOST_PORT` and wait for its answer.
        Resent on a fresh connection until answered (the helper applies a message twice harmlessly);
        raises :class:`VmError` with the helper's words when it refuses, or when it never answers."""
        nonce = os.urandom(8).hex()
        line = json.dumps({**message, "nonce": nonce}).encode() + b"\n"
        deadline = time.monotonic() + timeout_s
        last = "it never answered"
        while time.monotonic() < deadline:
            if not self.alive():
                raise VmError("the VM ended before its identity helper answered", self.files.logs_tail())
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.files.host))
            except OSError as exc:
                last = f"cannot connect to {self.files.host.name}: {exc}"
                await asyncio.sleep(0.1)
                continue
            try:
                writer.write(line)
                await writer.drain()
                async with asyncio.timeout(min(GUEST_ANSWER_S, max(0.1, deadline - time.monotonic()))):
                    while True:  # an answer to an earlier try may come first
                        answer = json.loads(await reader.readuntil(b"\n"))
                        if isinstance(answer, dict) and answer.get("nonce") == nonce:
                            break
                if not answer.get("ok"):
                    raise VmError(f"the guest refused: {answer.get('error', '?')}", self.files.logs_tail())
                return
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
                last = f"no answer on this try ({type(exc).__name__})"
            finally:
                writer.close()
        raise VmError(
            f"the guest's identity helper did not answer within {timeout_s:.0f} s: {last}",
            self.files.logs_tail(),
        )

    async def kill(self) -> None:
        """End QEMU: SIGTERM (it stops at once), SIGKILL if it has not after a while."""
        if self.alive():
            assert self.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            await asyncio.to_thread(self._wait_gone, STOP_WAIT_S)
            if self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                await asyncio.to_thread(self._wait_gone, STOP_WAIT_S)
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(STOP_WAIT_S)


def processes_in(directory: Path) -> list[psutil.Process]:
    """QEMU processes running in ``directory`` (a VM whose pid was never recorded, or an orphan's)."""
    found = []
    for process in psutil.process_iter(["cwd", "name"]):
        cwd = process.info.get("cwd")
        if cwd and Path(cwd) == directory and process.info.get("name", "").startswith("qemu"):
            found.append(process)
    return found


def processes_under(directory: Path) -> dict[str, list[psutil.Process]]:
    """QEMU processes running in any VM directory under ``directory``, by sandbox id."""
    found: dict[str, list[psutil.Process]] = {}
    for process in psutil.process_iter(["cwd", "name"]):
        cwd = process.info.get("cwd")
        if not cwd or not process.info.get("name", "").startswith("qemu"):
            continue
        path = Path(cwd)
        if path.parent == directory:
            found.setdefault(path.name, []).append(process)
    return found
