"""Bounded admission: at most ``limit`` sandboxes run; past that sessions wait in order, or are refused.

The old system fell over under dozens of leaked VMs. Here a session holds a slot from the moment its
sandbox is created until it is destroyed, waiters are served first come first served, and a full
queue is refused at the API with 429 and a reason, before anything is created.

The warm pool's idle sandboxes hold slots too (they run), but as ``spare`` ones: a session takes one
with its sandbox, so they count as available when the API admits sessions, and a CLI VM that finds no
free slot has the pool give one up (``reclaim``) rather than being refused.

Each waiter may name itself (a session id) and be told its place in line whenever it changes, so the
session's viewer can say "you are number 2".
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from browservm.controller.errors import ApiError
from browservm.controller.metrics import Metrics


@dataclass(eq=False)
class _Waiter:
    key: str | None
    slot: asyncio.Future[None]
    """Resolved when a slot passes to this waiter."""
    moved: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    """Resolved when its place in line changed; replaced after each wake-up."""


class Capacity:
    def __init__(self, limit: int, max_queued: int, metrics: Metrics | None = None) -> None:
        self.limit = limit
        self.metrics = metrics
        self.max_queued = max_queued
        self.in_use = 0
        self.promised = 0
        """Sessions accepted by the API that do not hold a slot yet (queued or about to be)."""
        self.spare = 0
        """Slots held by idle warm-pool sandboxes, which any session can take over."""
        self.reclaim: Callable[[], Awaitable[bool]] | None = None
        """Set by the warm pool: give up one idle sandbox, its slot passing to the caller."""
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

    def promise(self) -> None:
        """Accept one more session, or refuse it with 429 when every slot and queue place is taken."""
        if self.in_use - self.spare + self.promised >= self.limit + self.max_queued:
            self._count_refusal()
            raise ApiError(
                429,
                "capacity_exhausted",
                f"this host runs {self.limit} sandboxes and {self.max_queued} sessions are already "
                "waiting; retry later",
                headers={"Retry-After": "10"},
            )
        self.promised += 1

    def withdraw(self) -> None:
        """A session accepted by :meth:`promise` will not wait for a slot after all (it ended, or took
        a warm sandbox's)."""
        self.promised = max(0, self.promised - 1)

    def add_spare(self) -> None:
        """A warm sandbox that holds a slot became idle: any session may take it over."""
        self.spare += 1

    def use_spare(self) -> None:
        """An idle warm sandbox's slot was taken (by a session, a CLI VM, or its own end)."""
        self.spare = max(0, self.spare - 1)

    async def take_now(self) -> None:
        """Take a free slot at once (or an idle warm sandbox's), else refuse with 429: persistent
        sandboxes do not queue."""
        if (
            self.in_use >= self.limit
            and not self._waiters
            and self.reclaim is not None
            and await self.reclaim()
        ):
            return  # the slot of a warm sandbox that was just destroyed: it passes straight to us
        if self.in_use >= self.limit or self._waiters:
            self._count_refusal()
            raise ApiError(
                429,
                "capacity_exhausted",
                f"all {self.limit} sandbox slots of this host are in use; retry later",
                headers={"Retry-After": "10"},
            )
        self.in_use += 1

    def _count_refusal(self) -> None:
        if self.metrics is not None:
            self.metrics.refused.inc()

    def take(self) -> None:
        """Count a slot that is already in use (a sandbox adopted after a restart)."""
        self.in_use += 1

    def try_take(self) -> bool:
        """Take a slot only if one is free and nobody waits (the warm pool never competes with sessions)."""
        if self.in_use >= self.limit or self._waiters:
            return False
        self.in_use += 1
        return True

    async def acquire(
        self,
        *,
        promised: bool = True,
        key: str | None = None,
        on_position: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        """Wait for a slot, in arrival order. Cancelling the wait gives the place up.

        ``on_position`` is awaited with the waiter's 1-based place when it starts waiting and each time
        the place changes (those ahead got a slot or gave up), never once the slot is ours.
        """
        try:
            if self.in_use < self.limit and not self._waiters:
                self.in_use += 1
                return
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
                    self.release()  # the slot was handed over just as we gave up: pass it on
                else:
                    self._leave(waiter)
                raise
        finally:
            if promised:
                self.promised -= 1

    def _leave(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            self._report_queue()

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            self._report_queue()
            if not waiter.slot.done():
                waiter.slot.set_result(None)  # the slot passes straight to the next in line
                return
        self.in_use = max(0, self.in_use - 1)
        self.freed.set()

    def _report_queue(self) -> None:
        """The line changed: every waiter learns it may have moved, and the gauge follows."""
        for waiter in self._waiters:
            if not waiter.moved.done():
                waiter.moved.set_result(None)
        if self.metrics is not None:
            self.metrics.queue.set(len(self._waiters))
