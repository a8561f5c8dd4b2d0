"""The viewer follows its session, in a real Chromium against a real controller and real sandboxes: it
waits in line with its place shown, streams while the user signs in, ends on a screen that says what
happened (and tells the embedding page), and a reload within the token's life reopens the same session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import BrowserContext, Frame, Page

from tests.controller.conftest import Controller, controller_settings, run_controller
from tests.controller.demo_login import sign_in
from tests.web.conftest import embedder_site

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# The page's own record of what the controller told it, in order (registered before its scripts run).
RECORD_SESSION_EVENTS = """
    window.sessionEvents = [];
    window.addEventListener('browservm-session', (event) => window.sessionEvents.push(event.detail));
"""


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    settings = controller_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'browservm.db'}")
    async with run_controller(settings) as running:
        yield running


async def viewer_status(target: Page | Frame) -> dict[str, Any]:
    value: dict[str, Any] = await target.evaluate(
        "() => window.browservmViewer ? window.browservmViewer.status : {}"
    )
    return value


async def screen(target: Page | Frame) -> dict[str, str]:
    """What the overlay says: its kind, title, reason and text ('' kind when it is hidden)."""
    value: dict[str, str] = await target.evaluate(
        """() => {
            const o = document.querySelector('.bvm-overlay');
            const text = (s) => o.querySelector(s).textContent;
            return o.hidden ? {kind: ''} : {kind: o.dataset.kind, title: text('.bvm-title'),
                                            reason: text('.bvm-reason'), text: text('.bvm-text')};
        }"""
    )
    return value


async def until(target: Page | Frame, predicate: Any, what: str, timeout_s: float = 60) -> dict[str, Any]:
    """Poll the viewer's status and screen until ``predicate(status, screen)`` holds."""
    status: dict[str, Any] = {}
    shown: dict[str, str] = {}
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                status, shown = await viewer_status(target), await screen(target)
                if predicate(status, shown):
                    return status
                await asyncio.sleep(0.1)
    except TimeoutError:
        log = "\n".join(status.get("log", [])[-15:])
        raise AssertionError(
            f"viewer never {what}; status {status.get('state')}, screen {shown}; its log:\n{log}"
        ) from None


def streaming(status: dict[str, Any], _shown: dict[str, str]) -> bool:
    return status.get("state") == "streaming"


async def test_signed_in_screen_and_the_embedding_page_hears_it(
    browser_context: BrowserContext, controller: Controller
) -> None:
    created = (
        await controller.client.post("/v1/sessions", json={"user_id": "embedded", "provider": "demo"})
    ).json()
    token = created["viewer_url"].split("token=", 1)[1]
    host = f"""<!doctype html><script type="module" src="{controller.url}/static/embed.js"></script>
        <browservm-viewer session="{created["id"]}" token="{token}" mode="vnc"></browservm-viewer>
        <script>
          window.heard = [];
          document.addEventListener('browservm-session', (e) => window.heard.push(e.detail));
        </script>"""
    page = await browser_context.new_page()
    # The embedding page is another origin (localhost, the controller 127.0.0.1): only postMessage crosses.
    with embedder_site(host) as embedder:
        await page.goto(embedder)
        async with asyncio.timeout(20):
            while (frame := next((f for f in page.frames if "/view/" in f.url), None)) is None:
                await asyncio.sleep(0.1)
        await until(frame, streaming, "streamed the login page")
        assert (await screen(frame))["kind"] == ""

        await sign_in(controller, created["id"], "embedded@example.test")
        await until(frame, lambda s, shown: shown["kind"] == "completed", "showed the signed-in screen")
        shown = await screen(frame)
        assert shown["title"] == "You are signed in"
        assert shown["text"] == "You can close this page now."

        heard: list[dict[str, Any]] = await page.evaluate("() => window.heard")
        statuses = [detail["status"] for detail in heard]
        assert statuses[-1] == "completed"
        assert "awaiting_user" in statuses
        assert heard[-1] == {"session_id": created["id"], "status": "completed", "reason": ""}
        assert await page.evaluate("() => document.querySelector('browservm-viewer').session.status") == (
            "completed"
        )

        # It stays on that screen: no reconnecting to the destroyed sandbox, no media connection.
        await controller_sandbox_gone(controller, created["id"])
        status = await viewer_status(frame)
        after = status["log"][
            next(i for i, line in enumerate(status["log"]) if "session completed" in line) :
        ]
        assert not any("reconnecting" in line or "state connecting" in line for line in after), after
        assert status["state"] == "ended"
        assert await frame.locator(".bvm-switch").is_hidden()  # nothing left to switch to


async def controller_sandbox_gone(controller: Controller, session_id: str) -> None:
    """Wait until the session's browser sandbox has been destroyed (its events say so)."""
    async with asyncio.timeout(30):
        while True:
            async with controller.client.stream("GET", f"/v1/sessions/{session_id}/events") as stream:
                text = "".join([line async for line in stream.aiter_lines()])
            if '"state": "destroyed"' in text:
                return
            await asyncio.sleep(0.2)


async def test_a_queued_viewer_waits_its_turn_then_streams_then_says_cancelled(
    browser_context: BrowserContext, tmp_path: Path
) -> None:
    settings = controller_settings(
        tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'browservm.db'}", max_sandboxes=1, max_queued_sessions=4
    )
    async with run_controller(settings) as controller:
        client = controller.client
        first = (await client.post("/v1/sessions", json={"user_id": "w1", "provider": "demo"})).json()
        await controller.wait_status(first["id"], "starting", "awaiting_user")
        second = (await client.post("/v1/sessions", json={"user_id": "w2", "provider": "demo"})).json()
        third = (await client.post("/v1/sessions", json={"user_id": "w3", "provider": "demo"})).json()

        page = await browser_context.new_page()
        await page.add_init_script(RECORD_SESSION_EVENTS)
        await page.goto(third["viewer_url"] + "&mode=vnc")
        await until(page, lambda s, shown: "number 2 in line" in shown.get("text", ""), "showed place 2")
        assert (await screen(page))["title"] == "Waiting for a free browser"
        # Nothing to connect to yet: the viewer has not tried the media.
        assert (await viewer_status(page))["mode"] is None

        await client.post(f"/v1/sessions/{second['id']}/cancel")
        await until(page, lambda s, shown: "number 1 in line" in shown.get("text", ""), "moved up to 1")
        await client.post(f"/v1/sessions/{first['id']}/cancel")
        # Its turn: the sandbox starts, the login page comes up and streams, far later than the
        # ~1.5 minutes a viewer used to keep retrying for.
        await until(page, streaming, "streamed once its turn came", timeout_s=90)

        await client.post(f"/v1/sessions/{third['id']}/cancel")
        await until(page, lambda s, shown: shown["kind"] == "cancelled", "said cancelled")
        shown = await screen(page)
        assert shown["title"] == "Sign-in cancelled"
        assert shown["reason"] == "The sign-in was cancelled by the service that opened it."

        events: list[dict[str, Any]] = await page.evaluate("() => window.sessionEvents")
        seen = [(e["status"], e.get("queue_position")) for e in events]
        assert seen[:2] == [("pending", 2), ("pending", 1)], seen
        assert ("awaiting_user", None) in seen and seen[-1] == ("cancelled", None)
        order = ["pending", "starting", "awaiting_user", "cancelled"]
        assert [order.index(status) for status, _ in seen] == sorted(order.index(s) for s, _ in seen)


async def test_failed_and_expired_endings_say_why_in_words_for_the_user(
    browser_context: BrowserContext, tmp_path: Path
) -> None:
    settings = controller_settings(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'browservm.db'}",
        session_ttl_s=20,  # long enough to stream on a loaded host, short enough to wait for
    )
    async with run_controller(settings) as controller:
        client = controller.client
        broken = (
            await client.post(
                "/v1/sessions",
                json={"user_id": "f", "provider": "demo", "options": {"issuer": "ftp://nowhere.invalid/x"}},
            )
        ).json()
        page = await browser_context.new_page()
        await page.goto(broken["viewer_url"])
        await until(page, lambda s, shown: shown["kind"] == "failed", "said failed")
        shown = await screen(page)
        assert shown["title"] == "Sign-in failed"
        assert shown["reason"].startswith("The sign-in did not go through")
        assert "nowhere.invalid" not in shown["reason"]

        idle = (await client.post("/v1/sessions", json={"user_id": "e", "provider": "demo"})).json()
        late = await browser_context.new_page()
        await late.goto(idle["viewer_url"] + "&mode=vnc")
        await until(late, streaming, "streamed")
        await until(late, lambda s, shown: shown["kind"] == "expired", "said expired", timeout_s=45)
        shown = await screen(late)
        assert shown["title"] == "This sign-in has expired"
        assert shown["reason"] == "The sign-in was not finished in time and has been closed."


async def test_reload_reopens_the_same_session_and_a_bare_link_says_what_to_do(
    browser_context: BrowserContext, controller: Controller
) -> None:
    created = (await controller.client.post("/v1/sessions", json={"user_id": "r", "provider": "demo"})).json()
    page = await browser_context.new_page()
    await page.goto(created["viewer_url"] + "&mode=vnc")
    await until(page, streaming, "streamed")
    assert "token=" not in page.url

    response = await page.reload()
    assert response is not None and response.status == 200
    assert "token=" not in page.url
    status = await until(page, streaming, "streamed again after the reload")
    assert status["session"]["session_id"] == created["id"]

    # A tab that never had the token (the bare link, copied from the address bar) cannot open it.
    stranger = await browser_context.new_page()
    await stranger.goto(page.url)
    await until(stranger, lambda s, shown: shown["kind"] == "unauthorized", "refused the bare link")
    assert "Ask the service that sent you here for a new link" in (await screen(stranger))["text"]

    # The operator issues a fresh link for the live session; it opens in any tab.
    fresh = (await controller.client.post(f"/v1/sessions/{created['id']}/viewer-token")).json()
    await stranger.goto(fresh["viewer_url"] + "&mode=vnc")
    await until(stranger, streaming, "streamed with the fresh link")
    await controller.client.post(f"/v1/sessions/{created['id']}/cancel")
