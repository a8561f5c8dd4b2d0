"""An async client of Firecracker's REST API, spoken over its API unix socket.

One :class:`FirecrackerClient` per Firecracker process. Every request body is a model from
:mod:`.definitions`; every answer other than 2xx becomes a :class:`FirecrackerApiError` carrying
Firecracker's own ``fault_message`` and a hint that says what to do about it. Firecracker answers
every refused request with 400 (413 for an MMDS store over its limit) and a ``fault_message``; the
message, not the status, says what went wrong, so the hints are matched on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import structlog

from browservm.sandbox.firecracker.definitions import (
    BootSource,
    Definition,
    Drive,
    Error,
    FirecrackerVersion,
    InstanceActionInfo,
    InstanceInfo,
    MachineConfiguration,
    NetworkInterface,
    SerialDevice,
    SnapshotCreateParams,
    SnapshotLoadParams,
    Vm,
    Vsock,
)

log = structlog.get_logger(__name__)

REQUEST_TIMEOUT_S = 10.0
SNAPSHOT_TIMEOUT_S = 300.0
"""Writing or mapping guest memory: seconds per GiB on a slow disk."""
READY_POLL_S = 0.01


class FirecrackerError(Exception):
    """Something between the driver and a Firecracker process went wrong."""


class FirecrackerUnreachable(FirecrackerError):
    """The API socket does not answer (the process is not up yet, or has gone)."""

    def __init__(self, socket: Path, why: str) -> None:
        super().__init__(f"Firecracker API at {socket} does not answer: {why}")
        self.socket = socket


# Firecracker's fault messages start with the error's kind; each kind has a likely cause and a fix.
_HINTS: list[tuple[str, str]] = [
    (
        "not supported after starting the microVM",
        "the VM has already started (or was loaded from a snapshot): configure it before InstanceStart",
    ),
    (
        "not supported before starting the microVM",
        "the VM has not started yet: pause, resume and snapshots need InstanceStart or a loaded snapshot",
    ),
    (
        "Loading a microVM snapshot not allowed",
        "a snapshot loads only into a fresh Firecracker process, before anything else is configured",
    ),
    (
        "save/restore unavailable while running",
        "pause the VM (PATCH /vm Paused) before creating a snapshot",
    ),
    (
        "Boot source error",
        "the kernel (BROWSERVM_VM_KERNEL, an uncompressed vmlinux) or initrd is missing or unreadable "
        "by the firecracker process; with the jailer it must be inside the chroot",
    ),
    (
        "Drive config error",
        "a drive's file (the image's root ext4, BROWSERVM_VM_ROOTFS, or the sandbox's overlay) is "
        "missing or unreadable by the firecracker process",
    ),
    (
        "Network config error",
        "the TAP must exist in the network namespace firecracker runs in, be free (no other VMM on it) "
        "and, under the jailer, be owned by the jailer's uid; and each guest MAC must be unique",
    ),
    (
        "Vsock config error",
        "the vsock unix socket path must be free (a stale socket file from a killed VMM?) and short "
        "enough for a unix socket (107 bytes)",
    ),
    (
        "Failed to restore from snapshot",
        "the snapshot files must exist and come from the same Firecracker version and host CPU; the "
        "process exits after a failed restore, so start a new one",
    ),
    ("Create snapshot error", "the snapshot directory must exist and have room for the guest's memory"),
    (
        "Start microvm error",
        "the host must give firecracker /dev/kvm with hardware virtualization (kvm_intel or kvm_amd); "
        "see docs/firecracker.md",
    ),
    ("Machine config error", "vCPUs must be 1-32 and memory a positive number of MiB"),
    (
        "deserializing the json body",
        "the request does not match Firecracker's API: this driver and the firecracker binary disagree "
        "(the driver is written to v1.16.1)",
    ),
    (
        "Invalid request method and/or path",
        "this firecracker does not have that endpoint (older than v1.16?)",
    ),
]


def hint_for(fault_message: str) -> str:
    for marker, hint in _HINTS:
        if marker in fault_message:
            return hint
    return "see the firecracker process's log (vmm.log in the sandbox directory)"


class FirecrackerApiError(FirecrackerError):
    """Firecracker refused a request; ``fault_message`` is its own words."""

    def __init__(self, method: str, path: str, status: int, fault_message: str) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = fault_message
        self.hint = hint_for(fault_message)
        super().__init__(
            f"{method} {path} -> {status}: {fault_message or '(no fault_message)'} ({self.hint})"
        )


class FirecrackerClient:
    def __init__(self, socket: Path) -> None:
        self.socket = socket
        # Firecracker's HTTP server ignores the host; the URL only needs one.
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket)),
            base_url="http://localhost",
            timeout=REQUEST_TIMEOUT_S,
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> FirecrackerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ plumbing

    async def _request(
        self, method: str, path: str, body: Definition | None = None, *, timeout_s: float = REQUEST_TIMEOUT_S
    ) -> Any:
        try:
            response = await self._http.request(
                method,
                path,
                json=body.body() if body is not None else None,
                headers={"Accept": "application/json"},
                timeout=timeout_s,
            )
        except (httpx.TransportError, OSError) as exc:
            raise FirecrackerUnreachable(self.socket, f"{method} {path}: {exc!r}") from exc
        if response.status_code == 204:
            return None
        if response.is_success:
            return response.json()
        try:
            fault = Error.model_validate(response.json()).fault_message
        except ValueError:
            fault = response.text[:500]
        error = FirecrackerApiError(method, path, response.status_code, fault)
        log.warning("firecracker.refused", method=method, path=path, status=error.status, fault=fault)
        raise error

    # ------------------------------------------------------------------ readiness

    async def wait_ready(self, timeout_s: float, *, alive: Callable[[], bool] | None = None) -> InstanceInfo:
        """Until the API socket answers ``GET /``.

        Firecracker creates its socket once its API thread listens, and no event announces that: the
        socket is tried every few milliseconds. ``alive`` (a callable) stops the wait early when the
        process has exited.
        """
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise FirecrackerUnreachable(self.socket, "the firecracker process exited")
            try:
                return await self.describe_instance()
            except FirecrackerUnreachable as exc:
                last = exc
            await asyncio.sleep(READY_POLL_S)
        raise FirecrackerUnreachable(self.socket, f"no answer within {timeout_s:.1f}s ({last})")

    # ------------------------------------------------------------------ endpoints

    async def describe_instance(self) -> InstanceInfo:
        return InstanceInfo.model_validate(await self._request("GET", "/"))

    async def version(self) -> str:
        return FirecrackerVersion.model_validate(await self._request("GET", "/version")).firecracker_version

    async def put_machine_config(self, config: MachineConfiguration) -> None:
        await self._request("PUT", "/machine-config", config)

    async def put_boot_source(self, boot: BootSource) -> None:
        await self._request("PUT", "/boot-source", boot)

    async def put_drive(self, drive: Drive) -> None:
        await self._request("PUT", f"/drives/{drive.drive_id}", drive)

    async def put_network_interface(self, interface: NetworkInterface) -> None:
        await self._request("PUT", f"/network-interfaces/{interface.iface_id}", interface)

    async def put_vsock(self, vsock: Vsock) -> None:
        await self._request("PUT", "/vsock", vsock)

    async def put_serial(self, serial: SerialDevice) -> None:
        await self._request("PUT", "/serial", serial)

    async def start(self) -> None:
        await self._request("PUT", "/actions", InstanceActionInfo(action_type="InstanceStart"))

    async def send_ctrl_alt_del(self) -> None:
        await self._request("PUT", "/actions", InstanceActionInfo(action_type="SendCtrlAltDel"))

    async def pause(self) -> None:
        await self._request("PATCH", "/vm", Vm(state="Paused"))

    async def resume(self) -> None:
        await self._request("PATCH", "/vm", Vm(state="Resumed"))

    async def create_snapshot(self, params: SnapshotCreateParams) -> None:
        await self._request("PUT", "/snapshot/create", params, timeout_s=SNAPSHOT_TIMEOUT_S)

    async def load_snapshot(self, params: SnapshotLoadParams) -> None:
        await self._request("PUT", "/snapshot/load", params, timeout_s=SNAPSHOT_TIMEOUT_S)
