"""Browser sandboxes booted ahead of demand, so a new session's browser is on screen in well under a second.

A warm sandbox is a browser sandbox whose agent got ``Prepare``: Xvfb, Chromium on a blank page, the
streamer and x11vnc run, and its record is ``ready``, owned by no one. A session takes one instead of
booting its own: the record becomes ``assigned`` to it and the agent gets the session's ``Configure``,
which only hands over the session (its ICE servers) and starts the login. Each warm sandbox serves one
session and is destroyed with it, like any other: a fresh profile every time.

Warm sandboxes hold capacity slots (they run), never at a waiting session's expense: the pool fills only
a slot that is free with nobody queued, gives a just-booted sandbox up if a session started waiting
meanwhile, and destroys an idle one when a CLI VM needs its slot (``Capacity.reclaim``). At shutdown the
idle ones are destroyed; what a killed controller left behind belongs to no session, and the
reconciler destroys it at the next start.

On a backend that takes snapshots (``qemu``; ``BROWSERVM_WARM_POOL_SNAPSHOTS``, on by default) the pool
boots and prepares one sandbox, saves it, and restores every warm sandbox after it from that snapshot
instead of booting each: the guest wakes up with Chromium already on its blank page, and takes its own
id, address, clock and reseeded random generator (``browservm.guest.identity``). A snapshot that cannot
be taken or restored is dropped, and the pool boots cold from then on. The snapshot lives as long as the
pool; a controller's start prunes those a previous one left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from pydantic import BaseModel

from browservm import protocol
from browservm.aio import cancel_and_wait
from browservm.controller.capacity import Capacity, Lease
from browservm.controller.metrics import Metrics
from browservm.controller.sandboxes import SandboxService
from browservm.sandbox.base import SandboxError, SandboxSnapshot
from browservm.sandbox.channel import AgentError, Channel, ChannelClosed
from browservm.store.models import new_id
from browservm.store.states import IllegalTransition

log = structlog.get_logger(__name__)

SERVICES = ("xvfb", "chromium", "vnc", "streamer")
"""Ready in a warm sandbox before a session may take it."""
RETRY_AFTER_FAILURE_S = 30.0
"""A warm sandbox that failed to boot is retried after this, not in a tight loop (Chromium missing)."""


@dataclass
class WarmSandbox:
    sandbox_id: str
    channel: Channel
    lease: Lease
    """Its slot: offered while idle, then passed to the session that takes it."""


class WarmPool:
    def __init__(
        self,
        size: int,
        sandboxes: SandboxService,
        capacity: Capacity,
        metrics: Metrics,
        prepare: Callable[[], protocol.Prepare],
        *,
        boot_timeout_s: float,
        snapshots: bool = True,
    ) -> None:
        self.size = size
        self.sandboxes = sandboxes
        self.capacity = capacity
        self.metrics = metrics
        self.prepare = prepare
        """Builds the ``Prepare`` request (given its id) from the settings sessions are configured with."""
        self.boot_timeout_s = boot_timeout_s
        self.snapshots = snapshots and sandboxes.backend.supports_snapshots
        """Whether warm sandboxes are restored from a snapshot (while one can be taken) or booted."""
        self.snapshot: SandboxSnapshot | None = None
        self._snapshot_lock = asyncio.Lock()
        self._idle: deque[WarmSandbox] = deque()
        self._booting: set[str] = set()
        self._taking: set[str] = set()
        self._boots: set[asyncio.Task[None]] = set()
        self._discards: set[asyncio.Task[None]] = set()
        self._filler: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        capacity.reclaim = self._reclaim

    # ------------------------------------------------------------------ the controller's side

    def start(self) -> None:
        if self.size > 0:
            self._filler = asyncio.create_task(self._fill(), name="warm-pool")

    async def take(self, *, tenant: str, user_id: str, session_id: str) -> WarmSandbox | None:
        """An idle warm sandbox, now ``assigned`` to the session, its lease passing to the caller;
        ``None`` when there is none."""
        while self._idle:
            warm = self._idle.popleft()
            warm.lease.claim()
            self._report()
            self.capacity.freed.set()  # wake the filler: one more is wanted
            self._taking.add(warm.sandbox_id)
            try:
                if not warm.channel.closed.is_set():
                    await self.sandboxes.claim(
                        warm.sandbox_id, tenant=tenant, user_id=user_id, session_id=session_id
                    )
                    self.metrics.warm_pool_takes.labels("hit").inc()
                    return warm
                why = "its agent went away while it was idle"
            except (IllegalTransition, LookupError) as exc:
                why = f"it could not be claimed: {exc}"
            except BaseException:
                self._discard_later(warm, "the session stopped while taking it")
                raise
            finally:
                self._taking.discard(warm.sandbox_id)
            log.warning("warm_pool.unusable", sandbox_id=warm.sandbox_id, reason=why)
            self._discard_later(warm, why)
        self.metrics.warm_pool_takes.labels("miss").inc()
        return None

    def owns(self, sandbox_id: str) -> bool:
        """Whether the pool is booting, holding or handing over this sandbox (the reconciler leaves
        those alone)."""
        return (
            sandbox_id in self._booting
            or sandbox_id in self._taking
            or any(w.sandbox_id == sandbox_id for w in self._idle)
        )

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def close(self) -> None:
        """Stop filling and destroy the idle sandboxes (a new controller would not know them)."""
        await cancel_and_wait([self._filler, *self._boots])
        while self._idle:
            self._discard_later(self._idle.popleft(), "the controller is stopping")
        await asyncio.gather(*self._discards, return_exceptions=True)
        if self.snapshot is not None:
            with contextlib.suppress(Exception):
                await self.sandboxes.delete_snapshot(self.snapshot)
            self.snapshot = None
        self._report()

    # ------------------------------------------------------------------ filling

    async def _fill(self) -> None:
        loop = asyncio.get_running_loop()
        if self.snapshots:
            try:
                await self.sandboxes.prune_snapshots()
            except Exception as exc:
                log.warning("warm_pool.prune_failed", error=str(exc))
        while True:
            self.capacity.freed.clear()
            while (
                len(self._idle) + len(self._boots) < self.size
                and loop.time() >= self._retry_at
                and (lease := self.capacity.try_take()) is not None
            ):
                boot = asyncio.create_task(self._boot(new_id("sbx"), lease), name="warm-pool-boot")
                self._boots.add(boot)
                boot.add_done_callback(self._boots.discard)
            timeout = max(0.0, self._retry_at - loop.time()) or None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.capacity.freed.wait(), timeout)

    async def _boot(self, sandbox_id: str, lease: Lease) -> None:
        """Boot one warm sandbox on the lease taken for it; give the lease back if it does not become one."""
        self._booting.add(sandbox_id)
        try:
            snapshot = await self._snapshot()
            async with asyncio.timeout(self.boot_timeout_s):
                if snapshot is not None:
                    channel = await self._restore(sandbox_id, snapshot)
                else:
                    _handle, channel = await self.sandboxes.start(
                        role="browser", tenant=None, user_id=None, assign=False, sandbox_id=sandbox_id
                    )
                    await self._prepare(channel)
                await self.sandboxes.mark_ready(sandbox_id)
        except asyncio.CancelledError:
            await asyncio.shield(self._discard(sandbox_id, lease, "the controller is stopping"))
            raise
        except (
            SandboxError,
            ChannelClosed,
            AgentError,
            protocol.ProtocolError,
            OSError,
            TimeoutError,
            IllegalTransition,
        ) as exc:
            log.warning("warm_pool.boot_failed", sandbox_id=sandbox_id, error=str(exc) or type(exc).__name__)
            self._retry_at = asyncio.get_running_loop().time() + RETRY_AFTER_FAILURE_S
            await self._discard(sandbox_id, lease, f"warm boot failed: {exc}")
            return
        finally:
            self._booting.discard(sandbox_id)
        if self.capacity.queued:
            # A session began to wait while this booted: the slot is worth more to it than a warm browser.
            await self._discard(sandbox_id, lease, "a waiting session needs the slot")
            return
        lease.offer()
        self._idle.append(WarmSandbox(sandbox_id, channel, lease))
        self._report()
        log.info("warm_pool.ready", sandbox_id=sandbox_id, idle=len(self._idle))

    async def _prepare(self, channel: Channel) -> None:
        """Start the services and wait until every one reports ready (real readiness, not a delay)."""
        async with channel.subscribe() as events:
            await channel.request(self.prepare(), timeout_s=self.boot_timeout_s)
            await self._until_ready(channel, events, set())

    async def _restore(self, sandbox_id: str, snapshot: SandboxSnapshot) -> Channel:
        """A warm sandbox from the snapshot: its services ran when it was saved, and still do."""
        try:
            _handle, channel = await self.sandboxes.start(
                role="browser",
                tenant=None,
                user_id=None,
                assign=False,
                sandbox_id=sandbox_id,
                snapshot=snapshot,
            )
            async with channel.subscribe() as events:
                status = await channel.request(protocol.Status(), timeout_s=self.boot_timeout_s)
                ready = {name for name, report in status.services.items() if report.state == "ready"}
                await self._until_ready(channel, events, ready)
        except (SandboxError, ChannelClosed, AgentError, protocol.ProtocolError, OSError) as exc:
            # This snapshot is no good (its image was pruned, the host changed): boot cold from now on.
            if self.snapshot is snapshot:
                self.snapshot, self.snapshots = None, False
                with contextlib.suppress(Exception):
                    await self.sandboxes.delete_snapshot(snapshot)
            log.warning("warm_pool.restore_failed", sandbox_id=sandbox_id, error=str(exc))
            raise
        return channel

    async def _snapshot(self) -> SandboxSnapshot | None:
        """The snapshot warm sandboxes are restored from, taken the first time one is wanted: a sandbox
        booted and prepared as any warm one, then saved (which ends it). ``None``: boot instead."""
        if not self.snapshots:
            return None
        async with self._snapshot_lock:
            if self.snapshot is None and self.snapshots:
                template = new_id("sbx")
                self._booting.add(template)
                try:
                    async with asyncio.timeout(self.boot_timeout_s):
                        _handle, channel = await self.sandboxes.start(
                            role="browser", tenant=None, user_id=None, assign=False, sandbox_id=template
                        )
                        await self._prepare(channel)
                    self.snapshot = await self.sandboxes.snapshot(template)
                    log.info("warm_pool.snapshot_taken", snapshot_id=self.snapshot.snapshot_id)
                except asyncio.CancelledError:
                    await asyncio.shield(self.sandboxes.destroy(template, "the controller is stopping"))
                    raise
                except Exception as exc:
                    log.warning("warm_pool.snapshot_failed", error=str(exc) or type(exc).__name__)
                    self.snapshots = False
                    with contextlib.suppress(Exception):
                        await self.sandboxes.destroy(template, f"no snapshot: {exc}")
                finally:
                    self._booting.discard(template)
            return self.snapshot

    async def _until_ready(
        self, channel: Channel, events: asyncio.Queue[BaseModel | None], ready: set[str]
    ) -> None:
        """Until every one of :data:`SERVICES` reports ready; a failed one ends the wait."""
        while ready != set(SERVICES):
            event = await events.get()
            if event is None:
                raise ChannelClosed(channel.sandbox_id, "the agent went away while its services started")
            if isinstance(event, protocol.ServiceState) and event.service in SERVICES:
                if event.state == "ready":
                    ready.add(event.service)
                elif event.state == "failed":
                    raise AgentError("service_failed", f"{event.service} failed: {event.detail[-500:]}")

    # ------------------------------------------------------------------ giving sandboxes up

    async def _reclaim(self) -> Lease | None:
        """Destroy one idle sandbox for a caller that needs its slot; its lease passes to the caller."""
        if not self._idle:
            return None
        warm = self._idle.popleft()
        warm.lease.claim()
        self._report()
        self._taking.add(warm.sandbox_id)
        try:
            await self.sandboxes.destroy(warm.sandbox_id, "its slot was needed by a CLI VM")
        except BaseException:
            warm.lease.release()
            raise
        finally:
            self._taking.discard(warm.sandbox_id)
        self.metrics.warm_pool_takes.labels("reclaimed").inc()
        return warm.lease

    def _discard_later(self, warm: WarmSandbox, reason: str) -> None:
        task = asyncio.create_task(self._discard(warm.sandbox_id, warm.lease, reason))
        self._discards.add(task)
        task.add_done_callback(self._discards.discard)

    async def _discard(self, sandbox_id: str, lease: Lease, reason: str) -> None:
        """Destroy a pool sandbox and release its lease (which wakes the filler, or goes to a waiter)."""
        self._taking.add(sandbox_id)
        try:
            await self.sandboxes.destroy(sandbox_id, reason)
        except Exception as exc:
            log.error("warm_pool.destroy_failed", sandbox_id=sandbox_id, error=str(exc))
        finally:
            self._taking.discard(sandbox_id)
            lease.release()

    def _report(self) -> None:
        self.metrics.warm_pool_idle.set(len(self._idle))
