"""The controller's side of sandboxes: records in the store, the backend's work, and open channels.

Cleanup lives next to creation: :meth:`SandboxService.start` releases everything it took when any step
fails, and :meth:`SandboxService.destroy` is safe to call for any record in any state.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Callable, Mapping, Sequence

import structlog
from sqlalchemy.exc import IntegrityError

from browservm.cleanup import Cleanup
from browservm.controller.metrics import Metrics
from browservm.controller.notifier import Notifier
from browservm.sandbox.base import (
    GuestImage,
    Liveness,
    NetworkSpec,
    Resources,
    Role,
    SandboxBackend,
    SandboxError,
    SandboxHandle,
    SandboxSnapshot,
    SandboxSpec,
)
from browservm.sandbox.channel import Channel
from browservm.sandbox.network import GuestEgress, MediaMap, SandboxNetwork
from browservm.store import network as network_store
from browservm.store import sandboxes as sandbox_store
from browservm.store.database import Database
from browservm.store.models import Sandbox
from browservm.store.states import IllegalTransition, SandboxState

log = structlog.get_logger(__name__)


class SandboxService:
    def __init__(
        self,
        backend: SandboxBackend,
        db: Database,
        metrics: Metrics,
        notifier: Notifier,
        *,
        boot_timeout_s: float,
        resources: Mapping[Role, Resources] | None = None,
        network: SandboxNetwork | None = None,
        image: Callable[[], GuestImage | None] | None = None,
    ) -> None:
        self.backend = backend
        self.image = image
        """The image new sandboxes run, asked at each start (a new build is used from the next one);
        ``None`` or what returns ``None``: the backend's own."""
        self.resources = dict(resources or {})
        """What each role's sandboxes may use (from the settings); the backend's defaults otherwise."""
        self.network = network
        """The host's sandbox network; ``None``: sandboxes get none (only their own loopback)."""
        self.db = db
        self.metrics = metrics
        self.notifier = notifier
        self.boot_timeout_s = boot_timeout_s
        self.channels: dict[str, Channel] = {}
        self._destroy_locks: dict[str, asyncio.Lock] = {}

    async def start(
        self,
        *,
        role: Role,
        tenant: str | None,
        user_id: str | None,
        session_id: str | None = None,
        assign: bool = True,
        sandbox_id: str | None = None,
        snapshot: SandboxSnapshot | None = None,
    ) -> tuple[SandboxHandle, Channel]:
        """Create a sandbox and connect to its agent. It ends ``assigned`` to its owner, or, for the warm
        pool (``assign=False``), stays ``creating`` until :meth:`mark_ready`. ``sandbox_id`` is generated
        unless given (the pool names its sandboxes first, so it can tell them apart while they boot).
        With ``snapshot`` the guest is restored from it instead of booted."""
        async with self.db.session() as db:
            record = await sandbox_store.create(
                db,
                backend=self.backend.name,
                role=role,
                tenant=tenant,
                user_id=user_id,
                session_id=session_id,
                sandbox_id=sandbox_id,
            )
        self._notify(record)
        image = await asyncio.to_thread(self.image) if self.image is not None else None
        log.info(
            "sandbox.creating",
            sandbox_id=record.id,
            role=role,
            backend=self.backend.name,
            image=image.name if image is not None else None,
        )
        started = time.perf_counter()
        try:
            async with Cleanup("sandbox.undo_failed", sandbox_id=record.id) as undo:
                network = NetworkSpec()
                if self.network is not None:
                    network = await self._attach(record.id)
                    undo.push(self._detach, record.id)
                    # A CLI VM's grant is its user's (CliVmService.grant); a browser's, its session's.
                    if role == "browser" and network.address is not None:
                        await self.network.map_media(record.id, ipaddress.IPv4Address(network.address))
                spec = SandboxSpec(
                    sandbox_id=record.id,
                    role=role,
                    resources=self.resources.get(role, Resources()),
                    network=network,
                    image=image,
                )
                if snapshot is not None:
                    handle = await self.backend.restore(snapshot, spec)
                else:
                    handle = await self.backend.create(spec)
                undo.push(self.backend.destroy, handle)
                async with self.db.session() as db:
                    await sandbox_store.set_runtime(db, record.id, dict(handle.runtime))
                channel = await self.backend.connect(handle, timeout_s=self.boot_timeout_s)
                undo.keep()
        except BaseException as exc:
            reason = _reason(exc)
            log.warning("sandbox.start_failed", sandbox_id=record.id, reason=reason)
            with contextlib.suppress(Exception):
                await self._record(record.id, SandboxState.FAILED, reason)
            with contextlib.suppress(Exception):
                await self._record(record.id, SandboxState.DESTROYED, reason)
            raise
        self.metrics.sandbox_boot.labels(self.backend.name, "restore" if snapshot else "boot").observe(
            time.perf_counter() - started
        )
        self.channels[record.id] = channel
        if assign:
            await self._record(record.id, SandboxState.ASSIGNED)
        log.info("sandbox.ready", sandbox_id=record.id, boot_s=round(time.perf_counter() - started, 3))
        return handle, channel

    async def mark_ready(self, sandbox_id: str) -> None:
        """A warm sandbox's services are up: it is ``ready`` for a session to :meth:`claim`."""
        await self._record(sandbox_id, SandboxState.READY)

    async def claim(self, sandbox_id: str, *, tenant: str, user_id: str, session_id: str) -> None:
        """A ``ready`` (warm) sandbox becomes ``assigned`` to a session. Raises IllegalTransition if it is
        no longer ready (it failed, or is being destroyed)."""
        async with self.db.session() as db:
            record = await sandbox_store.transition(
                db,
                sandbox_id,
                SandboxState.ASSIGNED,
                reason="taken from the warm pool",
                tenant=tenant,
                user_id=user_id,
                session_id=session_id,
            )
        self._notify(record)

    def handle_of(self, record: Sandbox) -> SandboxHandle:
        role: Role = "cli" if record.role == "cli" else "browser"
        return SandboxHandle(
            sandbox_id=record.id, backend=record.backend, role=role, runtime=dict(record.runtime)
        )

    async def get(self, sandbox_id: str) -> Sandbox | None:
        async with self.db.session() as db:
            return await sandbox_store.get(db, sandbox_id)

    def connected(self, sandbox_id: str) -> bool:
        """Whether this controller holds an open channel to the sandbox."""
        channel = self.channels.get(sandbox_id)
        return channel is not None and not channel.closed.is_set()

    async def connect(self, handle: SandboxHandle) -> Channel:
        """Open (or reuse) the channel to a running sandbox, e.g. one adopted after a restart."""
        channel = self.channels.get(handle.sandbox_id)
        if channel is not None and not channel.closed.is_set():
            return channel
        channel = await self.backend.connect(handle, timeout_s=self.boot_timeout_s)
        self.channels[handle.sandbox_id] = channel
        return channel

    async def probe(self, record: Sandbox) -> Liveness:
        try:
            return await self.backend.probe(self.handle_of(record))
        except Exception as exc:  # a broken record must not stop the reconciler
            log.warning("sandbox.probe_failed", sandbox_id=record.id, error=str(exc))
            return Liveness.GONE

    async def hibernate(self, record: Sandbox) -> SandboxHandle:
        await self._close_channel(record.id)
        handle = await self.backend.hibernate(self.handle_of(record))
        async with self.db.session() as db:
            await sandbox_store.set_runtime(db, record.id, dict(handle.runtime))
        await self._record(record.id, SandboxState.HIBERNATED)
        return handle

    async def resume(self, record: Sandbox) -> tuple[SandboxHandle, Channel]:
        handle = await self.backend.resume(self.handle_of(record))
        async with self.db.session() as db:
            await sandbox_store.set_runtime(db, record.id, dict(handle.runtime))
        channel = await self.connect(handle)
        await self._record(record.id, SandboxState.ASSIGNED)
        return handle, channel

    async def snapshot(self, sandbox_id: str) -> SandboxSnapshot:
        """Save a running sandbox for :meth:`start` to restore copies of, and end it: the backend keeps
        the saved guest; the sandbox's network and record go as with :meth:`destroy`."""
        record = await self.get(sandbox_id)
        if record is None:
            raise LookupError(f"no sandbox {sandbox_id}")
        await self._record(sandbox_id, SandboxState.DESTROYING, "saved as a snapshot")
        await self._close_channel(sandbox_id)
        try:
            snapshot = await self.backend.snapshot(self.handle_of(record))
        finally:
            await self._detach(sandbox_id)
            with contextlib.suppress(IllegalTransition):
                await self._record(sandbox_id, SandboxState.DESTROYED, "saved as a snapshot")
        return snapshot

    async def delete_snapshot(self, snapshot: SandboxSnapshot) -> None:
        await self.backend.delete_snapshot(snapshot)

    async def prune_snapshots(self) -> list[str]:
        """Snapshots a previous controller left (they belong to its warm pool, which is gone)."""
        return await self.backend.prune_snapshots()

    async def destroy(self, sandbox_id: str, reason: str = "") -> None:
        """Stop and free a sandbox. Safe for any state and from several callers at once."""
        lock = self._destroy_locks.setdefault(sandbox_id, asyncio.Lock())
        try:
            async with lock:
                await self._destroy(sandbox_id, reason)
        finally:
            if not lock.locked():
                self._destroy_locks.pop(sandbox_id, None)

    async def list_orphans(self, known: Sequence[str]) -> list[str]:
        """Sandboxes the backend finds on the host that are not in ``known`` (the store's live ones)."""
        return await self.backend.list_orphans(known)

    async def destroy_orphan(self, sandbox_id: str) -> None:
        """Destroy a sandbox the store has no record of, from its id alone (its network, if it had one,
        goes with :meth:`reconcile_network`). A failure is logged, never raised: the next start tries
        again."""
        try:
            await self.backend.destroy_orphan(sandbox_id)
        except Exception as exc:
            log.error("sandbox.orphan_destroy_failed", sandbox_id=sandbox_id, error=str(exc))

    async def _destroy(self, sandbox_id: str, reason: str) -> None:
        record = await self.get(sandbox_id)
        if record is None or record.state == SandboxState.DESTROYED:
            return
        with contextlib.suppress(IllegalTransition):
            await self._record(sandbox_id, SandboxState.DESTROYING, reason)
        await self._close_channel(sandbox_id)
        try:
            await self.backend.destroy(self.handle_of(record))
        except SandboxError as exc:
            log.error("sandbox.destroy_failed", sandbox_id=sandbox_id, error=str(exc))
            with contextlib.suppress(IllegalTransition):
                await self._record(sandbox_id, SandboxState.FAILED, f"destroy failed: {exc}")
            return
        await self._detach(sandbox_id)
        with contextlib.suppress(IllegalTransition):
            await self._record(sandbox_id, SandboxState.DESTROYED, reason)
        log.info("sandbox.destroyed", sandbox_id=sandbox_id, reason=reason)

    # ------------------------------------------------------------------ network

    async def _attach(self, sandbox_id: str) -> NetworkSpec:
        """A guest address from the store's pool, and the sandbox's namespace and link on the network."""
        assert self.network is not None
        config = self.network.config
        for attempt in range(5):
            try:
                async with self.db.session() as db:
                    address = await network_store.lease(
                        db, scope=config.scope, sandbox_id=sandbox_id, subnet=config.subnet
                    )
                break
            except IntegrityError:
                if attempt == 4:
                    raise
        return (await self.network.attach(sandbox_id, address)).spec()

    async def set_egress(self, sandbox_id: str, egress: GuestEgress) -> None:
        """What the sandbox's guest may reach beyond TURN (only where the network is per guest)."""
        if self.network is not None and self.network.config.per_guest:
            await self.network.set_egress(sandbox_id, egress)

    async def media_of(self, sandbox_id: str) -> MediaMap | None:
        """The sandbox's public UDP mapping (from its leased address), ``None`` without one."""
        if self.network is None or self.network.config.media is None:
            return None
        async with self.db.session() as db:
            address = await network_store.address_of(db, sandbox_id)
        return self.network.media_map_for(address) if address is not None else None

    async def restore_media(self) -> None:
        """Map live browser sandboxes' media ports again (a controller's start rebuilt the table)."""
        if self.network is None or self.network.config.media is None:
            return
        async with self.db.session() as db:
            live = {r.id for r in await sandbox_store.live(db) if r.role == "browser"}
            leases = await network_store.leases(db, self.network.config.scope)
        for lease in leases:
            if lease.sandbox_id in live:
                with contextlib.suppress(Exception):
                    await self.network.map_media(lease.sandbox_id, ipaddress.IPv4Address(lease.address))

    async def _detach(self, sandbox_id: str) -> None:
        """Remove the sandbox's namespace and link and free its address. Idempotent."""
        if self.network is None:
            return
        await self.network.detach(sandbox_id)
        async with self.db.session() as db:
            await network_store.release(db, sandbox_id)

    async def reconcile_network(self) -> int:
        """Remove the namespaces and leases of sandboxes that hold no resources (a crash's leftovers)."""
        if self.network is None:
            return 0
        # Namespaces and leases first, the sandboxes holding resources last: a sandbox's record exists
        # before its lease and its namespace, so one being created meanwhile is among those read last.
        attached = await self.network.attached()
        async with self.db.session() as db:
            leased = {lease.sandbox_id for lease in await network_store.leases(db, self.network.config.scope)}
        async with self.db.session() as db:
            live = {record.id for record in await sandbox_store.live(db)}
        stale = (attached | leased) - live
        for sandbox_id in stale:
            log.warning("network.stale", sandbox_id=sandbox_id)
            await self._detach(sandbox_id)
        return len(stale)

    async def close(self) -> None:
        """Controller shutdown: close channels, leave sandboxes running for the next start to adopt."""
        for sandbox_id in list(self.channels):
            await self._close_channel(sandbox_id)

    async def _close_channel(self, sandbox_id: str) -> None:
        channel = self.channels.pop(sandbox_id, None)
        if channel is not None:
            await channel.close()

    async def _record(self, sandbox_id: str, state: SandboxState, reason: str = "") -> None:
        async with self.db.session() as db:
            record = await sandbox_store.transition(db, sandbox_id, state, reason=reason)
        self._notify(record)

    def _notify(self, record: Sandbox) -> None:
        if record.session_id:
            self.notifier.notify(record.session_id)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SandboxError) and exc.detail:
        return f"{exc}\n{exc.detail[-2000:]}"
    return str(exc) or type(exc).__name__
