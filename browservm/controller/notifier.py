"""Wakes event streams (SSE) when something was written for their session.

The events table is the truth; this only saves streams from polling it. Across several controller
replicas the same role falls to PostgreSQL LISTEN/NOTIFY (planned); streams also re-read the table on a
timer, so a missed wake-up delays an event, never loses it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict


class Notifier:
    def __init__(self) -> None:
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)

    def notify(self, key: str) -> None:
        for event in self._waiters.get(key, ()):
            event.set()

    async def wait(self, key: str, timeout_s: float) -> None:
        event = asyncio.Event()
        self._waiters[key].add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            self._waiters[key].discard(event)
            if not self._waiters[key]:
                del self._waiters[key]
