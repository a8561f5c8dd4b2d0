"""The controller's side of sandboxes: records in the store, the backend's work, and open channels.

Cleanup lives next to creation: :meth:`SandboxService.start` releases everything it took when any step
fails, and :meth:`SandboxService.destroy` is safe to call for any record in any state.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from browservm.controller.metrics import Metrics
from browservm.controller.notifier import Notifier
from browservm.sandbox.base import (
    Liveness,
    Role,
    SandboxBackend,
    SandboxError,
    SandboxHandle,
    SandboxSpec,
)
from browservm.sandbox.channel import Channel
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
    ) -> None:
        self.backend = backend
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
    ) -> tuple[SandboxHandle, Channel]:
        """Create a sandbox and connect to its agent. It ends ``assigned`` to its owner, or, for the warm
        pool (``assign=False``), stays ``creating`` until :meth:`mark_ready`. ``sandbox_id`` is generated
        unless given (the pool names its sandboxes first, so it can tell them apart while they boot)."""
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
        log.info("sandbox.creating", sandbox_id=record.id, role=role, backend=self.backend.name)
        started = time.perf_counter()
        handle: SandboxHandle | None = None
        try:
            handle = await self.backend.create(SandboxSpec(sandbox_id=record.id, role=role))
            async with self.db.session() as db:
                await sandbox_store.set_runtime(db, record.id, dict(handle.runtime))
            channel = await self.backend.connect(handle, timeout_s=self.boot_timeout_s)
        except BaseException as exc:
            reason = _reason(exc)
            log.warning("sandbox.start_failed", sandbox_id=record.id, reason=reason)
            with contextlib.suppress(Exception):
                await self._record(record.id, SandboxState.FAILED, reason)
            if handle is not None:
                with contextlib.suppress(Exception):
                    await self.backend.destroy(handle)
            with contextlib.suppress(Exception):
                await self._record(record.id, SandboxState.DESTROYED, reason)
            raise
        self.metrics.sandbox_boot.labels(self.backend.name).observe(time.perf_counter() - started)
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

    async def destroy(self, sandbox_id: str, reason: str = "") -> None:
        """Stop and free a sandbox. Safe for any state and from several callers at once."""
        lock = self._destroy_locks.setdefault(sandbox_id, asyncio.Lock())
        try:
            async with lock:
                await self._destroy(sandbox_id, reason)
        finally:
            if not lock.locked():
                self._destroy_locks.pop(sandbox_id, None)

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
        with contextlib.suppress(IllegalTransition):
            await self._record(sandbox_id, SandboxState.DESTROYED, reason)
        log.info("sandbox.destroyed", sandbox_id=sandbox_id, reason=reason)

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
