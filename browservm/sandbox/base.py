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
         │                 └─ destroy(handle)   (idempotent; frees every resource create took)
         └─ on any failure inside create: everything already taken is released before raising

``handle.runtime`` is the backend's own JSON-serialisable record of what it created (pids, paths, TAP
names, VM ids). The controller stores it in the database; after a restart the backend's
:meth:`SandboxBackend.probe` and :meth:`SandboxBackend.destroy` must work from it alone. That is how the
reconciler adopts what still runs and cleans up what does not.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from browservm.sandbox.channel import Channel

Role = Literal["browser", "cli"]


class Liveness(enum.StrEnum):
    ALIVE = "alive"
    HIBERNATED = "hibernated"
    GONE = "gone"


@dataclass(frozen=True, slots=True)
class Resources:
    vcpus: int = 1
    memory_mib: int = 1024
    disk_mib: int = 2048


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """Where a sandbox sits on the host's sandbox network. Addresses come from the store's pool.

    ``egress_allow`` lists ``host:port`` a guest may reach (its proxy, TURN, DNS); everything else is
    dropped by the backend's policy. Backends that cannot enforce a policy must refuse a spec that asks
    for one rather than run unfiltered.
    """

    address: str | None = None
    mac: str | None = None
    egress_allow: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    sandbox_id: str
    role: Role
    resources: Resources = field(default_factory=Resources)
    network: NetworkSpec = field(default_factory=NetworkSpec)
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment for the guest agent (never secrets: those travel over the channel)."""


@dataclass(frozen=True, slots=True)
class SandboxHandle:
    sandbox_id: str
    backend: str
    role: Role
    runtime: Mapping[str, Any]
    """Backend-private, JSON-serialisable; enough to probe and destroy after a controller restart."""


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
    async def probe(self, handle: SandboxHandle) -> Liveness:
        """Is it still there? Works from ``handle.runtime`` alone, after a controller restart."""

    async def hibernate(self, handle: SandboxHandle) -> SandboxHandle:
        """Release compute, keep state (a VM snapshot; the process backend keeps the disk only)."""
        raise SandboxUnsupported(handle.sandbox_id, f"backend {self.name} cannot hibernate")

    async def resume(self, handle: SandboxHandle) -> SandboxHandle:
        """Run a hibernated sandbox again with the same identity and state."""
        raise SandboxUnsupported(handle.sandbox_id, f"backend {self.name} cannot resume")

    async def list_orphans(self, known: Sequence[str]) -> list[str]:
        """Sandbox ids this backend finds running on the host that are not in ``known``."""
        return []

    async def readiness(self) -> BackendReadiness:
        """Can this host run sandboxes now? Shown by ``/readyz`` and ``browservm doctor``."""
        return BackendReadiness(True, "ok")

    async def close(self) -> None:
        """Release backend-wide resources at controller shutdown (sandboxes keep running)."""
