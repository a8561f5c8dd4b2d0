"""The bodies of Firecracker's API that the driver sends and reads, as typed models.

Each model is one entry of the ``definitions:`` section of Firecracker's published OpenAPI document
(v1.16.1), with the same field names, and only the fields the driver uses or may reasonably set. Models
forbid unknown fields, as Firecracker itself does (its config structs are ``deny_unknown_fields``), so a
typo fails here rather than as a 400 from the VMM. Optional fields left at ``None`` are not sent.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Definition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def body(self) -> dict[str, Any]:
        """The JSON body Firecracker expects: unset optional fields are left out."""
        return self.model_dump(mode="json", exclude_none=True)


# ---------------------------------------------------------------------------------------------- requests


class MachineConfiguration(Definition):
    """``PUT /machine-config``. Pre-boot only."""

    vcpu_count: int = Field(ge=1, le=32)
    mem_size_mib: int = Field(ge=1)
    smt: bool | None = None
    track_dirty_pages: bool | None = None
    """Needed only for diff snapshots; full snapshots (hibernate) do not need it."""
    huge_pages: Literal["None", "2M"] | None = None


class BootSource(Definition):
    """``PUT /boot-source``: the guest kernel (an uncompressed ``vmlinux`` on x86_64)."""

    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None


class Drive(Definition):
    """``PUT /drives/{drive_id}``: a virtio-block device backed by a file on the host."""

    drive_id: str = Field(pattern=r"^\w+$")
    """Firecracker takes only letters, digits and '_' in resource ids."""
    is_root_device: bool
    is_read_only: bool
    path_on_host: str
    cache_type: Literal["Unsafe", "Writeback"] | None = None
    io_engine: Literal["Sync", "Async"] | None = None
    partuuid: str | None = None


class NetworkInterface(Definition):
    """``PUT /network-interfaces/{iface_id}``: a virtio-net device on a host TAP."""

    iface_id: str = Field(pattern=r"^\w+$")
    host_dev_name: str
    guest_mac: str | None = None
    mtu: int | None = Field(default=None, ge=68, le=65535)


class Vsock(Definition):
    """``PUT /vsock``: the virtio-vsock device, bridged by Firecracker to unix sockets at ``uds_path``."""

    guest_cid: int = Field(ge=3)
    uds_path: str


class SerialDevice(Definition):
    """``PUT /serial``: where the guest's serial console goes (a file Firecracker creates)."""

    serial_out_path: str


class InstanceActionInfo(Definition):
    """``PUT /actions``."""

    action_type: Literal["InstanceStart", "SendCtrlAltDel", "FlushMetrics"]


class Vm(Definition):
    """``PATCH /vm``: pause or resume the vCPUs."""

    state: Literal["Paused", "Resumed"]


class SnapshotCreateParams(Definition):
    """``PUT /snapshot/create``. The VM must be paused."""

    snapshot_path: str
    mem_file_path: str
    snapshot_type: Literal["Full", "Diff"] | None = None


class MemoryBackend(Definition):
    backend_type: Literal["File", "Uffd"]
    backend_path: str


class NetworkOverride(Definition):
    """Attach a restored interface to another TAP (a clone restored beside its original)."""

    iface_id: str
    host_dev_name: str


class VsockOverride(Definition):
    """Bind a restored vsock device at another unix socket path."""

    uds_path: str


class SnapshotLoadParams(Definition):
    """``PUT /snapshot/load``. Only a fresh Firecracker process (nothing configured yet) takes it."""

    snapshot_path: str
    mem_backend: MemoryBackend
    """Not the deprecated ``mem_file_path``: v1.16.1 answers that with a deprecation header."""
    resume_vm: bool | None = None
    track_dirty_pages: bool | None = None
    network_overrides: list[NetworkOverride] | None = None
    vsock_override: VsockOverride | None = None


# ---------------------------------------------------------------------------------------------- answers


class InstanceInfo(BaseModel):
    """``GET /``. Read leniently: a newer Firecracker may add fields."""

    app_name: str
    id: str
    state: Literal["Not started", "Running", "Paused"]
    vmm_version: str


class FirecrackerVersion(BaseModel):
    """``GET /version``."""

    firecracker_version: str


class Error(BaseModel):
    """Every 4xx/5xx body: ``{"fault_message": "..."}``."""

    fault_message: str = ""
