"""Sign-in sessions: start one, read it, list them, cancel one, follow its events, wait for a status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Generator,
    Iterator,
    Mapping,
)
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from browservm_client import _sse
from browservm_client._operations import operation
from browservm_client._transport import AsyncTransport, Request, Transport, backoff, path
from browservm_client.errors import APIConnectionError, SessionEnded, WaitTimeout
from browservm_client.models import (
    TERMINAL_SESSION,
    Provider,
    SessionOut,
    SessionPage,
    SessionStatus,
    ViewerLink,
)

SESSIONS = "/v1/sessions"
SESSION = "/v1/sessions/{session_id}"
CANCEL = "/v1/sessions/{session_id}/cancel"
EVENTS = "/v1/sessions/{session_id}/events"
VIEWER_TOKEN = "/v1/sessions/{session_id}/viewer-token"  # noqa: S105 - a route, not a secret

MAX_RECONNECTS = 8
"""Reconnections of an event stream in a row without an event in between before giving up (~30 s)."""

WAIT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class SessionEvent:
    """One event of a session (``GET /v1/sessions/{id}/events``)."""

    id: int
    """Increasing; pass as ``after=`` to read on from here."""
    kind: str
    """``session.status``, ``sandbox.state``, ``guest.service``, ``credentials.stored``…"""
    at: datetime | None
    data: dict[str, Any]
    """The event's JSON as sent (``kind``, ``at`` and the fields of its kind)."""

    @property
    def status(self) -> SessionStatus | None:
        """The session's new status, for a ``session.status`` event."""
        if self.kind != "session.status":
            return None
        return SessionStatus(self.data["status"])

    @property
    def ends_session(self) -> bool:
        status = self.status
        return status is not None and status.terminal

    @classmethod
    def parse(cls, sse: _sse.ServerSentEvent) -> SessionEvent:
        data = json.loads(sse.data)
        at = data.get("at")
        return cls(
            id=int(sse.id or 0),
            kind=sse.event,
            at=datetime.fromisoformat(at) if isinstance(at, str) else None,
            data=data,
        )


def _statuses(statuses: Collection[SessionStatus | str]) -> frozenset[SessionStatus]:
    return frozenset(SessionStatus(s) for s in statuses) or TERMINAL_SESSION


def _list_params(
    user_id: str | None, status: SessionStatus | str | None, page_size: int, cursor: str | None
) -> dict[str, Any]:
    return {"user_id": user_id, "status": status and str(status), "limit": page_size, "cursor": cursor}


class SessionList:
    """The sessions of a listing, newest first; iterating fetches page after page as it goes."""

    def __init__(self, fetch: Callable[[str | None], SessionPage], cursor: str | None) -> None:
        self._fetch = fetch
        self._cursor = cursor

    def pages(self) -> Iterator[SessionPage]:
        cursor = self._cursor
        while True:
            page = self._fetch(cursor)
            yield page
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def __iter__(self) -> Iterator[SessionOut]:
        for page in self.pages():
            yield from page.data


class AsyncSessionList:
    """The sessions of a listing, newest first: ``async for``; fetches page after page as it goes."""

    def __init__(self, fetch: Callable[[str | None], Awaitable[SessionPage]], cursor: str | None) -> None:
        self._fetch = fetch
        self._cursor = cursor

    async def pages(self) -> AsyncIterator[SessionPage]:
        cursor = self._cursor
        while True:
            page = await self._fetch(cursor)
            yield page
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def __aiter__(self) -> AsyncIterator[SessionOut]:
        async for page in self.pages():
            for session in page.data:
                yield session


class Sessions:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    @operation("POST", SESSIONS)
    def create(
        self, *, user_id: str, provider: Provider, options: Mapping[str, str] | None = None
    ) -> SessionOut:
        """Start a sign-in for ``user_id``: answers at once (``pending``) with the viewer URL to show them."""
        body = {"user_id": user_id, "provider": provider, "options": dict(options or {})}
        response = self._t.send(Request("POST", SESSIONS, json=body))
        return SessionOut.model_validate_json(response.content)

    @operation("GET", SESSION)
    def get(self, session_id: str) -> SessionOut:
        response = self._t.send(Request("GET", path(SESSION, session_id=session_id)))
        return SessionOut.model_validate_json(response.content)

    @operation("GET", SESSIONS)
    def list(
        self,
        *,
        user_id: str | None = None,
        status: SessionStatus | str | None = None,
        page_size: int = 50,
        cursor: str | None = None,
    ) -> SessionList:
        """Newest first, fetched ``page_size`` at a time (the API's ``limit``) while you iterate."""

        def fetch(page_cursor: str | None) -> SessionPage:
            params = _list_params(user_id, status, page_size, page_cursor)
            return SessionPage.model_validate_json(self._t.send(Request("GET", SESSIONS, params)).content)

        return SessionList(fetch, cursor)

    @operation("POST", CANCEL)
    def cancel(self, session_id: str) -> SessionOut:
        """End the session now; its browser sandbox is destroyed. ``Conflict`` once it has ended."""
        response = self._t.send(Request("POST", path(CANCEL, session_id=session_id)))
        return SessionOut.model_validate_json(response.content)

    @operation("POST", VIEWER_TOKEN)
    def viewer_link(self, session_id: str) -> ViewerLink:
        """A fresh viewer link for a live session (its token is minted now, valid for the controller's
        viewer-token TTL, never past the session). ``Conflict`` (``session_ended``) once it has ended."""
        response = self._t.send(Request("POST", path(VIEWER_TOKEN, session_id=session_id)))
        return ViewerLink.model_validate_json(response.content)

    def viewer_url(self, session_id: str) -> str:
        """The URL of a fresh viewer link (see :meth:`viewer_link`)."""
        return self.viewer_link(session_id).viewer_url

    @operation("GET", EVENTS)
    def events(self, session_id: str, *, after: int | None = None) -> Iterator[SessionEvent]:
        """Every event of the session from the start (or after event ``after``), live, until it ends.

        A dropped connection is reopened from the last event received, so nothing is missed or repeated.
        """
        return self._events(session_id, after, deadline=None)

    def _events(self, session_id: str, after: int | None, deadline: float | None) -> Generator[SessionEvent]:
        last = after or 0
        failures = 0
        while True:
            timeout = self._t.config.stream_timeout(deadline)
            request = Request(
                "GET",
                path(EVENTS, session_id=session_id),
                headers={"Last-Event-ID": str(last)} if last else None,
                timeout=timeout,
            )
            reopen = False
            try:
                with self._t.stream(request) as response:
                    decoder = _sse.Decoder()
                    for line in response.iter_lines():
                        sse = decoder.feed(line)
                        if sse is not None:
                            event = SessionEvent.parse(sse)
                            last, failures = event.id, 0
                            yield event
                            if event.ends_session:
                                return
                        if deadline is not None and _overshoots(deadline, timeout):
                            reopen = True
                            break
            except (httpx.TransportError, APIConnectionError) as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    raise _Deadline from exc
                failures += 1
                if failures > MAX_RECONNECTS:
                    raise APIConnectionError(
                        self._t.config.base_url, f"event stream kept dropping: {exc}"
                    ) from exc
                time.sleep(backoff(failures - 1))
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise _Deadline
            # The stream ended without the session's end: the controller stopped it (a restart). If the
            # session did end meanwhile (and we resumed past its last event), we are done; else read on.
            if not reopen and self.get(session_id).status.terminal:
                return

    def wait(
        self, session_id: str, *statuses: SessionStatus | str, timeout: float = WAIT_TIMEOUT_S
    ) -> SessionOut:
        """The session once it has reached one of ``statuses`` (default: any ending), as it is then.

        Raises :class:`SessionEnded` if it ends in another status and :class:`WaitTimeout` after ``timeout``
        seconds.
        """
        wanted = _statuses(statuses)
        deadline = time.monotonic() + timeout
        last: SessionStatus | None = None
        try:
            with contextlib.closing(self._events(session_id, None, deadline)) as events:
                for event in events:
                    status = event.status
                    if status is None:
                        continue
                    last = status
                    if status in wanted:
                        return self.get(session_id)
                    if status.terminal:
                        raise SessionEnded(self.get(session_id), wanted)
        except _Deadline:
            raise WaitTimeout(session_id, wanted, timeout, last) from None
        return _ended(self.get(session_id), wanted)


class AsyncSessions:
    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    @operation("POST", SESSIONS)
    async def create(
        self, *, user_id: str, provider: Provider, options: Mapping[str, str] | None = None
    ) -> SessionOut:
        """Start a sign-in for ``user_id``: answers at once (``pending``) with the viewer URL to show them."""
        body = {"user_id": user_id, "provider": provider, "options": dict(options or {})}
        response = await self._t.send(Request("POST", SESSIONS, json=body))
        return SessionOut.model_validate_json(response.content)

    @operation("GET", SESSION)
    async def get(self, session_id: str) -> SessionOut:
        response = await self._t.send(Request("GET", path(SESSION, session_id=session_id)))
        return SessionOut.model_validate_json(response.content)

    @operation("GET", SESSIONS)
    def list(
        self,
        *,
        user_id: str | None = None,
        status: SessionStatus | str | None = None,
        page_size: int = 50,
        cursor: str | None = None,
    ) -> AsyncSessionList:
        """Newest first, fetched ``page_size`` at a time (the API's ``limit``) while you ``async for``."""

        async def fetch(page_cursor: str | None) -> SessionPage:
            params = _list_params(user_id, status, page_size, page_cursor)
            response = await self._t.send(Request("GET", SESSIONS, params))
            return SessionPage.model_validate_json(response.content)

        return AsyncSessionList(fetch, cursor)

    @operation("POST", CANCEL)
    async def cancel(self, session_id: str) -> SessionOut:
        """End the session now; its browser sandbox is destroyed. ``Conflict`` once it has ended."""
        response = await self._t.send(Request("POST", path(CANCEL, session_id=session_id)))
        return SessionOut.model_validate_json(response.content)

    @operation("POST", VIEWER_TOKEN)
    async def viewer_link(self, session_id: str) -> ViewerLink:
        """A fresh viewer link for a live session (its token is minted now, valid for the controller's
        viewer-token TTL, never past the session). ``Conflict`` (``session_ended``) once it has ended."""
        response = await self._t.send(Request("POST", path(VIEWER_TOKEN, session_id=session_id)))
        return ViewerLink.model_validate_json(response.content)

    async def viewer_url(self, session_id: str) -> str:
        """The URL of a fresh viewer link (see :meth:`viewer_link`)."""
        return (await self.viewer_link(session_id)).viewer_url

    @operation("GET", EVENTS)
    async def events(self, session_id: str, *, after: int | None = None) -> AsyncGenerator[SessionEvent]:
        """Every event of the session from the start (or after event ``after``), live, until it ends.

        A dropped connection is reopened from the last event received, so nothing is missed or repeated.
        """
        last = after or 0
        failures = 0
        while True:
            request = Request(
                "GET",
                path(EVENTS, session_id=session_id),
                headers={"Last-Event-ID": str(last)} if last else None,
                timeout=self._t.config.stream_timeout(),
            )
            try:
                async with self._t.stream(request) as response:
                    decoder = _sse.Decoder()
                    async for line in response.aiter_lines():
                        sse = decoder.feed(line)
                        if sse is None:
                            continue
                        event = SessionEvent.parse(sse)
                        last, failures = event.id, 0
                        yield event
                        if event.ends_session:
                            return
            except (httpx.TransportError, APIConnectionError) as exc:
                failures += 1
                if failures > MAX_RECONNECTS:
                    raise APIConnectionError(
                        self._t.config.base_url, f"event stream kept dropping: {exc}"
                    ) from exc
                await asyncio.sleep(backoff(failures - 1))
                continue
            if (await self.get(session_id)).status.terminal:
                return

    async def wait(
        self, session_id: str, *statuses: SessionStatus | str, timeout: float = WAIT_TIMEOUT_S
    ) -> SessionOut:
        """The session once it has reached one of ``statuses`` (default: any ending), as it is then.

        Raises :class:`SessionEnded` if it ends in another status and :class:`WaitTimeout` after ``timeout``
        seconds.
        """
        wanted = _statuses(statuses)
        last: SessionStatus | None = None
        try:
            async with asyncio.timeout(timeout), contextlib.aclosing(self.events(session_id)) as events:
                async for event in events:
                    status = event.status
                    if status is None:
                        continue
                    last = status
                    if status in wanted:
                        return await self.get(session_id)
                    if status.terminal:
                        raise SessionEnded(await self.get(session_id), wanted)
        except TimeoutError:
            raise WaitTimeout(session_id, wanted, timeout, last) from None
        return _ended(await self.get(session_id), wanted)


def _ended(session: SessionOut, wanted: frozenset[SessionStatus]) -> SessionOut:
    """After a stream that ended without a status we watch for (it was resumed past the end)."""
    if session.status in wanted:
        return session
    raise SessionEnded(session, wanted)


def _overshoots(deadline: float, timeout: httpx.Timeout) -> bool:
    """Whether the next read of a connection with ``timeout`` may end more than a second past ``deadline``.

    A sync read cannot be cut short and every ping or event restarts it, so such a connection is reopened
    (from the last event) with a read timeout that ends at the deadline.
    """
    return (timeout.read or 0.0) > deadline - time.monotonic() + 1.0


class _Deadline(Exception):
    """The sync wait's deadline passed while a read was blocked."""
