"""A proxy's authentication answered for one browser context over Chromium's DevTools pipe.

Chromium asks for proxy credentials in a dialog a kiosk page cannot show; the agent answers the challenge
itself (Fetch domain, ``handleAuthRequests``) for the pages and workers of the session's browser context,
so the user's per-session egress proxy works without the credentials ever reaching a page.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from browservm import protocol
from browservm.aio import cancel_and_wait
from browservm.guest.devtools import DevToolsError, DevToolsPipe

log = structlog.get_logger(__name__)


class ProxyAuth:
    """Answers a proxy's authentication for the pages and workers of one browser context, over the
    DevTools pipe: every target of the browser is auto-attached paused; those of the context get the
    Fetch domain (each request continued as it is, a proxy's challenge answered with the credentials,
    a server's left to the page), the others are let go."""

    MAX_ANSWERS = 2
    """Challenges answered per request: a proxy that asks again refuses these credentials."""

    def __init__(self, devtools: DevToolsPipe, proxy: protocol.ProxyConfig) -> None:
        self.devtools = devtools
        self.proxy = proxy
        self.context: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._answered: dict[str, int] = {}

    async def start(self) -> None:
        started = asyncio.Event()
        self._task = asyncio.create_task(self._serve(started), name="chromium-proxy-auth")
        await started.wait()
        await self.devtools.call(
            "Target.setAutoAttach", {"autoAttach": True, "waitForDebuggerOnStart": True, "flatten": True}
        )

    async def close(self) -> None:
        await cancel_and_wait([self._task, *self._handlers])

    async def _serve(self, started: asyncio.Event) -> None:
        with self.devtools.events() as events:
            started.set()
            while True:
                event = await events.get()
                task = asyncio.create_task(self._handle(event))
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)

    async def _handle(self, event: dict[str, Any]) -> None:
        method, params, session = event.get("method"), event.get("params", {}), event.get("sessionId")
        try:
            if method == "Target.attachedToTarget":
                await self._attached(params)
            elif method == "Fetch.requestPaused" and session:
                await self.devtools.call(
                    "Fetch.continueRequest", {"requestId": params["requestId"]}, session_id=session
                )
            elif method == "Fetch.authRequired" and session:
                await self._answer(params, session)
        except DevToolsError as exc:  # the target went away meanwhile
            log.debug("chromium.proxy_auth_event_failed", method=method, error=str(exc))

    async def _attached(self, params: dict[str, Any]) -> None:
        session = str(params["sessionId"])
        info = params.get("targetInfo", {})
        ours = self.context is not None and info.get("browserContextId") == self.context
        if ours:
            with contextlib.suppress(DevToolsError):  # not every kind of target has Fetch
                await self.devtools.call(
                    "Fetch.enable",
                    {"handleAuthRequests": True, "patterns": [{"urlPattern": "*"}]},
                    session_id=session,
                )
            if info.get("type") in ("page", "iframe"):
                # Its out-of-process frames and workers, paused until they have Fetch too.
                with contextlib.suppress(DevToolsError):
                    await self.devtools.call(
                        "Target.setAutoAttach",
                        {"autoAttach": True, "waitForDebuggerOnStart": True, "flatten": True},
                        session_id=session,
                    )
        if params.get("waitingForDebugger"):
            with contextlib.suppress(DevToolsError):
                await self.devtools.call("Runtime.runIfWaitingForDebugger", session_id=session)
        if not ours:
            with contextlib.suppress(DevToolsError):
                await self.devtools.call("Target.detachFromTarget", {"sessionId": session})

    async def _answer(self, params: dict[str, Any], session: str) -> None:
        request = str(params["requestId"])
        challenge = params.get("authChallenge", {})
        times = self._answered.get(request, 0)
        if challenge.get("source") != "Proxy":
            response: dict[str, Any] = {"response": "Default"}
        elif times >= self.MAX_ANSWERS or self.proxy.username is None:
            response = {"response": "CancelAuth"}
            log.warning("chromium.proxy_auth_refused", proxy=self.proxy.url)  # never the credentials
        else:
            self._answered[request] = times + 1
            response = {
                "response": "ProvideCredentials",
                "username": self.proxy.username,
                "password": self.proxy.password or "",
            }
        await self.devtools.call(
            "Fetch.continueWithAuth",
            {"requestId": request, "authChallengeResponse": response},
            session_id=session,
        )
