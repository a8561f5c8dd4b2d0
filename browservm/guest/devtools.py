"""Chromium's DevTools protocol over ``--remote-debugging-pipe``: no port anyone else could connect to.

Chromium reads commands on its fd 3 and writes answers and events on its fd 4, each message JSON ended by a
NUL byte. :class:`DevToolsPipe` makes the two pipes, hands Chromium its ends (:attr:`child_fds`, for
:func:`~browservm.guest.supervisor.spawn`), and then carries calls (``sessionId`` for a target attached
in flat mode) and events.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
from collections.abc import Iterator
from typing import Any

from browservm.aio import cancel_and_wait

MAX_MESSAGE = 64 * 1024 * 1024


class DevToolsError(Exception):
    """A DevTools call failed, or Chromium closed its pipe."""


class DevToolsPipe:
    def __init__(self) -> None:
        self._command_r, self._command_w = os.pipe()
        self._event_r, self._event_w = os.pipe()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: set[asyncio.Queue[dict[str, Any]]] = set()
        self._reader_task: asyncio.Task[None] | None = None
        self._transports: list[asyncio.BaseTransport] = []
        self._writer: asyncio.WriteTransport | None = None
        self._gone = False

    @property
    def child_fds(self) -> dict[int, int]:
        """What Chromium must get as its fd 3 (commands) and fd 4 (answers and events)."""
        return {3: self._command_r, 4: self._event_w}

    async def open(self) -> None:
        """Once Chromium runs: let go of its ends here and start reading."""
        os.close(self._command_r)
        os.close(self._event_w)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_MESSAGE)
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(self._event_r, "rb", buffering=0)
        )
        self._writer, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(self._command_w, "wb", buffering=0)
        )
        self._transports = [read_transport, self._writer]
        self._reader_task = asyncio.create_task(self._read(reader), name="devtools-pipe")

    def close_unused(self) -> None:
        """Chromium never started: close all four ends."""
        for fd in (self._command_r, self._command_w, self._event_r, self._event_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message: dict[str, Any] = json.loads((await reader.readuntil(b"\0"))[:-1])
                if "id" in message:
                    future = self._pending.pop(message["id"], None)
                    if future is not None and not future.done():
                        future.set_result(message)
                else:
                    for queue in self._listeners:
                        queue.put_nowait(message)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            self._gone = True
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(DevToolsError("Chromium closed its DevTools pipe"))

    async def call(
        self, method: str, params: dict[str, Any] | None = None, *, session_id: str | None = None,
        timeout_s: float = 10.0,
    ) -> dict[str, Any]:  # fmt: skip
        if self._writer is None or self._writer.is_closing() or self._gone:
            raise DevToolsError("the DevTools pipe is not open (Chromium is starting or gone)")
        call_id = next(self._ids)
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            self._writer.write(json.dumps(message).encode() + b"\0")
            reply = await asyncio.wait_for(future, timeout_s)
        except TimeoutError as exc:
            raise DevToolsError(f"DevTools {method}: no answer within {timeout_s:.0f}s") from exc
        finally:
            self._pending.pop(call_id, None)
        if "error" in reply:
            raise DevToolsError(f"DevTools {method} failed: {reply['error'].get('message')}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    @contextlib.contextmanager
    def events(self) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        """Events from now until the block ends (every target's; filter by ``sessionId``)."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._listeners.add(queue)
        try:
            yield queue
        finally:
            self._listeners.discard(queue)

    async def close(self) -> None:
        await cancel_and_wait([self._reader_task])
        for transport in self._transports:
            transport.close()
        self._transports = []
        self._writer = None
