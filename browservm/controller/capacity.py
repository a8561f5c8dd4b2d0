"""Bounded admission: at most ``limit`` sandboxes run; past that sessions wait in order, or are refused.

The old system fell over under dozens of leaked VMs. Here a session holds a slot from the moment its
sandbox is created until it is destroyed, waiters are served first come first served, and a full
queue is refused at the API with 429 and a reason, before anything is created.

A slot is a :class:`Lease`, held by whoever runs the sandbox (a session's flow, the CLI VM service,
the warm pool) and released once, when the sandbox is gone; a released lease cannot be released again,
so no path frees a slot twice or one it never had. A session the API accepted but that holds no lease
yet is an :class:`Admission`, counted against the queue until it takes a lease or ends.

The warm pool's idle sandboxes hold leases too (they run), but ``offered`` ones: a session takes one
with its sandbox, so they count as available when the API admits sessions, and a CLI VM that finds no
free slot has the pool give one up (``reclaim``, the lease passing to the CLI VM) rather than being
refused.

Each waiter may name itself (a session id) and be told its place in line whenever it changes, so the
session's viewer can say "you are number 2".
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

from browservm.controller.errors import ApiError
from browservm.controller.metrics import Metrics


class Lease:
    """One sandbox slot, from the moment it is taken until :meth:`release` (once; later calls do
    nothing). As an async context manager it is released on the way out, however that goes."""

    __slots__ = ("_capacity", "_held", "_offered")

    def __init__(self, capacity: Capacity) -> None:
        self._capacity = capacity
        self._held = True
        self._offered = False

    @property
    def held(self) -> bool:
        return self._held

    @property
    def offered(self) -> bool:
        """Whether an idle warm sandbox holds it, so that any session may take it over."""
        return self._offered

    def offer(self) -> None:
        """The warm sandbox holding this lease became idle: it counts as available to new sessions."""
        if self._held and not self._offered:
            self._offered = True
            self._capacity.spare += 1

    def claim(self) -> None:
        """The idle warm sandbox was taken (by a session, a CLI VM, or its own end): no longer offered."""
        if self._offered:
            self._offered = False
            self._capacity.spare -= 1

    def release(self) -> None:
        """The sandbox is gone: the slot passes to the next in line, or becomes free."""
        if self._held:
            self.claim()
            self._held = False
            self._capacity._free_slot()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class Admission:
    """A session the API accepted that holds no lease yet (it waits, or is about to): it counts against
    the queue until it takes a lease or ends. :meth:`withdraw` once; later calls do nothing."""

    __slots__ = ("_capacity", "_open")

    def __init__(self, capacity: Capacity) -> None:
        self._capacity = capacity
        self._open = True

    def withdraw(self) -> None:
        if self._open:
            self._open = False
            self._capacity.admitted -= 1


@dataclass(eq=False)
class _Waiter:
    key: str | None
    slot: asyncio.Future[Lease]
    """Resolved with the lease that passes to this waiter."""
    moved: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    """Resolved when its place in line changed; replaced after each wake-up."""


class Capacity:
    """Hands out :class:`Lease` s; nothing else changes its counts."""

    def __init__(self, limit: int, max_queued: int, metrics: Metrics | None = None) -> None:
        self.limit = limit
        self.metrics = metrics
        self.max_queued = max_queued
        self.in_use = 0
        """Leases held."""
        self.admitted = 0
        """Admissions not withdrawn: sessions accepted by the API that hold no lease yet."""
        self.spare = 0
        """Leases offered by idle warm-pool sandboxes, which any session can take over."""
        self.reclaim: Callable[[], Awaitable[Lease | None]] | None = None
        """Set by the warm pool: give up one idle sandbox and hand over its lease."""
        self.freed = asyncio.Event()
        """Set whenever a slot becomes free (not handed to a waiter); the warm pool refills on it."""
        self._waiters: deque[_Waiter] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def queue(self) -> list[str]:
        """The named waiters, first in line first."""
        return [waiter.key for waiter in self._waiters if waiter.key is not None]

    def position(self, key: str) -> int | None:
        """1-based place of the waiter named ``key`` in line, or ``None`` when it is not waiting."""
        for index, waiter in enumerate(self._waiters):
            if waiter.key == key:
                return index + 1
        return None

    def admit(self) -> Admission:
        """Accept one more session, or refuse it with 429 when every slot and queue place is taken."""
        if self.in_use - self.spare + self.admitted >= self.limit + self.max_queued:
            self._count_refusal()
            raise ApiError(
                429,
                "capacity_exhausted",
                f"this host runs {self.limit} sandboxes and {self.max_queued} sessions are already "
                "waiting; retry later",
                headers={"Retry-After": "10"},
            )
        self.admitted += 1
        return Admission(self)

    async def take_now(self) -> Lease:
        """A free slot at once (or an idle warm sandbox's), else refuse with 429: persistent sandboxes
        do not queue."""
        if self.in_use >= self.limit and not self._waiters and self.reclaim is not None:
            reclaimed = await self.reclaim()
            if reclaimed is not None:
                return reclaimed  # the lease of a warm sandbox that was just destroyed
        if self.in_use >= self.limit or self._waiters:
            self._count_refusal()
            raise ApiError(
                429,
                "capacity_exhausted",
                f"all {self.limit} sandbox slots of this host are in use; retry later",
                headers={"Retry-After": "10"},
            )
        return self._lease()

    def adopt(self) -> Lease:
        """The lease of a sandbox that already runs (adopted after a restart), even past the limit."""
        return self._lease()

    def try_take(self) -> Lease | None:
        """A lease only if a slot is free and nobody waits (the warm pool never competes with sessions)."""
        if self.in_use >= self.limit or self._waiters:
            return None
        return self._lease()

    async def acquire(
        self,
        *,
        admission: Admission | None = None,
        key: str | None = None,
        on_position: Callable[[int], Awaitable[None]] | None = None,
    ) -> Lease:
        """Wait for a slot, in arrival order. Cancelling the wait gives the place up. The admission, if
        any, is withdrawn however the wait ends.

        ``on_position`` is awaited with the waiter's 1-based place when it starts waiting and each time
        the place changes (those ahead got a slot or gave up), never once the slot is ours.
        """
        try:
            if self.in_use < self.limit and not self._waiters:
                return self._lease()
            waiter = _Waiter(key=key, slot=asyncio.get_running_loop().create_future())
            self._waiters.append(waiter)
            self._report_queue()
            try:
                reported = None
                while not waiter.slot.done():
                    place = self._waiters.index(waiter) + 1
                    if on_position is not None and place != reported:
                        reported = place
                        await on_position(place)
                        continue  # the line may have moved meanwhile
                    await asyncio.wait((waiter.slot, waiter.moved), return_when=asyncio.FIRST_COMPLETED)
                    if waiter.moved.done():
                        waiter.moved = asyncio.get_running_loop().create_future()
            except asyncio.CancelledError:
                if waiter.slot.done() and not waiter.slot.cancelled():
                    waiter.slot.result().release()  # handed over just as we gave up: pass it on
                else:
                    self._leave(waiter)
                raise
            return waiter.slot.result()
        finally:
            if admission is not None:
                admission.withdraw()

    def _lease(self) -> Lease:
        self.in_use += 1
        return Lease(self)

    def _count_refusal(self) -> None:
        if self.metrics is not None:
            self.metrics.refused.inc()

    def _leave(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            self._report_queue()

    def _free_slot(self) -> None:
        """A lease was released: its slot passes straight to the next in line, or becomes free."""
        while self._waiters:
            waiter = self._waiters.popleft()
            self._report_queue()
            if not waiter.slot.done():
                waiter.slot.set_result(Lease(self))
                return
        self.in_use -= 1
        self.freed.set()

    def _report_queue(self) -> None:
        """The line changed: every waiter learns it may have moved, and the gauge follows."""
        for waiter in self._waiters:
            if not waiter.moved.done():
                waiter.moved.set_result(None)
        if self.metrics is not None:
            self.metrics.queue.set(len(self._waiters))
