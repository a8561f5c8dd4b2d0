"""The one interface every sandbox backend implements.

A backend turns a :class:`SandboxSpec` into a running guest whose agent speaks :mod:`browservm.protocol`
over a channel, and later tears it down. The controller sees only this interface: it never assumes a
local process, a local TAP or a local file, so that a remote backend (Kubernetes pods under Kata) fits
without changing the controller.

Lifecycle, for every backend::

    create(spec) ──▶ SandboxHandle ──connect()──▶ Channel (agent said Hello)
         │                 │
         │                 ├─ hibernate(handle) ──▶ handle (state kept, compute released)
         │                 ├─ resume(handle)    ──▶ handle (running again, same identity)
         │                 ├─ snapshot(handle)  ──▶ SandboxSnapshot (the guest saved; the sandbox ends)
         │                 └─ destroy(handle)   (idempotent; frees every resource create took)
         └─ on any failure inside create: everything already taken is released before raising

    restore(snapshot, spec) ──▶ SandboxHandle: a new sandbox (spec's id, network, resources) that wakes
                                up as the saved guest was, then takes the spec's identity

Snapshots are how a warm pool refills without booting (``supports_snapshots``): a browser sandbox is
booted and prepared once, saved, and every warm sandbox after it is a restored copy with its own id,
address, clock and reseeded random generator (the guest's root helper sets those; see
``browservm.guest.identity``).

``handle.runtime`` is the backend's own record of what it created (pids, paths, TAP names, VM ids): a
typed model per backend (a :class:`RuntimeRecord`), kept in the handle in its JSON form, which the
controller stores in the database. Backends read it only as their model (:meth:`SandboxHandle.runtime_as`);
after a restart their :meth:`SandboxBackend.probe` and :meth:`SandboxBackend.destroy` must work from it
alone. That is how the reconciler adopts what still runs and cleans up what does not. A sandbox of which
no record survived (a crash before it was stored, or a record lost) is destroyed from its id alone, by
what the backend finds of it on the host (:meth:`SandboxBackend.destroy_orphan`); so is one whose record
is empty.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from browservm.sandbox.channel import Channel

Role = Literal["browser", "cli"]


class Liveness(enum.StrEnum):
    ALIVE = "alive"
    HIBERNATED = "hibernated"
    GONE = "gone"


@dataclass(frozen=True, slots=True)
class Resources:
    """What one sandbox may use. Backends enforce what they can (a VM its vCPUs and memory; a process
    sandbox a cgroup's CPU quota, memory and task limits, and the size of its tmpfs)."""

    vcpus: int = 1
    memory_mib: int = 1024
    disk_mib: int = 2048
    tasks: int = 1024
    """Processes and threads (a fork bomb stops here)."""
    tmp_mib: int = 256
    """Size of the sandbox's in-memory ``/tmp`` and ``/dev/shm``."""


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """Where a sandbox sits on the host's sandbox network (:mod:`browservm.sandbox.network`), as the
    controller allocated it before ``create``: its network namespace (``ip netns`` name), where the
    backend starts the guest (a process backend) or creates its TAP and VMM (a VM backend), and the
    guest's address, gateway and MAC. ``netns`` ``None``: no network at all (the guest has only its own
    loopback).

    ``egress_allow`` lists ``host:port`` a guest may reach (its proxy, TURN, DNS); everything else is
    dropped by the backend's policy. Backends that cannot enforce a policy must refuse a spec that asks
    for one rather than run unfiltered.
    """

    netns: str | None = None
    address: str | None = None
    gateway: str | None = None
    prefix_len: int = 32
    mac: str | None = None
    dns: Sequence[str] = ()
    egress_allow: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class GuestImage:
    """The built guest image a sandbox runs (docs/image.md), as the controller chose it: its root tree,
    which the process backend runs as ``/``, and the kernel, read-only ext4 and initramfs VMs boot."""

    name: str
    """What the logs and records call it (the image's directory name, e.g. ``browser-8052aa5d1431be5e``)."""
    tree: Path | None = None
    kernel: Path | None = None
    rootfs: Path | None = None
    initrd: Path | None = None


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    sandbox_id: str
    role: Role
    resources: Resources = field(default_factory=Resources)
    network: NetworkSpec = field(default_factory=NetworkSpec)
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment for the guest agent (never secrets: those travel over the channel)."""
    image: GuestImage | None = None
    """The image to run; ``None``: the backend's own (the one it was made with)."""


class RuntimeRecord(BaseModel):
    """What a backend records of a sandbox or snapshot it made; each backend defines its own.

    Keys an earlier controller wrote and this one no longer reads are ignored, and fields added since
    have defaults: the database holds records written by every controller version that ran."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    def record(self) -> dict[str, Any]:
        """The JSON form, as the handle keeps it and the store saves it."""
        return self.model_dump(mode="json")


R = TypeVar("R", bound=RuntimeRecord)


def _read_runtime(owner: str, runtime: Mapping[str, Any], model: type[R]) -> R:
    if not runtime:
        raise SandboxError(owner, "the backend recorded nothing of it (destroy it by its id alone)")
    try:
        return model.model_validate(runtime)
    except ValidationError as exc:
        raise SandboxError(owner, f"its runtime record is not a {model.__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class SandboxHandle:
    sandbox_id: str
    backend: str
    role: Role
    runtime: Mapping[str, Any]
    """The backend's :class:`RuntimeRecord` in its JSON form; enough to probe and destroy after a
    controller restart. Empty for a sandbox whose create never returned."""

    @classmethod
    def of(cls, sandbox_id: str, backend: str, role: Role, runtime: RuntimeRecord) -> Self:
        return cls(sandbox_id, backend, role, runtime.record())

    @property
    def recorded(self) -> bool:
        """Whether the backend recorded anything of it (not so when the controller stored the sandbox
        and crashed before its create returned)."""
        return bool(self.runtime)

    def runtime_as(self, model: type[R]) -> R:
        """The record as the backend's model; :class:`SandboxError` if there is none or it is not one."""
        return _read_runtime(self.sandbox_id, self.runtime, model)


class SandboxError(Exception):
    """A backend could not do what was asked. Carries the sandbox and what to look at."""

    def __init__(self, sandbox_id: str, message: str, *, detail: str = "") -> None:
        super().__init__(f"sandbox {sandbox_id}: {message}")
        self.sandbox_id = sandbox_id
        self.detail = detail
        """A tail of the guest's console or log, for the session's failure reason."""


class SandboxBootTimeout(SandboxError):
    def __init__(self, sandbox_id: str, after_s: float, console_tail: str) -> None:
        super().__init__(sandbox_id, f"agent did not say hello within {after_s:.1f}s", detail=console_tail)
        self.after_s = after_s


class SandboxUnsupported(SandboxError):
    """The backend cannot do this at all (e.g. snapshots on a host without the feature)."""


@dataclass(frozen=True, slots=True)
class SandboxSnapshot:
    """A guest saved by :meth:`SandboxBackend.snapshot`, to start new sandboxes from. Lives on the host
    that took it until :meth:`SandboxBackend.delete_snapshot`; a new controller prunes what an old one
    left (:meth:`SandboxBackend.prune_snapshots`)."""

    snapshot_id: str
    backend: str
    role: Role
    runtime: Mapping[str, Any]
    """The backend's :class:`RuntimeRecord` in its JSON form: where the saved state is and the machine
    it needs."""

    @classmethod
    def of(cls, snapshot_id: str, backend: str, role: Role, runtime: RuntimeRecord) -> Self:
        return cls(snapshot_id, backend, role, runtime.record())

    def runtime_as(self, model: type[R]) -> R:
        return _read_runtime(self.snapshot_id, self.runtime, model)


@dataclass(frozen=True, slots=True)
class BackendReadiness:
    ready: bool
    detail: str


class SandboxBackend(abc.ABC):
    """A way to run sandboxes: ``process``, ``qemu``, ``firecracker`` (and later ``kubernetes``)."""

    name: str

    @abc.abstractmethod
    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        """Allocate and boot; return once the guest agent's channel endpoint exists.

        Raises :class:`SandboxError` (with the console tail) and releases everything on failure.
        """

    @abc.abstractmethod
    async def connect(self, handle: SandboxHandle, *, timeout_s: float) -> Channel:
        """Open the channel and wait for the agent's Hello. Raises :class:`SandboxBootTimeout`."""

    @abc.abstractmethod
    async def destroy(self, handle: SandboxHandle) -> None:
        """Stop the guest and free every resource. Idempotent; never raises for an already-gone sandbox."""

    @abc.abstractmethod
    async def destroy_orphan(self, sandbox_id: str) -> None:
        """Destroy a sandbox known by its id alone (one :meth:`list_orphans` found, or whose handle has
        no record): everything the backend finds of it on the host goes. Idempotent, like
        :meth:`destroy`."""

    @abc.abstractmethod
    async def probe(self, handle: SandboxHandle) -> Liveness:
        """Is it still there? Works from ``handle.runtime`` alone, after a controller restart."""

    async def hibernate(self, handle: SandboxHandle) -> SandboxHandle:
        """Release compute, keep state (a VM snapshot; the process backend keeps the disk only)."""
        raise SandboxUnsupported(handle.sandbox_id, f"backend {self.name} cannot hibernate")

    async def resume(self, handle: SandboxHandle) -> SandboxHandle:
        """Run a hibernated sandbox again with the same identity and state."""
        raise SandboxUnsupported(handle.sandbox_id, f"backend {self.name} cannot resume")

    supports_snapshots: bool = False
    """Whether :meth:`snapshot` and :meth:`restore` work on this backend (the warm pool asks)."""

    async def snapshot(self, handle: SandboxHandle) -> SandboxSnapshot:
        """Save the running guest for :meth:`restore` and end the sandbox (every resource it had is
        freed, as by :meth:`destroy`, but the saved state)."""
        raise SandboxUnsupported(handle.sandbox_id, f"backend {self.name} takes no snapshots")

    async def restore(self, snapshot: SandboxSnapshot, spec: SandboxSpec) -> SandboxHandle:
        """A new sandbox from ``snapshot``, with ``spec``'s id and network: once this returns, its guest
        runs with that identity, the host's time and a reseeded random generator, and :meth:`connect`
        reaches its agent. Releases everything on failure, like :meth:`create`."""
        raise SandboxUnsupported(spec.sandbox_id, f"backend {self.name} restores no snapshots")

    async def delete_snapshot(self, snapshot: SandboxSnapshot) -> None:
        """Remove the saved state. Idempotent; sandboxes restored from it are not affected."""

    async def prune_snapshots(self) -> list[str]:
        """Remove every snapshot this backend holds on the host (a controller starting, whose warm pool
        takes a fresh one); returns their ids."""
        return []

    async def list_orphans(self, known: Sequence[str]) -> list[str]:
        """Sandbox ids this backend finds on the host that are not in ``known`` (for
        :meth:`destroy_orphan`)."""
        return []

    async def readiness(self) -> BackendReadiness:
        """Can this host run sandboxes now? Shown by ``/readyz`` and ``browservm doctor``."""
        return BackendReadiness(True, "ok")

    async def close(self) -> None:
        """Release backend-wide resources at controller shutdown (sandboxes keep running)."""
