"""Wakes event streams (SSE) when something was written for their session.

The events table is the truth; this only saves streams from polling it. Writers in this process call
:meth:`Notifier.notify`. Writes from elsewhere (``browservm sessions cancel``, another replica) are
found by :meth:`Notifier.watch`: one query per interval for all streams together, and only while some
stream follows a session. So an idle stream costs no database work at all, however many there are.

Subscribers of :data:`ANY` wake for every key (the tenant-wide event stream of the dashboard).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import structlog
from sqlalchemy import func, select

from browservm.store.database import Database
from browservm.store.models import Event

log = structlog.get_logger(__name__)

WATCH_INTERVAL_S = 2.0
"""How soon a stream sees an event another process wrote."""


class Subscription:
    """What a stream waits on: set by every write for its session since the stream last looked."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()
        self._unknown = False
        self._newest = 0

    def wake(self, up_to: int | None) -> None:
        if up_to is None:
            self._unknown = True
        else:
            self._newest = max(self._newest, up_to)
        self._changed.set()

    def clear(self) -> None:
        """Call before reading the table: a write after this wakes the next :meth:`changed_after`."""
        self._changed.clear()
        self._unknown = False
        self._newest = 0

    async def changed_after(self, after: int) -> None:
        """Return once the session may have events past ``after``."""
        while True:
            await self._changed.wait()
            if self._unknown or self._newest > after:
                return
            self.clear()  # the watcher saw only events this stream already has


ANY = "*"


class Notifier:
    def __init__(self) -> None:
        self._subscribers: defaultdict[str, set[Subscription]] = defaultdict(set)

    def notify(self, key: str, *, up_to: int | None = None) -> None:
        """Something was written for ``key``; ``up_to`` is the newest event id, when known."""
        for subscription in (*self._subscribers.get(key, ()), *self._subscribers.get(ANY, ())):
            subscription.wake(up_to)

    @contextmanager
    def subscribe(self, key: str) -> Iterator[Subscription]:
        subscription = Subscription()
        self._subscribers[key].add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers[key].discard(subscription)
            if not self._subscribers[key]:
                del self._subscribers[key]

    async def watch(self, db: Database, interval_s: float = WATCH_INTERVAL_S) -> None:
        """Wake the streams of sessions that got events from another process."""
        async with db.session() as session:
            seen = int((await session.execute(select(func.coalesce(func.max(Event.id), 0)))).scalar_one())
        while True:
            await asyncio.sleep(interval_s)
            if not self._subscribers:
                continue
            try:
                async with db.session() as session:
                    query = (
                        select(Event.session_id, func.max(Event.id))
                        .where(Event.id > seen)
                        .group_by(Event.session_id)
                    )
                    rows = (await session.execute(query)).all()
            except Exception as exc:  # the loop must outlive a bad pass; streams still get local writes
                log.warning("notifier.watch_failed", error=str(exc))
                continue
            for session_id, newest in rows:
                seen = max(seen, int(newest))
                if session_id is not None:
                    self.notify(session_id, up_to=int(newest))
