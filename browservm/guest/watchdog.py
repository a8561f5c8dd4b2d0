"""The agent's own end: a guest that no controller speaks to, or whose session is over, stops itself.

A controller that went away for good (the host drained, its state directory gone) must not leave its
sandboxes running for ever. The agent ends when no controller has spoken to it for its idle timeout
(``--idle-timeout-s``, two minutes by default; the controller's channel pings four times as often) or once
the time the controller gave in ``Configure.expires_in_s`` has passed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

DEFAULT_IDLE_TIMEOUT_S = 120.0
CHECK_S = 1.0
"""How often the clocks are checked at most (more often for a short idle timeout)."""
SUSPENDED_AFTER_CHECKS = 3
"""A check this many intervals late means the guest was frozen (stopped, a VM paused or restored): nobody
could speak to it meanwhile, so the silence starts again from now."""


class Watchdog:
    def __init__(
        self,
        idle_timeout_s: float | None,
        last_heard: Callable[[], float],
        stop: Callable[[str], None],
    ) -> None:
        """``last_heard`` gives when a controller last spoke (``time.monotonic``); ``stop`` ends the
        agent, with the reason."""
        self.idle_timeout_s = idle_timeout_s
        self._last_heard = last_heard
        self._stop = stop
        self._since = time.monotonic()
        """Silence is counted from here at the earliest: the agent's start, or a freeze."""
        self._deadline: float | None = None

    def expire_in(self, seconds: float) -> None:
        """End the agent ``seconds`` from now (the session's expiry, as the controller counts it)."""
        self._deadline = time.monotonic() + seconds

    async def run(self) -> None:
        interval = min(CHECK_S, self.idle_timeout_s / 4) if self.idle_timeout_s else CHECK_S
        checked = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now - checked > SUSPENDED_AFTER_CHECKS * interval:
                log.info("agent.watchdog_resumed", frozen_s=round(now - checked, 1))
                self._since = now
            checked = now
            silent_s = now - max(self._since, self._last_heard())
            if self.idle_timeout_s is not None and silent_s > self.idle_timeout_s:
                self._stop(f"no controller has spoken to this sandbox for {silent_s:.0f} s")
                return
            if self._deadline is not None and now >= self._deadline:
                self._stop("its session is over (past the expiry the controller gave)")
                return
