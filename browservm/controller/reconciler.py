"""Makes the database and the host agree, at start-up and then periodically.

At start-up: every unfinished session is picked up again (its sandbox adopted if it still runs, the
session failed with a reason if not); sandboxes that belong to no live session are destroyed; sandboxes
the backend finds that the database does not know are destroyed too. Periodically: expired sessions
are ended, leaked sandboxes destroyed, gauges refreshed.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import structlog

from browservm.controller.capacity import Capacity, Lease
from browservm.controller.cli_vms import CliVmService
from browservm.controller.metrics import Metrics
from browservm.controller.pool import WarmPool
from browservm.controller.sandboxes import SandboxService
from browservm.controller.sessions import SessionService
from browservm.sandbox.base import Liveness
from browservm.store import sandboxes as sandbox_store
from browservm.store import sessions as session_store
from browservm.store.database import Database
from browservm.store.states import LIVE_SANDBOX, SandboxState, SessionStatus

log = structlog.get_logger(__name__)


class Reconciler:
    def __init__(
        self,
        db: Database,
        sessions: SessionService,
        sandboxes: SandboxService,
        cli_vms: CliVmService,
        capacity: Capacity,
        metrics: Metrics,
        pool: WarmPool | None = None,
        *,
        interval_s: float,
    ) -> None:
        self.db = db
        self.sessions = sessions
        self.sandboxes = sandboxes
        self.cli_vms = cli_vms
        self.capacity = capacity
        self.metrics = metrics
        self.pool = pool
        self.interval_s = interval_s

    async def startup(self) -> None:
        async with self.db.session() as db:
            unfinished = {s.id: s for s in await session_store.unfinished(db)}
            live = await sandbox_store.live(db)
        leases: dict[str, Lease] = {}
        """By session id: the slot of the session's sandbox, which still runs."""
        for record in live:
            owner = unfinished.get(record.session_id or "")
            if record.role == "browser" and owner is None:
                await self._destroy(record.id, "its session had ended when the controller started", "orphan")
                continue
            liveness = await self.sandboxes.probe(record)
            if liveness is Liveness.GONE:
                # Its agent is gone, but not necessarily all it held (processes that left its tree, its
                # directory): destroyed, not just written off.
                await self._destroy(record.id, "gone when the controller started", "sandbox_gone")
                continue
            if record.state in LIVE_SANDBOX:
                # It runs, so it holds a slot, even past the limit (a restart with a lower one).
                lease = self.capacity.adopt()
                if record.role == "cli":
                    self.cli_vms.hold(record.id, lease)
                elif owner is not None:
                    leases[owner.id] = lease
        known = [record.id for record in live]
        for orphan in await self.sandboxes.list_orphans(known):
            log.warning("reconcile.unknown_sandbox", sandbox_id=orphan)
            await self.sandboxes.destroy_orphan(orphan)
            self.metrics.reconciles.labels("unknown_destroyed").inc()
        await self._reconcile_network()
        for session in unfinished.values():
            self.sessions.launch(session.id, lease=leases.pop(session.id, None))
            self.metrics.reconciles.labels("session_resumed").inc()
        await self._keep_cli_vms()
        await self.refresh_gauges()
        log.info("reconcile.startup", sessions=len(unfinished), sandboxes=len(live))

    async def _keep_cli_vms(self) -> None:
        """Hold a channel to every running CLI VM: a guest no controller speaks to ends itself after its
        idle timeout (two minutes), and a CLI VM must outlive a controller restart."""
        async with self.db.session() as db:
            running = [
                r
                for r in await sandbox_store.live(db)
                if r.role == "cli" and r.state == SandboxState.ASSIGNED
            ]
        for record in running:
            if self.sandboxes.connected(record.id):
                continue
            try:
                await self.sandboxes.connect(self.sandboxes.handle_of(record))
            except Exception as exc:  # the next pass tries again; a dead one is found by the probe
                log.warning("reconcile.cli_vm_unreachable", sandbox_id=record.id, error=str(exc))
            else:
                self.metrics.reconciles.labels("cli_vm_connected").inc()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except Exception as exc:  # the loop must survive a bad pass; the next one retries
                log.exception("reconcile.tick_failed", error=str(exc))

    async def tick(self) -> None:
        now = datetime.now(UTC)
        async with self.db.session() as db:
            unfinished = {s.id: s for s in await session_store.unfinished(db)}
            live = await sandbox_store.live(db)
        if stopped := self.sessions.stop_driving_except(unfinished.keys()):
            self.metrics.reconciles.labels("flow_stopped").inc(stopped)
        for session in unfinished.values():
            if self.sessions.driving(session.id):
                continue
            if session.expires_at <= now:
                await self.sessions.expire(session.id, "expired while not running")
                self.metrics.reconciles.labels("session_expired").inc()
            else:
                self.sessions.launch(session.id)
                self.metrics.reconciles.labels("session_resumed").inc()
        for record in live:
            if record.role != "browser" or record.session_id in unfinished:
                continue
            if self.pool is not None and self.pool.owns(record.id):
                continue  # warm: it has no session yet
            if self.sessions.driving(record.session_id):
                continue  # its flow is ending it right now
            current = await self.sandboxes.get(record.id)
            if current is None or (current.session_id, current.state) != (record.session_id, record.state):
                continue  # it changed since this pass read it (a session took a warm one): next pass
            await self._destroy(record.id, "its session has ended", "leak_destroyed")
        await self._reconcile_network()
        await self._keep_cli_vms()
        await self.refresh_gauges()

    async def _reconcile_network(self) -> None:
        """Namespaces and addresses of sandboxes that no longer hold resources go (a crash's leftovers)."""
        stale = await self.sandboxes.reconcile_network()
        if stale:
            self.metrics.reconciles.labels("network_removed").inc(stale)

    async def refresh_gauges(self) -> None:
        async with self.db.session() as db:
            session_counts = await session_store.count_by_status(db)
            sandbox_counts = await sandbox_store.count_by_state(db)
        self.metrics.set_counts(self.metrics.sessions, session_counts, [s.value for s in SessionStatus])
        self.metrics.set_counts(self.metrics.sandboxes, sandbox_counts, [s.value for s in SandboxState])

    async def _destroy(self, sandbox_id: str, reason: str, action: str) -> None:
        log.info("reconcile.destroy", sandbox_id=sandbox_id, reason=reason)
        await self.sandboxes.destroy(sandbox_id, reason)
        self.metrics.reconciles.labels(action).inc()
