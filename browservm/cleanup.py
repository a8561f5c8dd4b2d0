"""A cleanup stack: each resource's undo is registered the moment the resource is taken and, when a later
step fails, the undos run last first, as E2B's orchestrator builds its sandboxes.

    async with Cleanup("sandbox.undo_failed", sandbox_id=sandbox_id) as undo:
        await attach_tap(...)
        undo.push(detach_tap, ...)
        ...
        undo.keep()  # everything was taken: nothing is undone

An undo that fails is logged (the stack's event, its context and the step's name) and the next one still
runs; the failure that started the unwinding is the one raised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, ParamSpec

import structlog

log = structlog.get_logger(__name__)

P = ParamSpec("P")


class Cleanup:
    def __init__(self, event: str, **context: Any) -> None:
        self._event = event
        self._context = context
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Cleanup:
        await self._stack.__aenter__()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        return bool(await self._stack.__aexit__(kind, exc, tb))

    def push(self, step: Callable[P, Awaitable[object]], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Undo by awaiting ``step(*args, **kwargs)``."""

        async def quietly() -> None:
            try:
                await step(*args, **kwargs)
            except Exception as exc:
                self._failed(step, exc)

        self._stack.push_async_callback(quietly)

    def callback(self, step: Callable[P, object], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Undo by calling ``step(*args, **kwargs)``."""

        def quietly() -> None:
            try:
                step(*args, **kwargs)
            except Exception as exc:
                self._failed(step, exc)

        self._stack.callback(quietly)

    def keep(self) -> None:
        """Everything was taken and is now its owner's: leaving the block undoes nothing."""
        self._stack.pop_all()

    def _failed(self, step: Callable[..., object], exc: Exception) -> None:
        log.error(self._event, **self._context, step=getattr(step, "__name__", repr(step)), error=str(exc))
