"""A stand-in for the ``firecracker`` binary: Firecracker v1.16.1's API contract, played for real.

Started in place of firecracker (``--api-sock PATH --id ID``, ``--version``), it serves the API on the
unix socket over HTTP/1.1, checks every request against the published OpenAPI document
(:mod:`tests.sandbox.firecracker.contract`) and answers as Firecracker does: 204 on success, 400 with a
``fault_message`` in Firecracker's words otherwise, and the same state rules (pre-boot configuration only
before InstanceStart, pause/resume/snapshot only after, snapshot create only while paused, snapshot load
only into a fresh process, and a process that exits after a failed restore). It checks its own answers
against the document too.

What it does with the configuration is real where this machine allows: it opens the kernel, initrd and
drive files, attaches to the TAP with TUNSETIFF in the network namespace it was started in, binds the
vsock unix socket and speaks Firecracker's ``CONNECT <port>`` / ``OK <port>`` protocol on it, and writes
the serial console to ``serial_out_path``. The guest is played by the real guest agent as a child
process, started from the ``browservm.*`` keys of the kernel command line, listening on a unix socket
that stands for its vsock port; the writable drive's data lives beside the drive file. Pause is SIGSTOP of
that guest, and a snapshot keeps the configuration (not the guest's memory: the guest is started again
on restore, with its disk as it was).

Every request, its check and the answer are appended as a JSON line to ``$FC_STANDIN_LOG``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import h11

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.sandbox.firecracker.contract import Contract, document_path

VERSION = "1.16.1"
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
PR_SET_PDEATHSIG = 1

POST_BOOT = "The requested operation is not supported after starting the microVM."
PRE_BOOT = "The requested operation is not supported before starting the microVM."
LOAD_NOT_ALLOWED = (
    "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources."
)
RUNNING_SNAPSHOT = "Create snapshot error: Cannot save the microVM state: Operation not allowed: save/restore unavailable while running"


def os_error(exc: OSError) -> str:
    """Rust's io::Error display: ``No such file or directory (os error 2)``."""
    return f"{os.strerror(exc.errno or 0)} (os error {exc.errno})"


class Refused(Exception):
    def __init__(self, fault_message: str, status: int = 400) -> None:
        super().__init__(fault_message)
        self.fault_message = fault_message
        self.status = status


class Fatal(Refused):
    """Firecracker answers, then exits: a failed restore leaves the process unusable."""


class Guest:
    """The guest agent as a child process, from the ``browservm.*`` keys of the kernel command line."""

    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[int, Path] = {}

    def start(self) -> None:
        keys = dict(
            arg.split("=", 1)
            for arg in (self.vmm.boot_source or {}).get("boot_args", "").split()
            if "=" in arg
        )
        console = self.vmm.console()
        console.write(f"standin: booting {self.vmm.boot_source!r}\n".encode())
        console.flush()
        if "browservm.sandbox_id" not in keys:
            console.write(b"standin: no browservm.sandbox_id on the command line; no agent to start\n")
            return
        listen = keys.get("browservm.listen", "")
        match = re.fullmatch(r"vsock:(\d+)", listen)
        if match is None:
            console.write(f"standin: browservm.listen={listen!r} is not vsock:PORT\n".encode())
            return
        port = int(match.group(1))
        scratch = self.vmm.scratch()
        self.ports[port] = scratch / f"v_{port}.sock"
        data = self.vmm.writable_data()
        (data / "home").mkdir(parents=True, exist_ok=True)
        (scratch / "run").mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(data / "home"),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(Path(__file__).resolve().parents[3]),
            **json.loads(base64.urlsafe_b64decode(keys.get("browservm.env", "e30="))),
        }
        argv = [
            sys.executable, "-m", "browservm.guest.agent",
            "--sandbox-id", keys["browservm.sandbox_id"],
            "--role", keys.get("browservm.role", "cli"),
            "--listen", f"unix:{self.ports[port]}",
            "--home", str(data / "home"),
            "--run-dir", str(scratch / "run"),
        ]  # fmt: skip
        libc = ctypes.CDLL(None, use_errno=True)
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=data / "home",
            # The guest dies with its VMM, as a VM does.
            preexec_fn=lambda: libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL),
        )

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self) -> None:
        if self.process is not None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
            self.process.wait()
            self.process = None


class Vmm:
    def __init__(
        self, instance_id: str, api_socket: Path, root: Path | None, contract: Contract, log: Path | None
    ):
        self.instance_id = instance_id
        self.api_socket = api_socket
        self.root = root
        self.contract = contract
        self.log = log
        self.state = "Not started"
        self.boot_path = False
        self.machine: dict[str, Any] = {
            "vcpu_count": 1,
            "mem_size_mib": 128,
            "smt": False,
            "track_dirty_pages": False,
        }
        self.boot_source: dict[str, Any] | None = None
        self.drives: dict[str, dict[str, Any]] = {}
        self.interfaces: dict[str, dict[str, Any]] = {}
        self.vsock: dict[str, Any] | None = None
        self.serial: dict[str, Any] | None = None
        self.taps: dict[str, int] = {}
        self.vsock_server: asyncio.Server | None = None
        self.local_port = (1 << 30) - 1
        self.running = asyncio.Event()
        self.guest = Guest(self)
        self.exit_after_answer: int | None = None
        self._console: Any = None
        self.user = (
            (int(os.environ["FC_STANDIN_UID"]), int(os.environ["FC_STANDIN_GID"]))
            if os.environ.get("FC_STANDIN_UID")
            else None
        )
        """Jailed: the uid and gid firecracker would run as; files and the TAP are checked as that user."""

    # ------------------------------------------------------------------ paths as the VMM sees them

    def host_path(self, path: str) -> Path:
        """A path of the API, on the host: inside the jail's root when jailed."""
        if self.root is not None:
            return self.root / path.lstrip("/")
        return Path(path)

    def may(self, path: Path, *, write: bool = False) -> Path:
        """Raise as open(2) would for the jailed user (a file to create needs its directory writable)."""
        if self.user is not None:
            target = path if path.exists() else path.parent
            mode = target.stat()
            uid, gid = self.user
            if mode.st_uid == uid:
                bits = mode.st_mode >> 6
            elif mode.st_gid == gid:
                bits = mode.st_mode >> 3
            else:
                bits = mode.st_mode
            if not bits & (2 if write or target != path else 4):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return path

    def scratch(self) -> Path:
        directory = self.api_socket.parent / ".standin"
        directory.mkdir(exist_ok=True)
        return directory

    def writable_data(self) -> Path:
        """The guest's disk: beside the writable drive's file, so it lives and dies with that file."""
        for drive in self.drives.values():
            if not drive["is_read_only"] and not drive["is_root_device"]:
                return Path(f"{self.host_path(drive['path_on_host'])}.standin")
        return self.scratch() / "disk"

    def console(self) -> Any:
        if self._console is None:
            if self.serial and self.serial.get("serial_out_path"):
                self._console = self.may(self.host_path(self.serial["serial_out_path"]), write=True).open(
                    "ab"
                )
            else:
                self._console = sys.stdout.buffer
        return self._console

    # ------------------------------------------------------------------ HTTP

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                request: h11.Request | None = None
                body = b""
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        connection.receive_data(data)
                        if not data and connection.their_state is not h11.DONE:
                            return
                        continue
                    if isinstance(event, h11.ConnectionClosed):
                        return
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                assert request is not None
                status, answer = await self.handle(request.method.decode(), request.target.decode(), body)
                headers = [("Server", "Firecracker API"), ("Connection", "keep-alive")]
                payload = b""
                if answer is not None:
                    payload = json.dumps(answer).encode()
                    headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
                writer.write(connection.send(h11.Response(status_code=status, headers=headers)) or b"")
                if payload:
                    writer.write(connection.send(h11.Data(data=payload)) or b"")
                writer.write(connection.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                if self.exit_after_answer is not None:
                    self.shutdown(self.exit_after_answer)
                connection.start_next_cycle()
        except (h11.RemoteProtocolError, ConnectionError):
            return
        finally:
            writer.close()

    async def handle(self, method: str, path: str, raw: bytes) -> tuple[int, Any]:
        body: Any = None
        entry: dict[str, Any] = {"method": method, "path": path}
        try:
            body = json.loads(raw) if raw else None
        except ValueError as exc:
            entry.update(errors=[f"body is not JSON: {exc}"])
            return self.answer(
                entry, 400, f"An error occurred when deserializing the json body of a request: {exc}."
            )
        entry["body"] = body
        checked = self.contract.check_request(method, path, body)
        entry.update(operation=checked.operation, errors=checked.errors)
        if checked.operation is None:
            return self.answer(entry, 400, f"Invalid request method and/or path: {method} {path}.")
        if checked.errors:
            return self.answer(
                entry,
                400,
                f"An error occurred when deserializing the json body of a request: {checked.errors[0]}.",
            )
        try:
            result = await self.dispatch(checked.operation, path, body)
        except Fatal as exc:
            self.exit_after_answer = 1
            return self.answer(entry, exc.status, exc.fault_message)
        except Refused as exc:
            return self.answer(entry, exc.status, exc.fault_message)
        return self.answer(entry, 200 if result is not None else 204, None, result)

    def answer(
        self, entry: dict[str, Any], status: int, fault: str | None, result: Any = None
    ) -> tuple[int, Any]:
        answer = {"fault_message": fault} if fault is not None else result
        entry.update(status=status, fault_message=fault)
        entry["response_errors"] = self.contract.check_response(
            entry["method"], entry["path"], status, answer
        )
        if self.log is not None:
            with self.log.open("a") as file:
                file.write(json.dumps(entry) + "\n")
        return status, answer

    # ------------------------------------------------------------------ the API

    async def dispatch(self, operation: str, path: str, body: Any) -> Any:
        started = self.state != "Not started"
        pre_boot_only = {
            "putMachineConfiguration", "patchMachineConfiguration", "putGuestBootSource", "putGuestVsock",
            "putSerialDevice", "putLogger", "putMetrics", "putMmdsConfig", "putEntropyDevice", "putBalloon",
            "putCpuConfiguration", "putMemoryHotplug", "loadSnapshot",
        }  # fmt: skip
        post_boot_only = {
            "patchVm",
            "createSnapshot",
            "patchGuestDriveByID",
            "patchGuestNetworkInterfaceByID",
        }
        if started and operation in pre_boot_only:
            raise Refused(POST_BOOT)
        if not started and operation in post_boot_only:
            raise Refused(PRE_BOOT)
        match operation:
            case "describeInstance":
                return {
                    "app_name": "Firecracker",
                    "id": self.instance_id,
                    "state": self.state,
                    "vmm_version": VERSION,
                }
            case "getFirecrackerVersion":
                return {"firecracker_version": VERSION}
            case "getMachineConfiguration":
                return self.machine
            case "putMachineConfiguration":
                return self.put_machine(body)
            case "putGuestBootSource":
                return self.put_boot_source(body)
            case "putGuestDriveByID":
                return self.put_drive(path.rsplit("/", 1)[1], body)
            case "putGuestNetworkInterfaceByID":
                return self.put_interface(path.rsplit("/", 1)[1], body)
            case "putGuestVsock":
                return await self.put_vsock(body)
            case "putSerialDevice":
                self.serial = body
                return None
            case "createSyncAction":
                return self.action(body["action_type"])
            case "patchVm":
                return self.patch_vm(body["state"])
            case "createSnapshot":
                return self.create_snapshot(body)
            case "loadSnapshot":
                return await self.load_snapshot(body)
        raise Refused(f"The requested operation is not supported: the stand-in does not play {operation}")

    def put_machine(self, body: dict[str, Any]) -> None:
        if body["mem_size_mib"] == 0:
            raise Refused(
                "Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size."
            )
        if body.get("smt") and body["vcpu_count"] > 1 and body["vcpu_count"] % 2:
            raise Refused(
                "Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 "
                "or an even number if SMT is enabled."
            )
        self.boot_path = True
        self.machine = {"smt": False, "track_dirty_pages": False, **body}

    def put_boot_source(self, body: dict[str, Any]) -> None:
        self.boot_path = True
        try:
            self.may(self.host_path(body["kernel_image_path"])).open("rb").close()
        except OSError as exc:
            raise Refused(f"Boot source error: The kernel file cannot be opened: {os_error(exc)}") from exc
        if initrd := body.get("initrd_path"):
            try:
                self.may(self.host_path(initrd)).open("rb").close()
            except OSError as exc:
                raise Refused(
                    "Boot source error: The initrd file cannot be opened due to invalid path or invalid "
                    f"permissions. {os_error(exc)}"
                ) from exc
        self.boot_source = body

    def _checked_id(self, id_from_path: str, id_from_body: str) -> None:
        if not re.fullmatch(r"\w+", id_from_path):
            raise Refused("API Resource IDs can only contain alphanumeric characters and underscores.")
        if id_from_path != id_from_body:
            raise Refused("The id from the path does not match the id from the body!")

    def put_drive(self, drive_id: str, body: dict[str, Any]) -> None:
        if self.state != "Not started":
            raise Refused("PCI is not enabled")  # after boot a new drive would be a PCI hotplug
        self._checked_id(drive_id, body["drive_id"])
        self.boot_path = True
        if body["is_root_device"] and any(
            d["is_root_device"] for i, d in self.drives.items() if i != drive_id
        ):
            raise Refused("Drive config error: A root block device already exists!")
        self._open_drive(body)
        self.drives[drive_id] = body

    def _open_drive(self, body: dict[str, Any]) -> None:
        path = self.host_path(body.get("path_on_host", ""))
        try:
            self.may(path, write=not body.get("is_read_only"))
            os.close(os.open(path, os.O_RDONLY if body.get("is_read_only") else os.O_RDWR))
        except OSError as exc:
            raise Refused(
                "Drive config error: Unable to create the virtio block device: Virtio backend error: Error "
                f"manipulating the backing file: {os_error(exc)} {path}"
            ) from exc

    def put_interface(self, iface_id: str, body: dict[str, Any]) -> None:
        if self.state != "Not started":
            raise Refused("PCI is not enabled")
        self._checked_id(iface_id, body["iface_id"])
        self.boot_path = True
        mac = body.get("guest_mac")
        if mac and any(i.get("guest_mac") == mac for k, i in self.interfaces.items() if k != iface_id):
            raise Refused(f"Network config error: The MAC address is already in use: {mac}")
        self._attach_tap(iface_id, body["host_dev_name"])
        self.interfaces[iface_id] = body

    def _attach_tap(self, iface_id: str, name: str) -> None:
        """What Firecracker does: TUNSETIFF on /dev/net/tun, in the namespace it runs in."""
        with contextlib.suppress(KeyError, OSError):
            os.close(self.taps.pop(iface_id))
        owner = Path(f"/sys/class/net/{name}/owner")
        if self.user is not None and owner.exists() and int(owner.read_text()) != self.user[0]:
            raise Refused(
                f"Network config error: Cannot open/create the tap device: Open tap device failed: "
                f"{os_error(OSError(errno.EPERM, ''))}: {name} is not owned by uid {self.user[0]}"
            )
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise Refused(
                f"Network config error: Cannot open/create the tap device: Open tap device failed: {os_error(exc)}"
            ) from exc
        try:
            fcntl.ioctl(
                fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            )
        except OSError as exc:
            os.close(fd)
            raise Refused(
                f"Network config error: Cannot open/create the tap device: Error while creating ifreq structure: "
                f"{os_error(exc)}. Invalid TUN/TAP Backend provided by {name}. Check our documentation on setting "
                "up the network devices."
            ) from exc
        self.taps[iface_id] = fd

    async def put_vsock(self, body: dict[str, Any]) -> None:
        self.boot_path = True
        await self._bind_vsock(body["uds_path"])
        self.vsock = body

    async def _bind_vsock(self, uds_path: str) -> None:
        """Firecracker binds the vsock unix socket when the device is configured, not at boot."""
        if self.vsock_server is not None:
            self.vsock_server.close()
        path = self.host_path(uds_path)
        if path.exists():
            raise Refused(
                "Vsock config error: Cannot create backend for vsock device: Error binding to the host-side "
                f"Unix socket: {os_error(OSError(errno.EADDRINUSE, ''))}"
            )
        try:
            self.may(path, write=True)
        except OSError as exc:
            raise Refused(
                "Vsock config error: Cannot create backend for vsock device: Error binding to the host-side "
                f"Unix socket: {os_error(exc)}"
            ) from exc
        self.vsock_server = await asyncio.start_unix_server(self.vsock_connection, path=str(path))

    def action(self, action_type: str) -> None:
        if action_type == "InstanceStart":
            if self.state != "Not started":
                raise Refused(POST_BOOT)
            if self.boot_source is None:
                raise Refused("Start microvm error: Cannot start microvm without kernel configuration.")
            self.state = "Running"
            self.running.set()
            self.guest.start()
        elif action_type == "SendCtrlAltDel":
            if self.state == "Not started":
                raise Refused(PRE_BOOT)
            # The guest reboots, which ends a Firecracker VM (reboot=k): the process exits.
            self.exit_after_answer = 0
        elif action_type == "FlushMetrics" and self.state == "Not started":
            raise Refused(PRE_BOOT)

    def patch_vm(self, state: str) -> None:
        if state == "Paused":
            self.guest.signal(signal.SIGSTOP)
            self.state = "Paused"
            self.running.clear()
        else:
            self.guest.signal(signal.SIGCONT)
            self.state = "Running"
            self.running.set()

    def create_snapshot(self, body: dict[str, Any]) -> None:
        if self.state != "Paused":
            raise Refused(RUNNING_SNAPSHOT)
        state = {
            "machine": self.machine, "boot_source": self.boot_source, "drives": self.drives,
            "interfaces": self.interfaces, "vsock": self.vsock, "serial": self.serial,
        }  # fmt: skip
        try:
            with self.may(self.host_path(body["snapshot_path"]), write=True).open("w") as file:
                json.dump({"standin_snapshot": VERSION, **state}, file)
        except OSError as exc:
            raise Refused(
                f"Create snapshot error: Cannot perform open on the snapshot backing file: {os_error(exc)}"
            ) from exc
        try:
            with self.may(self.host_path(body["mem_file_path"]), write=True).open("wb") as file:
                os.ftruncate(file.fileno(), self.machine["mem_size_mib"] * 1024 * 1024)
        except OSError as exc:
            raise Refused(
                f"Create snapshot error: Cannot perform open on the memory backing file: {os_error(exc)}"
            ) from exc

    async def load_snapshot(self, body: dict[str, Any]) -> None:
        if ("mem_backend" in body) == ("mem_file_path" in body):
            which = (
                "too many fields: either `mem_backend` or `mem_file_path` exclusively is required"
                if "mem_backend" in body
                else "missing field: either `mem_backend` or `mem_file_path` is required"
            )
            raise Refused(f"An error occurred when deserializing the json body of a request: {which}.")
        if self.boot_path:
            raise Refused(LOAD_NOT_ALLOWED)
        try:
            state = json.loads(self.host_path(body["snapshot_path"]).read_text())
        except OSError as exc:
            raise Fatal(
                "Load snapshot error: Failed to restore from snapshot: Failed to get snapshot state from file: "
                f"Failed to open snapshot file: {os_error(exc)}"
            ) from exc
        memory = body["mem_backend"]["backend_path"] if "mem_backend" in body else body["mem_file_path"]
        try:
            self.host_path(memory).open("rb").close()
        except OSError as exc:
            raise Fatal(
                "Load snapshot error: Failed to restore from snapshot: Failed to load guest memory: Error creating "
                f"guest memory from file: Failed to load guest memory: {os_error(exc)}"
            ) from exc
        try:
            self.machine, self.boot_source, self.serial = (
                state["machine"],
                state["boot_source"],
                state["serial"],
            )
            for drive in state["drives"].values():
                self._open_drive(drive)
            self.drives = state["drives"]
            overrides = {o["iface_id"]: o["host_dev_name"] for o in body.get("network_overrides", [])}
            for iface_id, interface in state["interfaces"].items():
                interface["host_dev_name"] = overrides.pop(iface_id, interface["host_dev_name"])
                self._attach_tap(iface_id, interface["host_dev_name"])
            if overrides:
                raise Refused(
                    "Load snapshot error: Failed to restore from snapshot: Failed to get snapshot state from file: Unknown Network Device."
                )
            self.interfaces = state["interfaces"]
            if state["vsock"] is not None:
                uds = body.get("vsock_override", {}).get("uds_path", state["vsock"]["uds_path"])
                await self._bind_vsock(uds)
                self.vsock = {**state["vsock"], "uds_path": uds}
        except Refused as exc:
            raise Fatal(
                exc.fault_message.replace(
                    "Drive config error:",
                    "Load snapshot error: Failed to restore from snapshot: Failed to build microVM from snapshot:",
                )
            ) from exc
        self.state = "Paused"
        if body.get("resume_vm"):
            self.state = "Running"
            self.running.set()
            self.guest.start()

    # ------------------------------------------------------------------ vsock

    async def vsock_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readuntil(b"\n")
            words = line.decode(errors="replace").split()
            if len(words) != 2 or words[0].lower() != "connect" or not words[1].isdigit():
                return  # Firecracker drops an invalid port request without an answer
            await self.running.wait()  # a paused guest cannot accept
            target = self.guest.ports.get(int(words[1]))
            if target is None:
                return
            try:
                guest_reader, guest_writer = await asyncio.open_unix_connection(str(target))
            except (FileNotFoundError, ConnectionRefusedError):
                return  # nobody listens on that guest port: the guest answers RST, the host sees EOF
            self.local_port = ((self.local_port + 1) & ~(1 << 31)) | (1 << 30)
            writer.write(f"OK {self.local_port}\n".encode())
            await writer.drain()
            await asyncio.gather(pipe(reader, guest_writer), pipe(guest_reader, writer))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        finally:
            writer.close()

    def shutdown(self, code: int) -> None:
        self.guest.stop()
        with contextlib.suppress(FileNotFoundError):
            self.api_socket.unlink()
        os._exit(code)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(args: argparse.Namespace) -> None:
    document = document_path()
    if document is None:
        sys.exit("standin: Firecracker's API document is not there to check requests against")
    root = Path(os.environ["FC_STANDIN_ROOT"]) if os.environ.get("FC_STANDIN_ROOT") else None
    api_socket = Path(args.api_sock) if root is None else root / args.api_sock.lstrip("/")
    log = Path(os.environ["FC_STANDIN_LOG"]) if os.environ.get("FC_STANDIN_LOG") else None
    vmm = Vmm(args.id, api_socket, root, Contract(document), log)
    if api_socket.exists():
        sys.exit(f"Failed to open the API socket at: {api_socket}. Check that it is not already used.")
    server = await asyncio.start_unix_server(vmm.serve, path=str(api_socket))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, vmm.shutdown, 0)
    print(f"Running Firecracker v{VERSION} (stand-in)", flush=True)
    async with server:
        await asyncio.Event().wait()


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="firecracker", add_help=False)
    parser.add_argument("--api-sock", default="/run/firecracker.socket")
    parser.add_argument("--id", default="anonymous-instance")
    parser.add_argument("--version", action="store_true")
    parser.add_argument("--start-time-us")
    parser.add_argument("--start-time-cpu-us")
    args, unknown = parser.parse_known_args()
    if unknown:
        sys.exit(
            f"Arguments parsing error: Found argument '{unknown[0]}' which wasn't expected, or isn't valid in this context."
        )
    if args.version:
        print(f"Firecracker v{VERSION}\n")
        sys.exit(0)
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", args.id):
        sys.exit(f"Invalid instance ID: {args.id!r}")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse()))
