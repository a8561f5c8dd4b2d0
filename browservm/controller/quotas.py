"""What one API key may use: requests per second, and event streams held open.

Both are in memory, per controller process: a replica counts its own callers (the limits are per
replica, which the docs say). Refusals are ``429`` with ``Retry-After`` and the uniform error body.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from browservm.controller.errors import ApiError
from browservm.settings import Settings

PING_S = 15
"""A comment line this often keeps proxies from closing an idle stream."""


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass
class RequestRate:
    """A token bucket per key: ``burst`` requests at once, refilled at ``per_s`` a second."""

    per_s: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def admit(self, key: str) -> None:
        """Take one request from ``key``'s bucket, or raise 429 saying when the next one fits."""
        if self.per_s <= 0:
            return
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.per_s)
        bucket.at = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return
        wait_s = (1 - bucket.tokens) / self.per_s
        raise ApiError(
            429,
            "rate_limited",
            f"this API key is over {self.per_s:g} requests per second (bursts of {self.burst}); "
            f"retry after {math.ceil(wait_s)} s",
            headers={"Retry-After": str(math.ceil(wait_s))},
        )


class StreamSlot:
    """One open event stream; :meth:`release` gives it back (once, however often it is called)."""

    def __init__(self, slots: StreamSlots, key: str) -> None:
        self._slots = slots
        self._key = key
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots._give_back(self._key)


@dataclass
class StreamSlots:
    """Event streams open at once: ``total`` for everyone, ``per_key`` for one API key."""

    total: int
    per_key: int
    _by_key: dict[str, int] = field(default_factory=dict)
    _open: int = 0

    @property
    def open(self) -> int:
        return self._open

    def take(self, key: str) -> StreamSlot:
        held = self._by_key.get(key, 0)
        if held >= self.per_key:
            raise ApiError(
                429,
                "too_many_streams",
                f"this API key already holds {self.per_key} event streams; close one and retry",
                headers={"Retry-After": "5"},
            )
        if self._open >= self.total:
            raise ApiError(
                429,
                "too_many_streams",
                f"the controller already serves {self.total} event streams; retry later",
                headers={"Retry-After": "5"},
            )
        self._by_key[key] = held + 1
        self._open += 1
        return StreamSlot(self, key)

    def _give_back(self, key: str) -> None:
        self._open -= 1
        left = self._by_key[key] - 1
        if left:
            self._by_key[key] = left
        else:
            del self._by_key[key]


@dataclass
class Quotas:
    rate: RequestRate
    streams: StreamSlots

    @classmethod
    def from_settings(cls, settings: Settings) -> Quotas:
        return cls(
            rate=RequestRate(settings.rate_limit_per_s, settings.rate_limit_burst),
            streams=StreamSlots(settings.max_event_streams, settings.max_event_streams_per_key),
        )


class EventStream(EventSourceResponse):
    """Server-sent events that hold a stream slot, given back however the stream ends (finished, client
    gone, cancelled at shutdown)."""

    def __init__(self, content: AsyncIterator[ServerSentEvent], slot: StreamSlot) -> None:
        super().__init__(content, ping=PING_S)
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()
